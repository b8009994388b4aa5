"""`train.batchnorm`: BatchNorm recalibration against statistics computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from train import batchnorm
from train.data import Pipeline

EPS = 1e-5


class TwoBN(nnx.Module):
    """conv -> bn1 -> relu -> conv -> bn2 -> mean pool -> linear (two BatchNorms in a row)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 3, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, momentum=0.9, epsilon=EPS, rngs=rngs)
        self.conv2 = nnx.Conv(3, 2, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2, momentum=0.9, epsilon=EPS, rngs=rngs)
        self.head = nnx.Linear(2, 4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.head(h.mean(axis=(1, 2)))


def _model():
    model = TwoBN(nnx.Rngs(0))
    # Non-trivial affine parameters and wrong ("stale") running statistics.
    model.bn1.scale[...] = jnp.asarray([0.5, 2.0, 1.5], jnp.float32)
    model.bn1.bias[...] = jnp.asarray([0.1, -0.3, 0.2], jnp.float32)
    for bn in (model.bn1, model.bn2):
        bn.mean[...] = jnp.full(bn.mean.shape, 7.0, jnp.float32)
        bn.var[...] = jnp.full(bn.var.shape, 50.0, jnp.float32)
    return model


def _images(n, seed=0):
    # float32 like a Pipeline's batches (the model's parameters and statistics are float32).
    return (np.random.default_rng(seed).normal(size=(n, 6, 6, 1)) + 0.5).astype(np.float32)


def _batch_stats_by_hand(model, x):
    """Per-channel (mean, biased var) of the inputs of bn1 and bn2 on the batch ``x``, with
    bn1 normalising by the batch's own statistics (training mode), in float64 numpy from the
    float32 conv outputs."""
    h1 = np.asarray(model.conv1(jnp.asarray(x)), np.float64)
    m1, v1 = h1.mean(axis=(0, 1, 2)), h1.var(axis=(0, 1, 2))
    scale, bias = np.asarray(model.bn1.scale[...]), np.asarray(model.bn1.bias[...])
    z = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * scale + bias, 0.0)
    h2 = np.asarray(model.conv2(jnp.asarray(z, jnp.float32)), np.float64)
    m2, v2 = h2.mean(axis=(0, 1, 2)), h2.var(axis=(0, 1, 2))
    return {"bn1": (m1, v1), "bn2": (m2, v2)}


def _stats(model):
    return {
        name: (np.asarray(layer.mean[...]), np.asarray(layer.var[...]))
        for name, layer in batchnorm.batch_norm_layers(model)
    }


def _assert_stats(test, got, expected, rtol=1e-5):
    test.assertEqual(sorted(got), sorted(expected))
    for name in expected:
        for g, e in zip(got[name], expected[name]):
            np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-5, err_msg=name)


def _state_leaves(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.as_pure(nnx.state(model)))]


class RecalibrateTest(parameterized.TestCase):

    def test_exact_average_over_array_batches(self):
        model = _model()
        x = _images(24)
        new = batchnorm.recalibrate_batch_stats(model, x, batch_size=8)  # 3 batches of 8.
        per_batch = [_batch_stats_by_hand(model, x[b * 8:(b + 1) * 8]) for b in range(3)]
        expected = {
            name: tuple(np.mean([s[name][i] for s in per_batch], axis=0) for i in range(2))
            for name in ("bn1", "bn2")
        }
        _assert_stats(self, _stats(new), expected)
        # Not the statistics of the union: the average of batch variances is smaller by the
        # variance of the batch means (equal batch sizes).
        union = _batch_stats_by_hand(model, x)["bn1"]
        means = np.stack([s["bn1"][0] for s in per_batch])
        np.testing.assert_allclose(expected["bn1"][1] + means.var(axis=0), union[1], rtol=1e-10)

    def test_eval_output_on_the_only_batch_equals_training_output(self):
        # Recalibrated on one batch, eval mode on it reproduces training mode on it exactly.
        model = _model()
        x = _images(16, seed=1)
        new = batchnorm.recalibrate_batch_stats(model, x, num_batches=1)
        new.eval()
        trained = nnx.clone(model)
        trained.train()
        np.testing.assert_allclose(np.asarray(new(jnp.asarray(x))),
                                   np.asarray(trained(jnp.asarray(x))), rtol=1e-5, atol=1e-5)
        stale = nnx.clone(model)
        stale.eval()
        self.assertGreater(
            np.abs(np.asarray(stale(jnp.asarray(x))) - np.asarray(new(jnp.asarray(x)))).max(), 0.1
        )

    def test_pipeline_drops_padding_and_reads_num_batches(self):
        model = _model()
        x = _images(20, seed=2)
        labels = np.zeros(20, np.int32)
        # 8 + 8 + 4 real examples (the last batch padded with 4 masked zero images).
        source = Pipeline(x, labels, 8, normalize=False, drop_remainder=False)
        new = batchnorm.recalibrate_batch_stats(model, source)
        parts = [x[:8], x[8:16], x[16:]]
        per_batch = [_batch_stats_by_hand(model, p) for p in parts]
        expected = {
            name: tuple(np.mean([s[name][i] for s in per_batch], axis=0) for i in range(2))
            for name in ("bn1", "bn2")
        }
        _assert_stats(self, _stats(new), expected)
        first_two = batchnorm.recalibrate_batch_stats(model, source, 2)
        expected2 = {
            name: tuple(np.mean([s[name][i] for s in per_batch[:2]], axis=0) for i in range(2))
            for name in ("bn1", "bn2")
        }
        _assert_stats(self, _stats(first_two), expected2)

    def test_more_batches_than_an_epoch_read_the_next_epochs(self):
        model = _model()
        x = _images(16, seed=3)
        source = Pipeline(x, np.zeros(16, np.int32), 8, shuffle=True, seed=5,
                          normalize=False, drop_remainder=True)
        batches = [b.images for b in source.batches(0)] + [next(source.batches(1)).images]
        new = batchnorm.recalibrate_batch_stats(model, source, 3)
        per_batch = [_batch_stats_by_hand(model, b) for b in batches]
        expected = {
            name: tuple(np.mean([s[name][i] for s in per_batch], axis=0) for i in range(2))
            for name in ("bn1", "bn2")
        }
        _assert_stats(self, _stats(new), expected)

    @parameterized.parameters(0.0, 0.5, 0.9)
    def test_momentum_is_an_ema_started_at_the_first_batch(self, momentum):
        model = _model()
        x = _images(24, seed=4)
        new = batchnorm.recalibrate_batch_stats(model, x, momentum=momentum, batch_size=8)
        expected = None
        for b in range(3):
            stats = _batch_stats_by_hand(model, x[b * 8:(b + 1) * 8])
            if expected is None:
                expected = stats
            else:
                expected = {
                    name: tuple(momentum * e + (1 - momentum) * s
                                for e, s in zip(expected[name], stats[name]))
                    for name in stats
                }
        _assert_stats(self, _stats(new), expected)

    def test_input_model_untouched_and_modes_kept(self):
        model = _model()
        model.eval()
        before = _state_leaves(model)
        new = batchnorm.recalibrate_batch_stats(model, _images(8), num_batches=1)
        self.assertIsNot(new, model)
        for a, b in zip(before, _state_leaves(model)):
            np.testing.assert_array_equal(a, b)
        self.assertTrue(model.bn1.use_running_average)
        self.assertTrue(new.bn1.use_running_average and new.bn2.use_running_average)
        self.assertEqual((new.bn1.momentum, new.bn2.momentum), (0.9, 0.9))
        # Parameters are copied unchanged; only the statistics moved.
        np.testing.assert_array_equal(new.conv1.kernel[...], model.conv1.kernel[...])
        self.assertFalse(np.allclose(new.bn1.mean[...], model.bn1.mean[...]))
        self.assertEqual(new.bn1.mean[...].dtype, model.bn1.mean[...].dtype)

    def test_model_without_batch_norm_is_returned_unchanged(self):
        model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.relu)
        self.assertEqual(batchnorm.batch_norm_layers(model), [])
        new = batchnorm.recalibrate_batch_stats(model, np.ones((4, 3)))
        self.assertIsNot(new, model)
        for a, b in zip(_state_leaves(model), _state_leaves(new)):
            np.testing.assert_array_equal(a, b)

    def test_one_compilation_per_architecture(self):
        model = _model()
        x = _images(8, seed=5)
        batchnorm.recalibrate_batch_stats(model, x)
        hits = batchnorm._batch_statistics_fn.cache_info().hits
        other = nnx.clone(model)
        other.conv1.kernel[...] = other.conv1.kernel[...] * 2.0
        batchnorm.recalibrate_batch_stats(other, x)
        self.assertEqual(batchnorm._batch_statistics_fn.cache_info().hits, hits + 1)

    def test_argument_errors(self):
        model, x = _model(), _images(8)
        for bad in (0, -1, 1.5):
            with self.assertRaisesRegex(ValueError, "num_batches"):
                batchnorm.recalibrate_batch_stats(model, x, bad)
        for bad in (1.0, -0.1, "0.9"):
            with self.assertRaisesRegex(ValueError, "momentum"):
                batchnorm.recalibrate_batch_stats(model, x, momentum=bad)
        with self.assertRaisesRegex(ValueError, "batch_size"):
            batchnorm.recalibrate_batch_stats(model, x, batch_size=0)
        with self.assertRaisesRegex(ValueError, "num_batches=3 exceeds"):
            batchnorm.recalibrate_batch_stats(model, x, 3, batch_size=4)
        with self.assertRaisesRegex(ValueError, "data"):
            batchnorm.recalibrate_batch_stats(model, np.zeros((0, 6, 6, 1)))


if __name__ == "__main__":
    absltest.main()
