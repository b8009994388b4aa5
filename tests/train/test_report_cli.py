"""`python -m train.report` / `write_report`: the files it writes."""

import json
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from train import report
from train.config import TrainConfig
from train.report import __main__ as cli

_LAYER_FIELDS = {
    "name",
    "op",
    "kernel_shape",
    "input_shape",
    "strides",
    "padding",
    "dilation",
    "groups",
    "sigma_max",
    "sigma_max_method",
    "sigma_max_residual",
    "upper_bound",
    "upper_bound_name",
    "reshaped_sigma_max",
    "frobenius",
    "stable_rank",
    "sigma_min",
    "sigma_min_method",
    "bn_folded_sigma_max",
}
_NETWORK_FIELDS = {
    "lipschitz_upper",
    "lipschitz_upper_note",
    "lipschitz_lower",
    "lipschitz_lower_method",
    "lipschitz_gap",
}


def _check_files(test, out: pathlib.Path, num_layers: int | None = None):
    data = json.loads((out / "report.json").read_text())
    test.assertEqual(set(data), {"layers", "network", "timings"})
    test.assertTrue(_NETWORK_FIELDS <= set(data["network"]))
    if num_layers is not None:
        test.assertLen(data["layers"], num_layers)
    for layer in data["layers"]:
        test.assertTrue(_LAYER_FIELDS <= set(layer), _LAYER_FIELDS - set(layer))
        test.assertGreaterEqual(layer["upper_bound"], layer["sigma_max"] * (1 - 1e-6))
    markdown = (out / "report.md").read_text()
    test.assertIn("certified upper bound", markdown)
    for name in ("spectra.png", "norms.png"):
        test.assertGreater((out / name).stat().st_size, 1000)
    return data


class WriteTest(absltest.TestCase):
    def test_write_report_of_nnx_model(self):
        model = nnx.Sequential(
            nnx.Conv(1, 3, (3, 3), padding="CIRCULAR", param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
            nnx.relu,
            nnx.Conv(3, 2, (3, 3), strides=2, param_dtype=jnp.float64, rngs=nnx.Rngs(1)),
        )
        r = report.network_report_nnx(model, jnp.zeros((1, 8, 8, 1)), num_points=2)
        out = pathlib.Path(tempfile.mkdtemp()) / "out"
        report.write_report(r, out)
        data = _check_files(self, out, 2)
        self.assertEqual(data["layers"][0]["padding"], "CIRCULAR")
        self.assertEqual(data["layers"][0]["sigma_max_method"], "fft")
        self.assertIsNone(data["layers"][1]["sigma_max_residual"])  # dense: exact
        self.assertAlmostEqual(
            data["network"]["lipschitz_upper"], r.layers[0].sigma_max * r.layers[1].sigma_max
        )


class CliTest(absltest.TestCase):
    def test_run_dir(self):
        from train import train_and_evaluate

        root = pathlib.Path(tempfile.mkdtemp())
        config = TrainConfig(
            dataset="digits",
            model="resnet8",
            width=2,
            image_pad=2,
            batch_size=32,
            eval_batch_size=128,
            num_steps=2,
            lr=0.05,
            log_every=1,
            progress=False,
        )
        train_and_evaluate(config, root / "run")
        self.assertEqual(
            cli.main(["--run", str(root / "run"), "--out", str(root / "rep"), "--num-points", "2"]),
            0,
        )
        data = _check_files(self, root / "rep", 8)  # 7 convs + the classifier.
        self.assertIsNotNone(data["network"]["lipschitz_upper"])
        self.assertGreaterEqual(
            data["network"]["lipschitz_upper"], data["network"]["lipschitz_lower"]
        )

    def test_onnx(self):
        try:
            from train.models import from_onnx  # noqa: F401
        except ImportError:
            self.skipTest("train.models.from_onnx is not available in this checkout")
        import onnx
        from onnx import helper
        from onnx import numpy_helper

        rng = np.random.default_rng(0)
        w = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
            [w],
        )
        root = pathlib.Path(tempfile.mkdtemp())
        onnx.save(helper.make_model(graph), root / "m.onnx")
        self.assertEqual(
            cli.main(
                [
                    "--onnx",
                    str(root / "m.onnx"),
                    "--input-shape",
                    "1,2,8,8",
                    "--out",
                    str(root / "rep"),
                    "--num-points",
                    "2",
                ]
            ),
            0,
        )
        data = _check_files(self, root / "rep", 1)
        self.assertAlmostEqual(
            data["network"]["lipschitz_upper"],
            data["layers"][0]["sigma_max"],
            delta=1e-4 * data["layers"][0]["sigma_max"],
        )

    def test_bad_input_shape(self):
        with self.assertRaisesRegex(ValueError, "input-shape"):
            cli._parse_shape("1,a,3")


if __name__ == "__main__":
    absltest.main()
