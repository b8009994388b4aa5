"""`train.bn_aware` and `train.batchnorm.BatchCentering`: BatchNorm-folded σ_max <= c after
certification against the float64 dense operator, the folded projection, fold discovery, the
Lipschitz target (raises when it cannot certify, records the bound), resume keeping the
constraint, and BatchCentering's semantics (a translation in eval mode: 1-Lipschitz)."""

import dataclasses
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from flax import nnx

import spectra
from train import bn_aware
from train import discovery
from train import lipschitz_target
from train import loop
from train import model_io
from train.batchnorm import BatchCentering
from train.batchnorm import recalibrate_batch_stats
from train.config import TrainConfig
from train.lapack_workaround import avoid_cpu_lapack_deadlock
from train.models.resnet import ResNet
from train.report import network_report_nnx

avoid_cpu_lapack_deadlock()


class ConvBN(nnx.Module):
    """conv -> BN -> relu -> conv(stride 2) -> BN -> mean pool -> dense: two folds."""

    def __init__(self, rngs: nnx.Rngs, *, square: bool = False):
        self.conv1 = nnx.Conv(1, 4, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, padding="SAME", use_bias=True, rngs=rngs)
        self.bn2 = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(6, 10, rngs=rngs)
        self.square = square

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.square:  # Not certifiable by composition: a product of two activations.
            h = h * h
        return self.head(h.mean(axis=(1, 2)))


def _randomise(model, seed=0):
    """Random gammas and running statistics (small variances: large folded norms)."""
    rng = np.random.default_rng(seed)
    for bn in (model.bn1, model.bn2):
        n = bn.num_features
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 3.0, n) * rng.choice([-1, 1], n),
                                    jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
        bn.mean[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
    return model


def _split(model):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.as_pure(params), nnx.as_pure(rest)


def _folded_exact(params, rest, specs, fold) -> float:
    """σ_max of the folded layer K · diag(gamma / sqrt(var + eps)): float64 SVD of the dense
    operator (eval-mode BatchNorm folded into the conv), the ground truth."""
    aligned = dict(zip(discovery.leaf_paths(params),
                       discovery.align_with_params(params, specs, "specs")))
    kernel = np.asarray(bn_aware._leaf_map(params)[fold.kernel], np.float64)
    scale = bn_aware.fold_scale(fold, params, rest, xp=np)
    with jax.enable_x64(True):
        dense = np.asarray(spectra.dense_operator(kernel * scale, aligned[fold.kernel]))
    return float(np.linalg.svd(dense, compute_uv=False)[0])


class FoldsTest(absltest.TestCase):

    def test_discovery(self):
        x = jnp.zeros((1, 12, 12, 1), jnp.float32)
        model = ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(0))
        folds = bn_aware.find_batchnorm_folds(model, x)
        self.assertEqual([f.module for f in folds], [
            "bn", "blocks/0/bn1", "blocks/0/bn2", "blocks/1/bn1", "blocks/1/bn2",
            "blocks/2/bn1", "blocks/2/bn2"])
        self.assertEqual(folds[1].kernel, "['blocks'][0]['conv1']['kernel']")
        # bn1 feeds conv2 through a ReLU only (its scale is normalised away by bn2 in training);
        # the stem's and bn2's outputs meet a shortcut.
        self.assertEqual([f.scale_free for f in folds],
                         [False, True, False, True, False, True, False])
        self.assertEqual(folds[1].var, "['blocks'][0]['bn1']['var']")
        self.assertEqual(bn_aware.find_dense_kernels(model, x), ("['head']['kernel']",))
        option_b = ResNet(8, 10, in_channels=1, width=4, shortcut="B", rngs=nnx.Rngs(0))
        self.assertLen(bn_aware.find_batchnorm_folds(option_b, x), 9)  # + 2 projections.
        centered = ResNet(8, 10, in_channels=1, width=4, norm="centering", rngs=nnx.Rngs(0))
        self.assertEqual(bn_aware.find_batchnorm_folds(centered, x), ())
        # The conv bias is a translation: conv2 (use_bias=True) still folds.
        self.assertLen(bn_aware.find_batchnorm_folds(ConvBN(nnx.Rngs(0)), x[:, :8, :8]), 2)

    def test_conv_output_used_twice_is_not_folded(self):
        class Twice(nnx.Module):
            def __init__(self, rngs):
                self.conv = nnx.Conv(1, 2, (3, 3), use_bias=False, rngs=rngs)
                self.bn = nnx.BatchNorm(2, rngs=rngs)

            def __call__(self, x):
                y = self.conv(x)
                return self.bn(y) + y

        x = jnp.zeros((1, 6, 6, 1), jnp.float32)
        self.assertEqual(bn_aware.find_batchnorm_folds(Twice(nnx.Rngs(0)), x), ())

    def test_certify_folded_against_dense_operator(self):
        model = _randomise(ConvBN(nnx.Rngs(1)))
        x = jnp.zeros((1, 8, 8, 1), jnp.float32)
        specs = discovery.find_convs_nnx(model, x)
        folds = bn_aware.find_batchnorm_folds(model, x)
        dense = bn_aware.find_dense_kernels(model, x)
        params, rest = _split(model)
        before = [_folded_exact(params, rest, specs, f) for f in folds]
        c = 0.75
        self.assertGreater(min(before), c)  # Both need a rescale.
        new, report = bn_aware.certify_folded(params, rest, specs, folds, c, dense=dense)
        self.assertTrue(report.certified)
        self.assertEqual(report.folded_with, ("bn1", "bn2", "dense"))
        for j, fold in enumerate(folds):
            exact = _folded_exact(new, rest, specs, fold)
            self.assertLessEqual(exact, c * (1 + 1e-4))
            self.assertGreaterEqual(report.upper_bounds[j], exact * (1 - 1e-9))  # A bound.
            self.assertGreater(exact, 0.5 * c)  # Rescaled to c, not far below (zero padded).
            # Only gamma changed; the kernel is untouched.
            np.testing.assert_array_equal(bn_aware._leaf_map(new)[fold.kernel],
                                          bn_aware._leaf_map(params)[fold.kernel])
        w = np.asarray(bn_aware._leaf_map(new)[dense[0]], np.float64)
        self.assertLessEqual(np.linalg.svd(w, compute_uv=False)[0], c * (1 + 1e-6))
        # The eval network of the returned params has the same folded operators: its output
        # changes only by the rescale (the kernels of the report match the model's).
        again, report2 = bn_aware.certify_folded(new, rest, specs, folds, c, dense=dense)
        self.assertFalse(report2.any_changed)
        meta = json.loads(json.dumps(report.as_metadata()))
        self.assertEqual(meta["certified_layers"][0]["folded_with"], "bn1")

    def test_projection_transform(self):
        model = _randomise(ConvBN(nnx.Rngs(2)), seed=3)
        x = jnp.zeros((1, 8, 8, 1), jnp.float32)
        specs = discovery.find_convs_nnx(model, x)
        folds = bn_aware.find_batchnorm_folds(model, x)
        params, rest = _split(model)
        c = 0.6
        for method in ("certified", "rescale"):
            tx = optax.chain(optax.sgd(0.01),
                             bn_aware.project_batchnorm_folded(c, specs, folds, method=method))
            state = tx.init(params)
            grads = jax.tree.map(jnp.ones_like, params)
            update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, batch_stats=rest))
            updates, state = update(grads, state, params)
            new = optax.apply_updates(params, updates)
            self.assertGreater(float(state[1].max_ratio), 1.0)
            for fold in folds:
                self.assertLessEqual(_folded_exact(new, rest, specs, fold), c * (1 + 1e-4))
            # Non-fold leaves got the plain SGD update.
            np.testing.assert_allclose(new["head"]["kernel"],
                                       params["head"]["kernel"] - 0.01, rtol=1e-6)
        # bn1 -> relu -> conv2: scale-free, set to exactly c (certified bound = c) from below.
        self.assertEqual([f.scale_free for f in folds], [True, False])
        initial = [bn_aware.folded_upper_bound(
            params[f"conv{i}"]["kernel"], bn_aware.fold_scale(f, params, rest, xp=np),
            specs[f"conv{i}"]["kernel"]) for i, f in ((1, folds[0]), (2, folds[1]))]
        small = 1.5 * max(initial)  # Both folds inside: only the scale-free one moves (up).
        tx = bn_aware.project_batchnorm_folded(small, specs, folds)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p, batch_stats=rest))(params)
        new = optax.apply_updates(params, updates)
        bound = bn_aware.folded_upper_bound(
            new["conv1"]["kernel"], bn_aware.fold_scale(folds[0], new, rest, xp=np),
            specs["conv1"]["kernel"])
        self.assertAlmostEqual(bound, small, delta=1e-4 * small)
        np.testing.assert_array_equal(new["bn2"]["scale"], params["bn2"]["scale"])  # Below.
        with self.assertRaisesRegex(ValueError, "batch_stats"):
            tx.update(grads, state, params)
        with self.assertRaisesRegex(ValueError, "method"):
            bn_aware.project_batchnorm_folded(c, specs, folds, method="sedghi")
        # 'power' (approximate) runs and rescales.
        tx = bn_aware.project_batchnorm_folded(c, specs, folds, method="power", num_rounds=4)
        state = tx.init(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        _, state = tx.update(zeros, state, params, batch_stats=rest)
        self.assertGreater(float(state.max_ratio), 1.0)


class BatchCenteringTest(absltest.TestCase):

    def test_train_and_eval_semantics(self):
        layer = BatchCentering(3, momentum=0.9, rngs=nnx.Rngs(0))
        layer.bias[...] = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
        x = np.random.default_rng(0).normal(size=(4, 5, 5, 3)).astype(np.float32) + 3.0
        y = layer(jnp.asarray(x))
        batch_mean = x.mean(axis=(0, 1, 2))
        np.testing.assert_allclose(y, x - batch_mean + np.asarray([0.5, -1.0, 2.0]), atol=1e-5)
        np.testing.assert_allclose(layer.mean[...], 0.1 * batch_mean, rtol=1e-5)
        layer.eval()
        z = layer(jnp.asarray(x))
        np.testing.assert_allclose(z, x - 0.1 * batch_mean + np.asarray([0.5, -1.0, 2.0]),
                                   atol=1e-5)
        # Eval mode is a translation: exactly 1-Lipschitz (differences are preserved).
        x2 = x + np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
        np.testing.assert_allclose(layer(jnp.asarray(x2)) - z, x2 - x, atol=1e-5)
        # Training mode (I - P) x: 1-Lipschitz too (an orthogonal projection's complement).
        layer.train()
        diff = np.asarray(layer(jnp.asarray(x2)) - layer(jnp.asarray(x)))
        self.assertLessEqual(np.linalg.norm(diff), np.linalg.norm(x2 - x) * (1 + 1e-6))
        with self.assertRaisesRegex(ValueError, "momentum"):
            BatchCentering(3, momentum=1.0, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "num_features"):
            layer(jnp.zeros((2, 4)))

    def test_recalibration_and_certified_bound_of_a_centered_resnet(self):
        x = np.random.default_rng(0).normal(size=(16, 12, 12, 1)).astype(np.float32)
        centered = ResNet(8, 10, in_channels=1, width=4, norm="centering", rngs=nnx.Rngs(0))
        new = recalibrate_batch_stats(centered, x, batch_size=8)
        h = np.asarray(new.conv(jnp.asarray(x)), np.float64)
        np.testing.assert_allclose(new.bn.mean[...], h.mean(axis=(0, 1, 2)), rtol=1e-4,
                                   atol=1e-6)
        # The same convs and classifier without normalisation: the certified bound of the
        # centered eval network is the same (a translation adds nothing), whatever its means
        # and biases.
        plain = ResNet(8, 10, in_channels=1, width=4, norm="none", rngs=nnx.Rngs(0))
        flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
        for path, var in nnx.to_flat_state(nnx.state(new, nnx.Param)):
            if path in flat:
                var[...] = flat[path][...]
            else:  # A BatchCentering bias.
                var[...] = jnp.full(var.shape, 0.7)
        for m in (new, plain):
            m.eval()
        bounds = [network_report_nnx(m, jnp.asarray(x[:1]), num_points=1,
                                     compute_spectra=False).network["lipschitz_upper"]
                  for m in (new, plain)]
        self.assertIsNotNone(bounds[0])
        self.assertAlmostEqual(bounds[0], bounds[1], delta=1e-9 * bounds[1])


# A tiny run: ConvBN on 8x8 digits (two folds and a dense head).
CONFIG = TrainConfig(
    dataset="digits", model="simple_cnn", batch_size=32, eval_batch_size=256, num_steps=6,
    lr=0.1, log_every=3, progress=False, project_max_norm=0.8, project_bn_aware=True,
    project_every=2, project_certify_recalibration_batches=3,
)


def _model(square=False):
    return ConvBN(nnx.Rngs(0), square=square)


class LoopTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def _folded_sigmas(self, model):
        x = jnp.zeros((1, 8, 8, 1), jnp.float32)
        specs = discovery.find_convs_nnx(model, x)
        params, rest = _split(model)
        return [_folded_exact(params, rest, specs, f)
                for f in bn_aware.find_batchnorm_folds(model, x)]

    def test_certified_and_resume_keeps_the_constraint(self):
        c = CONFIG.project_max_norm
        straight = loop.train_and_evaluate(CONFIG, self.root / "straight", model=_model())
        meta = straight["certification"]
        self.assertTrue(meta["certified"])
        self.assertTrue(meta["bn_aware"])
        self.assertEqual([layer["folded_with"] for layer in meta["certified_layers"]],
                         ["bn1", "bn2"])
        sigmas = self._folded_sigmas(straight["model"])
        self.assertLessEqual(max(sigmas), c * (1 + 1e-4))
        for sigma, layer in zip(sigmas, meta["certified_layers"], strict=True):
            self.assertLessEqual(sigma, layer["upper_bound"] * (1 + 1e-9))
        # What is saved is certified: the restored eval network's folded layers.
        restored, _, saved = model_io.restore_model(self.root / "straight", model=_model())
        self.assertLessEqual(max(self._folded_sigmas(restored)), c * (1 + 1e-4))
        self.assertTrue(saved["bn_aware"])

        # Stopped after 3 steps and resumed: the same projected trajectory and certificate.
        first = loop.train_and_evaluate(CONFIG, self.root / "resumed", until_step=3,
                                        model=_model())
        self.assertTrue(first["certification"]["bn_aware"])
        self.assertLessEqual(max(self._folded_sigmas(first["model"])), c * (1 + 1e-4))
        resumed = loop.train_and_evaluate(CONFIG, self.root / "resumed", resume=True,
                                          model=_model())
        for a, b in zip(jax.tree.leaves(nnx.state(straight["model"])),
                        jax.tree.leaves(nnx.state(resumed["model"])), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        self.assertEqual(straight["certification"], resumed["certification"])
        self.assertLessEqual(max(self._folded_sigmas(resumed["model"])), c * (1 + 1e-4))

    def test_lipschitz_target(self):
        # Derived radius L^(1/3) for 2 folded convs + 1 dense layer of a chain: certified.
        config = dataclasses.replace(CONFIG, project_max_norm=None, project_bn_aware=False,
                                     lipschitz_target=0.5, num_steps=4)
        result = loop.train_and_evaluate(config, self.root / "ok", model=_model())
        info = result["lipschitz"]
        self.assertTrue(info["lipschitz_certified"])
        self.assertLessEqual(info["lipschitz_upper"], 0.5 * (1 + 1e-4))
        self.assertGreaterEqual(info["lipschitz_upper"], info["lipschitz_lower"])
        self.assertAlmostEqual(info["per_layer_radius"], 0.5 ** (1 / 3))
        saved = json.loads((self.root / "ok" / lipschitz_target.LIPSCHITZ_FILE).read_text())
        self.assertEqual(saved["lipschitz_target"], 0.5)
        self.assertIn(saved["lipschitz_upper_kind"], ("proven", "probabilistic"))
        self.assertEqual(json.loads((self.root / "ok" / "config.json").read_text())[
            "project"]["max_norm"], None)  # The user's config; the radius is derived.
        # A radius too large for the target: an error naming the largest layer.
        too_small = dataclasses.replace(config, project_max_norm=1.0, lipschitz_target=1e-3)
        with self.assertRaisesRegex(lipschitz_target.LipschitzTargetError, "largest layer"):
            loop.train_and_evaluate(too_small, self.root / "small", model=_model())
        self.assertFalse(json.loads((self.root / "small" / lipschitz_target.LIPSCHITZ_FILE)
                                    .read_text())["lipschitz_certified"])
        # An op that the composition cannot certify: an error naming it.
        with self.assertRaisesRegex(ValueError, "mul of two input-dependent values"):
            loop.train_and_evaluate(config, self.root / "square", model=_model(square=True))

    def test_config_validation(self):
        for bad in (0, -1.0, float("nan"), float("inf"), True):
            with self.assertRaisesRegex(ValueError, "lipschitz_target"):
                TrainConfig(lipschitz_target=bad)
        with self.assertRaisesRegex(ValueError, "project_bn_aware"):
            TrainConfig(project_bn_aware=True)
        with self.assertRaisesRegex(ValueError, "project_method"):
            TrainConfig(project_bn_aware=True, project_max_norm=1.0, project_method="sedghi")
        self.assertEqual(TrainConfig(lipschitz_target=2).lipschitz_target, 2)


if __name__ == "__main__":
    absltest.main()
