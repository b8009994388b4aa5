"""MAC counts of train.flops against the hand formulas of the reference notes (§3)."""

import math

import jax
import jax.numpy as jnp
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from train import flops
from train.models import resnet


def _out(size: int, stride: int = 1) -> int:
    return -(-size // stride)  # 'SAME'


class _Stack(nnx.Module):
    """A plain stack of layers, applied in order."""

    def __init__(self, *layers):
        self.layers = nnx.List(list(layers))

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _conv(c_in, c_out, kernel, **kwargs):
    return nnx.Conv(c_in, c_out, kernel, use_bias=False, rngs=nnx.Rngs(0), **kwargs)


class ConvFormulaTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("same", dict(), (9, 7), 9 * 7),
        ("stride2", dict(strides=2), (9, 7), 5 * 4),
        ("stride_2_1", dict(strides=(2, 1)), (8, 6), 4 * 6),
        ("valid", dict(padding="VALID"), (9, 7), 7 * 5),
        ("dilated", dict(kernel_dilation=2), (9, 7), 9 * 7),
        ("dilated_valid", dict(kernel_dilation=2, padding="VALID"), (9, 7), 5 * 3),
        ("circular", dict(padding="CIRCULAR"), (6, 6), 36),
    )
    def test_baseline_conv(self, kwargs, shape, hw_out):
        c, n, k = 4, 6, 3
        layer = _conv(c, n, (k, k), **kwargs)
        x = jnp.zeros((3, *shape, c))
        self.assertEqual(flops.count_flops(layer, x), hw_out * k * k * c * n)

    def test_grouped_conv(self):
        c, n, k, groups = 6, 9, 3, 3
        layer = _conv(c, n, (k, k), feature_group_count=groups)
        x = jnp.zeros((2, 8, 8, c))
        self.assertEqual(flops.count_flops(layer, x), 64 * n * k * k * c // groups)

    def test_bias_is_not_counted(self):
        layer = nnx.Conv(3, 5, (3, 3), use_bias=True, rngs=nnx.Rngs(0))
        self.assertEqual(flops.count_flops(layer, jnp.zeros((1, 6, 6, 3))), 36 * 9 * 3 * 5)

    @parameterized.parameters(1, 2)
    def test_channel_wise_stack(self, stride):
        # Yang et al.: HW_out (k^2 c r + r n).
        c, r, n, k, h = 5, 3, 8, 3, 10
        model = _Stack(_conv(c, r, (k, k), strides=stride), _conv(r, n, (1, 1)))
        hw_out = _out(h, stride) ** 2
        got = flops.count_flops(model, jnp.zeros((2, h, h, c)))
        self.assertEqual(got, hw_out * (k * k * c * r + r * n))

    @parameterized.parameters(1, 2)
    def test_spatial_wise_stack(self, stride):
        # Yang et al.: H1 W1 k c r + HW_out k r n, H1 W1 the output size of the k x 1 stage.
        c, r, n, k, h = 5, 4, 7, 3, 10
        model = _Stack(
            _conv(c, r, (k, 1), strides=(stride, 1)), _conv(r, n, (1, k), strides=(1, stride))
        )
        h1w1 = _out(h, stride) * h
        hw_out = _out(h, stride) ** 2
        got = flops.count_flops(model, jnp.zeros((1, h, h, c)))
        self.assertEqual(got, h1w1 * k * c * r + hw_out * k * r * n)

    def test_linear(self):
        layer = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
        self.assertEqual(flops.count_flops(layer, jnp.zeros((7, 12))), 60)
        self.assertEqual(flops.count_flops(layer, jnp.zeros((7, 12)), per_example=False), 420)

    def test_dot_general_batch_dims(self):
        def fn(x):  # (N, 3, 4) x (3, 4, 5) batched over the 3: 3 * 4 * 5 per example.
            return jnp.einsum("nbi,bio->nbo", x, jnp.ones((3, 4, 5)))

        self.assertEqual(flops.count_flops(fn, jnp.zeros((2, 3, 4))), 60)


class ModelTest(absltest.TestCase):

    def test_resnet20_on_32x32(self):
        # Hand formula, option A (the shortcut has no MACs): stem, 3 stages, classifier.
        w = 16
        stem = 32 * 32 * 9 * 3 * w
        stage1 = 6 * 32 * 32 * 9 * w * w
        stage2 = 16 * 16 * 9 * w * 2 * w + 5 * 16 * 16 * 9 * (2 * w) ** 2
        stage3 = 8 * 8 * 9 * 2 * w * 4 * w + 5 * 8 * 8 * 9 * (4 * w) ** 2
        head = 4 * w * 10
        # An abstract model and input (nnx.eval_shape): nothing is initialised or computed.
        model = nnx.eval_shape(lambda: resnet.ResNet(20, 10, rngs=nnx.Rngs(0)))
        ops = flops.flops_by_op(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
        self.assertLen(ops, 20)  # 19 convs + 1 dense.
        self.assertEqual(sum(op.macs for op in ops), stem + stage1 + stage2 + stage3 + head)
        self.assertTrue(all(op.input_dependent and op.repeats == 1 for op in ops))
        self.assertAlmostEqual(sum(op.macs for op in ops) / 1e6, 40.55, places=2)

    def test_model_left_in_training_mode(self):
        model = resnet.ResNet(8, 10, width=4, rngs=nnx.Rngs(0))
        before = nnx.state(model, nnx.BatchStat)
        flops.count_flops(model, jnp.ones((2, 8, 8, 3)))
        self.assertFalse(model.bn.use_running_average)
        after = nnx.state(model, nnx.BatchStat)
        jax.tree.map(lambda a, b: self.assertTrue(jnp.array_equal(a, b)), before, after)

    def test_count_params_is_the_models(self):
        model = nnx.eval_shape(lambda: resnet.ResNet(20, 10, rngs=nnx.Rngs(0)))
        self.assertEqual(flops.count_params(model), 269_722)


class NestedJaxprTest(absltest.TestCase):

    def test_jit_and_scan(self):
        w = jnp.ones((6, 6))

        @jax.jit
        def body(x):
            return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=4)[0]

        ops = flops.flops_by_op(lambda x: body(x) @ jnp.ones((6, 2)), jnp.zeros((3, 6)))
        self.assertEqual([op.repeats for op in ops], [4, 1])
        self.assertEqual([op.macs for op in ops], [4 * 36, 12])

    def test_fori_loop_with_static_bounds(self):
        def fn(x):
            return jax.lax.fori_loop(0, 3, lambda i, c: c @ jnp.eye(5), x)

        self.assertEqual(flops.count_flops(fn, jnp.zeros((2, 5))), 3 * 25)

    def test_nnx_scan_over_layers(self):
        layer = nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(0))

        def fn(x):
            return jax.lax.scan(lambda c, _: (layer(c), None), x, None, length=5)[0]

        self.assertEqual(flops.count_flops(fn, jnp.zeros((2, 4))), 5 * 16)

    def test_scan_carry_taint(self):
        w = jnp.ones((3, 3))

        def fn(x):
            # The carry becomes input dependent only from the second iteration on: every
            # matmul of the body counts as input dependent.
            def step(carry, _):
                weights, acc = carry
                return (weights, acc @ weights + x[0]), None

            return jax.lax.scan(step, (w, jnp.zeros(3)), None, length=2)[0][1]

        ops = flops.flops_by_op(fn, jnp.zeros((1, 3)))
        self.assertLen(ops, 1)
        self.assertTrue(ops[0].input_dependent)

    def test_weight_only_ops(self):
        a, b = jnp.ones((4, 2)), jnp.ones((2, 5))

        def fn(x):
            return x @ (a @ b)  # a @ b does not depend on x.

        ops = flops.flops_by_op(fn, jnp.zeros((3, 4)))
        self.assertEqual([op.input_dependent for op in ops], [False, True])
        self.assertEqual(flops.count_flops(fn, jnp.zeros((3, 4))), 40 + 20)
        self.assertEqual(flops.count_flops(fn, jnp.zeros((3, 4)), include_weight_only=False), 20)

    def test_cond_counts_the_largest_branch(self):
        def fn(x):
            return jax.lax.cond(
                x.sum() > 0, lambda v: v @ jnp.ones((4, 4)), lambda v: v * 2.0, x
            )

        self.assertEqual(flops.count_flops(fn, jnp.zeros((1, 4))), 16)

    def test_while_loop_is_unsupported(self):
        def fn(x):
            return jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ jnp.eye(3), x)

        with self.assertRaisesRegex(NotImplementedError, "while_loop"):
            flops.count_flops(fn, jnp.ones((1, 3)))

    def test_while_loop_without_counted_ops(self):
        def fn(x):
            y = jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c + 1.0, x)
            return y @ jnp.ones((3, 2))

        self.assertEqual(flops.count_flops(fn, jnp.ones((1, 3))), 6)

    def test_custom_vjp(self):
        @jax.custom_vjp
        def f(x):
            return x @ jnp.ones((3, 3))

        f.defvjp(lambda x: (f(x), None), lambda _, g: (g,))
        self.assertEqual(flops.count_flops(f, jnp.ones((2, 3))), 9)

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "example_input"):
            flops.count_flops(lambda x: x, jnp.zeros(()))
        with self.assertRaisesRegex(ValueError, "model_or_fn"):
            flops.count_flops(3, jnp.zeros((1, 2)))


class CompressedLayersTest(parameterized.TestCase):

    @parameterized.parameters("channel", "spatial")
    def test_svd_conv(self, decomposition):
        from train.layers.svd import SVDConv

        c, n, k, h, r = 6, 8, 3, 10, 4
        layer = SVDConv(c, n, (k, k), decomposition=decomposition, rank=r, rngs=nnx.Rngs(0))
        x = jnp.zeros((2, h, h, c))
        if decomposition == "channel":
            expected = h * h * (k * k * c * r + r * n)
        else:
            expected = h * h * k * c * r + h * h * k * r * n
        self.assertEqual(flops.count_flops(layer, x, include_weight_only=False), expected)

    @parameterized.parameters(1, 2)
    def test_svd_conv_strided_spatial(self, stride):
        from train.layers.svd import SVDConv

        c, n, k, h, r = 4, 6, 3, 9, 5
        layer = SVDConv(c, n, (k, k), decomposition="spatial", rank=r, strides=stride,
                        rngs=nnx.Rngs(0))
        h1w1, hw_out = _out(h, stride) * h, _out(h, stride) ** 2
        got = flops.count_flops(layer, jnp.zeros((1, h, h, c)), include_weight_only=False)
        self.assertEqual(got, h1w1 * k * c * r + hw_out * k * r * n)

    def test_tt_conv_full(self):
        from train.layers.tt import TTConv

        layer = TTConv((2, 4), (4, 2), (3, 2, 1), 3, impl="full", rngs=nnx.Rngs(0))
        x = jnp.zeros((2, 6, 6, 8))
        ops = flops.flops_by_op(layer, x)
        dense = [op for op in ops if op.input_dependent]
        self.assertLen(dense, 1)
        self.assertEqual(dense[0].macs, 36 * 9 * 8 * 8)
        self.assertGreater(sum(op.macs for op in ops if not op.input_dependent), 0)

    def test_tt_conv_cores(self):
        from train.layers.tt import TTConv
        from train.layers.tt import tt_conv_flops

        in_modes, out_modes, ranks = (2, 4), (4, 2), (3, 2, 1)
        layer = TTConv(in_modes, out_modes, ranks, 3, impl="cores", rngs=nnx.Rngs(0))
        x = jnp.zeros((2, 6, 6, 8))
        ops = flops.flops_by_op(layer, x)
        self.assertTrue(all(op.input_dependent for op in ops))  # Nothing weight-only.
        contractions = sum(op.macs for op in ops if op.primitive == "dot_general")
        # Core k: P (prod_{j>k} c_j) (prod_{j<k} s_j) r_{k-1} c_k s_k r_k, P = 36 pixels.
        self.assertEqual(contractions, 36 * (4 * 3 * 2 * 4 * 2 + 4 * 2 * 4 * 2 * 1))
        # The depthwise spatial stage (36 px * 9 taps * 8 channels * r_0) is counted when it is
        # a conv; written as shifted slices and elementwise products it is not (module doc).
        spatial = sum(op.macs for op in ops if op.primitive == "conv_general_dilated")
        self.assertIn(spatial, (0, 36 * 9 * 8 * 3))
        if spatial:
            self.assertEqual(
                flops.count_flops(layer, x),
                tt_conv_flops((3, 3), in_modes, out_modes, ranks, 36)["cores"],
            )

    def test_tt_dense(self):
        from train.layers.tt import TTDense

        in_modes, out_modes, ranks = (4, 3, 2), (2, 5, 3), (1, 3, 2, 1)
        layer = TTDense(in_modes, out_modes, ranks, rngs=nnx.Rngs(0))
        expected = sum(
            math.prod(in_modes[k + 1:]) * math.prod(out_modes[:k])
            * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1]
            for k in range(3)
        )
        self.assertEqual(flops.count_flops(layer, jnp.zeros((5, 24))), expected)


if __name__ == "__main__":
    absltest.main()
