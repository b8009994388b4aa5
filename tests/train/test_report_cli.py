"""`python -m train.report` / `write_report`: the files it writes."""

import json
import pathlib
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from tests.train import fixtures
from train import report
from train.models.onnx.model import parse_input_shape
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



def _tmpdir(test: absltest.TestCase) -> pathlib.Path:
    """A fresh folder removed when ``test`` ends."""
    path = pathlib.Path(tempfile.mkdtemp())
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

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
        out = _tmpdir(self) / "out"
        report.write_report(r, out)
        data = _check_files(self, out, 2)
        self.assertEqual(data["layers"][0]["padding"], "CIRCULAR")
        self.assertEqual(data["layers"][0]["sigma_max_method"], "fft")
        self.assertIsNone(data["layers"][1]["sigma_max_residual"])  # dense: exact
        self.assertAlmostEqual(
            data["network"]["lipschitz_upper_naive"], r.layers[0].sigma_max * r.layers[1].sigma_max
        )


class CliTest(absltest.TestCase):
    def test_run_dir(self):
        from train import train_and_evaluate

        root = _tmpdir(self)
        train_and_evaluate(fixtures.RESNET8_TWO_STEPS, root / "run")
        self.assertEqual(
            cli.main(["--run", str(root / "run"), "--out", str(root / "rep"), "--num-points", "2"]),
            0,
        )
        data = _check_files(self, root / "rep", 8)  # 7 convs + the classifier.
        self.assertIsNotNone(data["network"]["lipschitz_upper"])
        # The witness beside report.json, the layer stage checkpointed in --out.
        witness = data["network"]["lipschitz_lower_witness"]
        self.assertTrue((root / "rep" / witness["file"]).exists())
        self.assertTrue((root / "rep" / "stages" / "layers.partial.json").exists())
        self.assertEqual(data["network"]["errors"], [])
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
        root = _tmpdir(self)
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

    def test_onnx_batch_norm_split_max_pool(self):
        """A YOLO-like ONNX graph: Conv + BatchNormalization + SiLU, Split, MaxPool, Concat.

        ``bn_folded_sigma_max`` equals σ_max of the kernel folded by
        :func:`train.models.fold_batch_norm` (dense operator, float64 SVD); the certified bound
        holds on random pairs (difference quotients) and is >= the Jacobian lower bound.
        """
        import onnx
        from onnx import helper
        from onnx import numpy_helper

        import spectra
        from train.models import fold_batch_norm
        from train.models import from_onnx

        rng = np.random.default_rng(1)
        arrays = {
            "w": rng.normal(size=(4, 2, 3, 3)),
            "g": rng.uniform(0.5, 2.0, 4),
            "b": rng.normal(size=4),
            "m": rng.normal(size=4),
            "v": rng.uniform(0.5, 2.0, 4),
            "w2": rng.normal(size=(3, 6, 1, 1)),
            "sp": np.array([2, 2]),
        }
        inits = [
            numpy_helper.from_array(a.astype(np.int64 if k == "sp" else np.float32), k)
            for k, a in arrays.items()
        ]
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
            helper.make_node("Sigmoid", ["n"], ["s"]),
            helper.make_node("Mul", ["n", "s"], ["a"]),
            helper.make_node("Split", ["a", "sp"], ["a1", "a2"], axis=1),
            helper.make_node(
                "MaxPool", ["a2"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]
            ),
            helper.make_node("Concat", ["a1", "a2", "p"], ["cat"], axis=1),
            helper.make_node("Conv", ["cat", "w2"], ["y"], name="head"),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
            inits,
        )
        root = _tmpdir(self)
        path = root / "m.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        r = report.report_onnx(path, (1, 2, 8, 8), num_points=2)
        conv = next(layer for layer in r.layers if layer.name.startswith("conv"))
        model = from_onnx(str(path), input_shape=(1, 2, 8, 8))
        folded, folds = fold_batch_norm(model)
        self.assertLen(folds, 1)
        kernel = np.asarray(folded.params["conv"]["W"], np.float64)
        self.assertEqual(kernel.shape, tuple(conv.kernel_shape))
        spec = spectra.ConvSpec((8, 8), padding=((1, 1), (1, 1)))
        op = np.asarray(spectra.dense_operator(kernel, spec))
        expected = np.linalg.svd(op, compute_uv=False)[0]
        self.assertAlmostEqual(conv.bn_folded_sigma_max, expected, delta=1e-4 * expected)
        self.assertLess(conv.bn_folded_sigma_max, conv.sigma_max * 10)
        upper = r.network["lipschitz_upper"]
        self.assertIsNotNone(upper, r.network["lipschitz_upper_note"])
        self.assertGreaterEqual(upper, r.network["lipschitz_lower"])
        x = rng.normal(size=(64, 1, 2, 8, 8)).astype(np.float32)
        dx = 1e-2 * rng.normal(size=x.shape).astype(np.float32)
        for a, d in zip(x, dx):
            fa = np.asarray(model.apply_fn(model.params, jnp.asarray(a))[0])
            fb = np.asarray(model.apply_fn(model.params, jnp.asarray(a + d))[0])
            self.assertLessEqual(np.linalg.norm(fa - fb) / np.linalg.norm(d), upper * 1.001)

    def test_bad_input_shape(self):
        with self.assertRaisesRegex(ValueError, "input-shape"):
            parse_input_shape("1,a,3")
        with self.assertRaisesRegex(ValueError, "input-shape"):
            parse_input_shape("1,0,3")
        self.assertEqual(parse_input_shape("1x3x8x8"), (1, 3, 8, 8))


if __name__ == "__main__":
    absltest.main()
