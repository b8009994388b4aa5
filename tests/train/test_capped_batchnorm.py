"""`train.capped_batchnorm.CappedBatchNorm`: the training- and evaluation-mode forward apply the
capped folded operator (σ_max against the float64 dense operator), the end-of-run certification
(`train.bn_aware`) makes it exact, the ResNet option and the loop, and named errors."""

import dataclasses
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx
from flax.core import FrozenDict

import spectra
from spectra import ConvSpec
from train import bn_aware
from train import discovery
from train import loop
from train.capped_batchnorm import CappedBatchNorm
from train.capped_batchnorm import capped_excess
from train.capped_batchnorm import capped_layers
from train.capped_batchnorm import resnet_kernels
from train.config import TrainConfig
from train.lapack_workaround import avoid_cpu_lapack_deadlock
from train.models.resnet import ResNet

avoid_cpu_lapack_deadlock()


def _dense_sigma(kernel, scale, spec) -> float:
    """Exact σ_max of the zero-padded layer ``kernel · diag(scale)`` (float64 dense SVD)."""
    with jax.enable_x64(True):
        folded = jnp.asarray(np.asarray(kernel, np.float64) * np.asarray(scale, np.float64))
        return float(np.linalg.norm(np.asarray(spectra.dense_operator(folded, spec)), 2))


def _kernels(model: ResNet) -> dict:
    out = {"bn": model.conv.kernel[...]}
    for i, block in enumerate(model.blocks):
        out[f"blocks/{i}/bn1"] = block.conv1.kernel[...]
        out[f"blocks/{i}/bn2"] = block.conv2.kernel[...]
    assert {k: np.asarray(v).tolist() for k, v in resnet_kernels(model).items()} == {
        k: np.asarray(v).tolist() for k, v in out.items()}
    return out


class LayerTest(absltest.TestCase):

    def _layer(self, estimate, cap=0.7):
        spec = ConvSpec((6, 6))
        kernel = 2.0 * jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
        layer = CappedBatchNorm(3, cap=cap, spec=spec, kernel_shape=kernel.shape,
                                estimate=estimate, momentum=0.0, rngs=nnx.Rngs(0))
        layer.scale[...] = jnp.asarray([3.0, 0.5, 1.5], layer.scale.dtype)
        layer.bias[...] = jnp.asarray([0.2, -0.1, 0.3], layer.bias.dtype)
        x = jax.random.normal(jax.random.key(2), (16, 6, 6, 2))
        return layer, kernel, spec, x

    def test_train_and_eval_forward_apply_the_capped_operator(self):
        for estimate in ("circulant", "padded"):
            layer, kernel, spec, x = self._layer(estimate)
            y_conv = spectra.conv(kernel, x, spec)
            for _ in range(60):  # Power steps (one per training-mode call).
                y = layer(y_conv, kernel)
            # Training mode: batch statistics, r = min(1, c / σ̂) from the updated vector.
            mean = np.mean(np.asarray(y_conv, np.float64), axis=(0, 1, 2))
            var = np.var(np.asarray(y_conv, np.float64), axis=(0, 1, 2))
            s = np.asarray(layer.scale[...], np.float64) / np.sqrt(var + layer.epsilon)
            sigma_hat = float(layer.folded_sigma_estimate(kernel, jnp.asarray(s, jnp.float32)))
            r = min(1.0, layer.cap / sigma_hat)
            expected = r * ((np.asarray(y_conv) - mean) * s + np.asarray(layer.bias[...]))
            np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-4, atol=2e-5)
            self.assertLess(r, 0.5)  # The cap is active.
            train_sigma = _dense_sigma(kernel, s * r, spec)
            # Eval mode (running statistics = the last batch's, momentum 0): the same.
            layer.eval()
            y_eval = layer(y_conv, kernel)
            np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y), rtol=2e-4, atol=2e-5)
            eval_sigma = _dense_sigma(kernel, layer.applied_scale(kernel), spec)
            c = layer.cap
            circ = bn_aware.folded_upper_bound(kernel, layer.applied_scale(kernel), spec)
            if estimate == "circulant":  # σ̂ -> the circulant σ_max >= the zero-padded one.
                self.assertLessEqual(eval_sigma, c * (1 + 1e-4))
                self.assertLessEqual(train_sigma, c * (1 + 1e-4))
                self.assertBetween(circ / c, 1 - 1e-5, 1.02)  # σ̂ <= circulant σ_max.
            else:  # σ̂ -> the zero-padded σ_max itself, from below.
                self.assertBetween(eval_sigma / c, 1 - 1e-5, 1.02)
                self.assertBetween(train_sigma / c, 1 - 1e-5, 1.02)
                self.assertGreater(circ, eval_sigma)

    def test_estimate_is_below_the_exact_value(self):
        # A Rayleigh quotient from below, whatever the vector: never above σ_max(F).
        layer, kernel, spec, _ = self._layer("padded")
        s = jnp.asarray([1.0, 2.0, 0.5])
        exact = _dense_sigma(kernel, s, spec)
        self.assertLessEqual(float(layer.folded_sigma_estimate(kernel, s)), exact * (1 + 1e-5))

    def test_errors_name_the_argument(self):
        spec = ConvSpec((6, 6))
        good = dict(cap=1.0, spec=spec, kernel_shape=(3, 3, 2, 3), rngs=nnx.Rngs(0))
        for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1", None):
            with self.assertRaisesRegex(ValueError, "cap="):
                CappedBatchNorm(3, **{**good, "cap": bad})
        for name, bad in (("estimate", "lanczos"), ("power_iterations", 0),
                          ("kernel_shape", (3, 3, 2, 4)), ("spec", (6, 6))):
            with self.assertRaisesRegex(ValueError, f"{name}="):
                CappedBatchNorm(3, **{**good, name: bad})
        layer = CappedBatchNorm(3, **good)
        with self.assertRaisesRegex(ValueError, "kernel_shape"):
            layer(jnp.zeros((1, 6, 6, 3)), jnp.zeros((3, 3, 1, 3)))
        for kwargs, name in ((dict(norm="capped", input_size=8), "cap="),
                             (dict(norm="capped", cap=-1.0, input_size=8), "cap="),
                             (dict(norm="capped", cap=1.0), "input_size="),
                             (dict(norm="batchnorm", cap=1.0), "cap="),
                             (dict(norm="capped", cap=1.0, input_size=8, cap_estimate="x"),
                              "cap_estimate=")):
            with self.assertRaisesRegex(ValueError, name):
                ResNet(8, 10, in_channels=1, width=2, rngs=nnx.Rngs(0), **kwargs)


class ResNetTest(absltest.TestCase):

    def test_certification_makes_the_eval_network_exact(self):
        c = 1.5
        model = ResNet(8, 10, in_channels=1, width=2, norm="capped", cap=c, input_size=6,
                       stage_strides=(1, 2, 1), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(0), (32, 6, 6, 1))
        for _ in range(20):  # Training-mode calls: power steps and running statistics.
            model(x)
        model.eval()
        example = x[:1]
        folds = bn_aware.find_batchnorm_folds(model, example)
        self.assertEqual(len(folds), 7)  # Every capped layer is a fold of the certification.
        self.assertEqual(sorted(f.module for f in folds),
                         sorted(path for path, _ in capped_layers(model)))
        kernels = _kernels(model)
        excess = capped_excess(model, kernels)
        self.assertLess(max(excess.values()), 1.2)  # 20 power steps: close to the cap.
        before = model(x)
        specs = discovery.find_convs_nnx(model, example)
        params = nnx.state(model, nnx.Param)
        rest = nnx.state(model, nnx.Not(nnx.Param))
        new, report = bn_aware.certify_folded(params, rest, specs, folds, c)
        nnx.update(model, new)
        self.assertTrue(all(u <= c * (1 + 1e-4) for u in report.upper_bounds))
        # The applied eval operators, exact (dense, float64): <= c.
        for path, layer in capped_layers(model):
            kernel = _kernels(model)[path]
            sigma = _dense_sigma(kernel, layer.applied_scale(kernel), layer.spec)
            self.assertLessEqual(sigma, c * (1 + 1e-4), path)
        # The rescale of (gamma, beta) commutes with the cap: the function changes by at most
        # the estimate's residual excess.
        after = model(x)
        ratio = np.linalg.norm(np.asarray(after)) / np.linalg.norm(np.asarray(before))
        self.assertGreater(ratio, 0.5)


def _loop_config(c: float) -> TrainConfig:
    """A 4-step digits ResNet-8 capped at ``c``, certified by the loop only (no projection)."""
    return TrainConfig(
        dataset="digits", model="resnet8", width=2, batch_size=32, eval_batch_size=512,
        num_steps=4, lr=0.05, log_every=2, progress=False,
        model_kwargs=FrozenDict(norm="capped", cap=c),
        project_bn_aware=True, project_max_norm=c, project_every=10**6,
        project_certify_recalibration_batches=2,
    )


class LoopTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_loop_certifies_the_capped_resnet(self):
        c = 1.5
        config = _loop_config(c)
        result = loop.train_and_evaluate(config, self.root / "run")
        meta = result["certification"]
        self.assertTrue(meta["bn_aware"])
        self.assertEqual(len([r for r in meta["certified_layers"] if r["folded_with"]]), 7)
        model = result["model"]
        model.eval()
        kernels = _kernels(model)
        for path, layer in capped_layers(model):
            sigma = _dense_sigma(kernels[path], layer.applied_scale(kernels[path]), layer.spec)
            self.assertLessEqual(sigma, c * (1 + 1e-4), path)
        # The old config round trip: the model option survives config.json.
        loaded = TrainConfig.from_json(config.to_json())
        self.assertEqual(dict(loaded.model_kwargs), {"norm": "capped", "cap": c})
        self.assertEqual(dataclasses.replace(loaded), config)

    def test_resume_keeps_the_cap_bit_identical(self):
        # The power vectors and the cap survive a restart: resumed == uninterrupted, certified.
        c = 1.5
        config = _loop_config(c)
        straight = loop.train_and_evaluate(config, self.root / "straight")
        first = loop.train_and_evaluate(config, self.root / "resumed", until_step=2)
        self.assertEqual(first["step"], 2)
        resumed = loop.train_and_evaluate(config, self.root / "resumed", resume=True)
        self.assertEqual(resumed["step"], 4)
        a, b = (nnx.state(r["model"]) for r in (straight, resumed))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        self.assertEqual(straight["test_accuracy"], resumed["test_accuracy"])
        self.assertTrue(resumed["certification"]["bn_aware"])


if __name__ == "__main__":
    absltest.main()
