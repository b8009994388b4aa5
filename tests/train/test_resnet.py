"""`train.models`: CIFAR ResNets (He et al. 2016) and SimpleCNN in Flax NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import train
from train import models

#: One jitted forward for every test (eager NNX calls compile every op separately: slower).
_apply = nnx.jit(lambda model, x: model(x))


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _abstract(factory, *args, **kwargs):
    """The model with abstract parameters (shapes only): cheap to count."""
    return nnx.eval_shape(lambda: factory(*args, rngs=nnx.Rngs(0), **kwargs))


def _hand_count(n, width=16, in_channels=3, num_classes=10, shortcut="A"):
    """Trainable parameters of the CIFAR ResNet of depth 6n + 2, counted layer by layer."""
    conv3 = lambda c_in, c_out: 9 * c_in * c_out  # noqa: E731  (no bias)
    bn = lambda c: 2 * c  # noqa: E731  (scale and bias; running stats are not parameters)
    total = conv3(in_channels, width) + bn(width)
    c_in = width
    for c_out in (width, 2 * width, 4 * width):
        for block in range(n):
            total += conv3(c_in, c_out) + bn(c_out) + conv3(c_out, c_out) + bn(c_out)
            if block == 0 and c_in != c_out and shortcut == "B":
                total += c_in * c_out + bn(c_out)  # 1x1 projection + BN
            c_in = c_out
    return total + c_in * num_classes + num_classes  # linear head


class ParameterCountTest(parameterized.TestCase):

    def test_resnet20_option_a_exact(self):
        # 432 + 32 (stem) + 14,016 (stage 1) + 51,072 (stage 2) + 203,520 (stage 3) + 650 (head).
        model = _abstract(models.resnet20)
        self.assertEqual(models.count_params(model), 269_722)

    def test_resnet20_option_b_exact(self):
        # Option A + 1x1 projections with BN: 16*32 + 64 + 32*64 + 128 = 2,752.
        model = _abstract(models.resnet20, shortcut="B")
        self.assertEqual(models.count_params(model), 272_474)

    @parameterized.product(
        depth=[20, 32, 56, 110], shortcut=["A", "B"],
    )
    def test_counts_match_hand_count(self, depth, shortcut):
        model = _abstract(models.ResNet, depth, 10, shortcut=shortcut)
        expected = _hand_count((depth - 2) // 6, shortcut=shortcut)
        self.assertEqual(models.count_params(model), expected)

    def test_named_constructors(self):
        expected = {
            models.resnet20: 269_722,
            models.resnet32: 464_154,
            models.resnet56: 853_018,
            models.resnet110: 1_727_962,
        }
        for factory, count in expected.items():
            self.assertEqual(models.count_params(_abstract(factory)), count)

    def test_digits_and_cifar100_counts(self):
        model = _abstract(models.resnet20, 10, in_channels=1)
        self.assertEqual(models.count_params(model), _hand_count(3, in_channels=1))
        model = _abstract(models.resnet20, 100)
        self.assertEqual(models.count_params(model), _hand_count(3, num_classes=100))
        model = _abstract(models.ResNet, 8, 10, width=4, stage_strides=(1, 2, 1))
        self.assertEqual(models.count_params(model), _hand_count(1, width=4))

    def test_simple_cnn_count(self):
        self.assertEqual(
            models.count_params(_abstract(models.SimpleCNN, 10, in_channels=1)), 14_378
        )
        self.assertEqual(models.count_params(_abstract(models.SimpleCNN, 10)), 14_666)

    def test_batch_stats_are_not_params(self):
        model = _abstract(models.resnet20)
        stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
        # 19 BatchNorms (stem + 2 per block), mean and var each.
        self.assertLen(stats, 2 * 19)


class ShapeTest(parameterized.TestCase):

    @parameterized.product(
        padding=["SAME", "CIRCULAR"],
        shortcut=["A", "B"],
        image_shape=[(8, 8, 1), (32, 32, 3)],
    )
    def test_output_shape(self, padding, shortcut, image_shape):
        # Abstract evaluation (shapes and dtypes only); the numerics are exercised below.
        model = _abstract(
            models.ResNet, 20, 7, in_channels=image_shape[-1], padding=padding,
            shortcut=shortcut,
        )
        out = nnx.eval_shape(lambda m, x: m(x), model, _images((3, *image_shape)))
        self.assertEqual(out.shape, (3, 7))
        self.assertEqual(out.dtype, jnp.float32)

    def test_resnet20_digits_forward_and_he_init(self):
        model = models.resnet20(10, in_channels=1, rngs=nnx.Rngs(0))
        out = _apply(model, _images((2, 8, 8, 1)))
        self.assertEqual(out.shape, (2, 10))
        self.assertTrue(np.all(np.isfinite(out)))
        # He init, N(0, 2 / fan_in), for every conv kernel: normalised weights have std 1.
        convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
        self.assertLen(convs, 19)
        scaled = np.concatenate([
            np.ravel(conv.kernel.get_value()) / np.sqrt(2.0 / np.prod(conv.kernel.shape[:3]))
            for conv in convs
        ])  # 268,848 weights
        self.assertAlmostEqual(float(np.std(scaled)), 1.0, delta=0.01)
        self.assertAlmostEqual(float(np.mean(scaled)), 0.0, delta=0.01)
        self.assertGreater(float(np.max(np.abs(scaled))), 4.0)  # not truncated at 2 sigma

    def test_stage_strides(self):
        model = _abstract(
            models.ResNet, 8, 4, in_channels=1, width=4, stage_strides=(1, 2, 1), shortcut="B"
        )
        self.assertEqual([block.stride for block in model.blocks], [1, 2, 1])
        self.assertIsNotNone(model.blocks[2].proj)  # channels change at stride 1
        out = nnx.eval_shape(lambda m, x: m(x), model, _images((2, 8, 8, 1)))
        self.assertEqual(out.shape, (2, 4))

    @parameterized.parameters(("SAME", (8, 8, 1)), ("CIRCULAR", (32, 32, 3)))
    def test_simple_cnn(self, padding, shape):
        model = models.SimpleCNN(
            5, in_channels=shape[-1], padding=padding, features=(4, 8), rngs=nnx.Rngs(0)
        )
        out = _apply(model, _images((2, *shape)))
        self.assertEqual(out.shape, (2, 5))
        self.assertTrue(np.all(np.isfinite(out)))

    def test_shortcut_option_a(self):
        x = _images((2, 4, 6, 3))
        out = models.shortcut_option_a(x, 8, 2)
        self.assertEqual(out.shape, (2, 2, 3, 8))
        # (8 - 3) // 2 = 2 zero channels, x's 3 channels, 3 zero channels.
        np.testing.assert_array_equal(out[..., 2:5], x[:, ::2, ::2, :])
        np.testing.assert_array_equal(out[..., :2], 0)
        np.testing.assert_array_equal(out[..., 5:], 0)
        np.testing.assert_array_equal(models.shortcut_option_a(x, 3, 1), x)

    def test_block_structure(self):
        model = _abstract(models.resnet20, shortcut="A")
        self.assertLen(model.blocks, 9)
        strides = [block.stride for block in model.blocks]
        self.assertEqual(strides, [1, 1, 1, 2, 1, 1, 2, 1, 1])
        self.assertTrue(all(block.proj is None for block in model.blocks))
        model_b = _abstract(models.resnet20, shortcut="B")
        with_proj = [i for i, block in enumerate(model_b.blocks) if block.proj is not None]
        self.assertEqual(with_proj, [3, 6])

    def test_convs_have_no_bias(self):
        model = _abstract(models.resnet20, padding="CIRCULAR", shortcut="B")
        convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
        self.assertLen(convs, 21)
        for conv in convs:
            self.assertIsNone(conv.bias)
            self.assertEqual(conv.padding, "CIRCULAR")

    @parameterized.parameters(
        dict(depth=21), dict(depth=2), dict(padding="VALID"), dict(shortcut="C"),
        dict(num_classes=0), dict(stage_strides=(1, 2)), dict(stage_strides=(1, 3, 2)),
    )
    def test_bad_arguments(self, **kwargs):
        args = dict(depth=20, num_classes=10) | kwargs
        with self.assertRaisesRegex(ValueError, "|".join(kwargs)):  # the message names it
            models.ResNet(args.pop("depth"), args.pop("num_classes"), rngs=nnx.Rngs(0), **args)

    def test_param_dtype_float64(self):
        model = _abstract(models.ResNet, 8, 3, width=2, param_dtype=jnp.float64)
        model.eval()  # nnx.BatchNorm keeps float32 running statistics
        self.assertEqual(model.conv.kernel.get_value().dtype, jnp.float64)
        out = nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((1, 8, 8, 3), jnp.float64))
        self.assertEqual(out.dtype, jnp.float64)


class BatchNormTest(absltest.TestCase):

    def test_train_vs_eval(self):
        model = models.ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(0))
        x = _images((6, 8, 8, 1))
        stats_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
        # A fresh model trains: batch statistics, so an example's output depends on the batch,
        # and the running averages move.
        self.assertFalse(model.bn.use_running_average)
        full = _apply(model, x)
        alone = _apply(model, x[:2])
        self.assertGreater(float(jnp.max(jnp.abs(full[:2] - alone))), 1e-4)
        moved = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))), stats_before,
            nnx.state(model, nnx.BatchStat),
        )
        self.assertGreater(min(jax.tree.leaves(moved)), 0.0)
        # Eval: running averages, per-example outputs, statistics untouched.
        model.eval()
        self.assertTrue(all(
            bn.use_running_average for _, bn in nnx.iter_graph(model)
            if isinstance(bn, nnx.BatchNorm)
        ))
        frozen = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
        full = _apply(model, x)
        alone = _apply(model, x[:2])
        np.testing.assert_allclose(full[:2], alone, rtol=1e-5, atol=1e-6)
        unchanged = jax.tree.map(
            lambda a, b: bool(jnp.array_equal(a, b)), frozen, nnx.state(model, nnx.BatchStat)
        )
        self.assertTrue(all(jax.tree.leaves(unchanged)))
        model.train()
        self.assertFalse(model.blocks[0].bn2.use_running_average)


class JitTest(absltest.TestCase):

    def test_jitted_forward_matches_eager(self):
        model = models.ResNet(8, 10, width=4, padding="CIRCULAR", shortcut="B", rngs=nnx.Rngs(0))
        model.eval()
        x = _images((2, 16, 16, 3))
        np.testing.assert_allclose(_apply(model, x), model(x), rtol=1e-5, atol=1e-6)

    def test_jitted_train_step_decreases_loss(self):
        model = models.ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
        x = _images((16, 8, 8, 1))
        y = jnp.arange(16) % 10

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        @nnx.jit
        def step(m, opt):
            loss, grads = nnx.value_and_grad(loss_fn)(m)
            opt.update(m, grads)
            return loss

        losses = [float(step(model, optimizer)) for _ in range(5)]
        self.assertLess(losses[-1], losses[0])

    def test_circular_resnet_is_shift_invariant(self):
        # CIRCULAR convs, x[::2] subsampling and average pooling commute with circular shifts
        # by multiples of the total stride 4: the logits are invariant (in eval mode).
        x = _images((2, 16, 16, 3))
        shifted = jnp.roll(x, (4, 8), axis=(1, 2))
        for shortcut in ("A", "B"):
            model = models.ResNet(
                8, 5, width=4, padding="CIRCULAR", shortcut=shortcut, rngs=nnx.Rngs(2)
            )
            model.eval()
            np.testing.assert_allclose(_apply(model, shifted), _apply(model, x), atol=1e-5)
        # Zero padding is not shift invariant.
        model = models.ResNet(8, 5, width=4, rngs=nnx.Rngs(2))
        model.eval()
        self.assertGreater(float(jnp.max(jnp.abs(_apply(model, shifted) - _apply(model, x)))),
                           1e-4)


class DiscoveryTest(absltest.TestCase):

    def _conv_specs(self, model, image_shape):
        specs = train.find_convs_nnx(model, jnp.zeros((1, *image_shape), jnp.float32))
        leaves = jax.tree.leaves(specs, is_leaf=lambda s: s is None)
        return specs, [s for s in leaves if s is not None]

    def test_find_convs_sees_every_conv(self):
        model = models.ResNet(
            20, 10, padding="CIRCULAR", shortcut="B", width=4, rngs=nnx.Rngs(0)
        )
        specs, found = self._conv_specs(model, (16, 16, 3))
        self.assertLen(found, 21)  # 19 3x3 convs + 2 projections
        self.assertTrue(all(isinstance(s, spectra.ConvSpec) for s in found))
        self.assertEqual(specs["conv"]["kernel"].input_shape, (16, 16))
        self.assertEqual(specs["blocks"][3]["conv1"]["kernel"].strides, (2, 2))
        self.assertEqual(specs["blocks"][8]["conv2"]["kernel"].input_shape, (4, 4))
        for index in range(9):
            for name in ("conv1", "conv2"):
                self.assertTrue(specs["blocks"][index][name]["kernel"].is_circular)

    def test_find_convs_on_digits(self):
        model = models.ResNet(20, 10, in_channels=1, width=4, stage_strides=(1, 2, 1),
                              rngs=nnx.Rngs(0))
        specs, found = self._conv_specs(model, (8, 8, 1))
        self.assertLen(found, 19)
        self.assertEqual(specs["blocks"][8]["conv2"]["kernel"].input_shape, (4, 4))
        self.assertEqual(specs["blocks"][8]["conv2"]["kernel"].padding, "SAME")


if __name__ == "__main__":
    absltest.main()
