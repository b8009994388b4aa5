"""TTDense and TTConv against dense layers (float64, small shapes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
from jax import lax

from spectra import _tt
from train.layers.tt import TTConv
from train.layers.tt import TTDense
from train.layers.tt import tt_conv_flops

F64 = jnp.float64

#: Jitted calls: one compile per layer configuration instead of many eagerly dispatched ops.
_apply = nnx.jit(lambda module, x: module(x))


@jax.jit(static_argnums=(2, 3))
def _reference_conv(x, kernel, strides, padding):
    """``nnx.Conv`` semantics with ``lax.conv_general_dilated`` directly."""
    if padding == "CIRCULAR":
        kh, kw = kernel.shape[:2]
        x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)),
                    mode="wrap")
        padding = "VALID"
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _conv_param_count(kernel_size, in_modes, out_modes, ranks):
    kh, kw = kernel_size
    return kh * kw * ranks[0] + sum(
        ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1] for k in range(len(in_modes)))


def _dense_param_count(in_modes, out_modes, ranks):
    return sum(ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1] for k in range(len(in_modes)))


def _nnx_param_count(model):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


_CONV_CASES = [
    # name, in_modes, out_modes, ranks, kernel_size, strides, padding
    ("d1_same_s1", (6,), (4,), (3, 1), 3, 1, "SAME"),
    ("d1_valid_s2", (6,), (4,), (2, 1), (3, 2), 2, "VALID"),
    ("d2_same_s2", (2, 3), (3, 2), (3, 2, 1), 3, 2, "SAME"),
    ("d2_circular_s21", (2, 3), (3, 2), (4, 3, 1), 3, (2, 1), "CIRCULAR"),
    ("d2_explicit_s1", (2, 3), (2, 2), (2, 3, 1), (2, 3), 1, ((1, 2), (0, 1))),
    ("d2_int_pad_s2", (3, 2), (2, 3), (2, 2, 1), 3, 2, 1),
    ("d3_same_s21", (2, 2, 2), (2, 3, 2), (3, 2, 2, 1), 3, (2, 1), "SAME"),
    ("d3_circular_s1", (2, 2, 2), (2, 2, 2), (2, 3, 2, 1), (3, 2), 1, "CIRCULAR"),
    ("d3_valid_s1", (2, 1, 3), (1, 2, 2), (3, 2, 2, 1), 3, 1, "VALID"),
]


class TTConvTest(parameterized.TestCase):

    @parameterized.named_parameters(*_CONV_CASES)
    def test_impls_match_lax_and_nnx_conv(self, in_modes, out_modes, ranks, ksize, strides,
                                          padding):
        layer = TTConv(in_modes, out_modes, ranks, ksize, strides=strides, padding=padding,
                       use_bias=True, param_dtype=F64, rngs=nnx.Rngs(0))
        layer.bias[...] = jnp.arange(layer.out_features, dtype=F64) / 7
        kernel = layer.kernel()
        self.assertEqual(kernel.shape, (*layer.kernel_size, math.prod(in_modes),
                                        math.prod(out_modes)))
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 6, layer.in_features)))
        ref = _reference_conv(x, kernel, layer.strides, layer.padding) + layer.bias[...]
        if padding == "CIRCULAR" or not isinstance(padding, str):
            # The padding forms the reference spells out: same meaning as nnx.Conv's.
            conv = nnx.Conv(layer.in_features, layer.out_features, layer.kernel_size,
                            strides=strides, padding=padding, param_dtype=F64,
                            rngs=nnx.Rngs(0))
            conv.kernel[...] = kernel
            conv.bias[...] = layer.bias[...]
            np.testing.assert_allclose(_apply(conv, x), ref, atol=1e-12)
        for impl in ("cores", "full"):
            layer.impl = impl
            np.testing.assert_allclose(_apply(layer, x), ref, atol=1e-12, err_msg=impl)

    @parameterized.named_parameters(*_CONV_CASES[3:5])
    def test_gradients_of_impls_agree(self, in_modes, out_modes, ranks, ksize, strides, padding):
        layer = TTConv(in_modes, out_modes, ranks, ksize, strides=strides, padding=padding,
                       param_dtype=F64, rngs=nnx.Rngs(2))
        graphdef, params = nnx.split(layer)
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 5, layer.in_features)))
        g = np.random.default_rng(4).standard_normal(_apply(layer, x).shape)

        def loss(params, x, impl):
            model = nnx.merge(graphdef, params)
            model.impl = impl
            return jnp.sum(model(x) * g)

        grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        grads = {impl: grad_fn(params, x, impl)
                 for impl in ("cores", "full")}
        leaves_c, leaves_f = (jax.tree.leaves(grads[i]) for i in ("cores", "full"))
        self.assertLen(leaves_c, len(ranks) + 1)  # spatial core + d cores + dx.
        for a, b in zip(leaves_c, leaves_f):
            np.testing.assert_allclose(a, b, atol=1e-11)

    def test_unbatched_and_extra_batch_dims(self):
        layer = TTConv((2, 2), (2, 2), (2, 2, 1), 3, param_dtype=F64, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 5, 5, 4)))
        y = _apply(layer, x)
        self.assertEqual(y.shape, (2, 3, 5, 5, 4))
        np.testing.assert_allclose(_apply(layer, x[1, 2]), y[1, 2], atol=1e-12)

    @parameterized.named_parameters(
        ("d1", (6,), (4,), (2, 1)),
        ("d2", (2, 3), (3, 2), (3, 2, 1)),
        ("d3", (2, 2, 2), (2, 3, 2), (3, 2, 2, 1)),
    )
    def test_from_dense_full_rank_is_exact(self, in_modes, out_modes, ranks):
        kernel = np.random.default_rng(6).standard_normal(
            (3, 2, math.prod(in_modes), math.prod(out_modes)))
        layer = TTConv.from_dense(kernel, in_modes, out_modes, strides=2, padding="VALID")
        np.testing.assert_allclose(layer.kernel(), kernel, atol=1e-12)
        self.assertEqual(layer.ranks[-1], 1)
        self.assertEqual((layer.strides, layer.padding), ((2, 2), "VALID"))
        # From a TT kernel of the given ranks, rtol recovers those ranks (or smaller).
        tt_kernel = TTConv(in_modes, out_modes, ranks, (3, 2), param_dtype=F64,
                           rngs=nnx.Rngs(7)).kernel()
        back = TTConv.from_dense(tt_kernel, in_modes, out_modes, rtol=1e-10)
        self.assertTrue(all(a <= b for a, b in zip(back.ranks, ranks)), back.ranks)
        np.testing.assert_allclose(back.kernel(), tt_kernel, atol=1e-10)

    def test_from_dense_truncated(self):
        kernel = np.random.default_rng(8).standard_normal((3, 3, 8, 8))
        capped = TTConv.from_dense(kernel, (2, 4), (4, 2), ranks=(4, 3, 1))
        self.assertEqual(capped.ranks, (4, 3, 1))
        layer = TTConv.from_dense(kernel, (2, 4), (4, 2), rtol=0.6, bias=np.ones(8))
        err = np.linalg.norm(np.asarray(layer.kernel()) - kernel)
        self.assertLessEqual(err, 0.6 * np.linalg.norm(kernel) * (1 + 1e-10))
        self.assertLess(layer.num_params, 9 * 64)
        np.testing.assert_allclose(layer.bias[...], np.ones(8))

    @parameterized.named_parameters(
        ("garipov_layer2", (4, 4, 4), (4, 4, 4), (22, 20, 20, 1), 13958),
        ("garipov_layer3", (4, 4, 4), (4, 8, 4), (27, 22, 22, 1), None),
        ("garipov_layer4", (4, 8, 4), (4, 8, 4), (23, 23, 23, 1), None),
        ("garipov_ttfc_net", (4, 8, 4), (4, 8, 4), (16, 16, 16, 1), None),
    )
    def test_released_configs_param_count(self, in_modes, out_modes, ranks, expected):
        layer = TTConv(in_modes, out_modes, ranks, 3, rngs=nnx.Rngs(0))
        count = _conv_param_count((3, 3), in_modes, out_modes, ranks)
        if expected is not None:
            self.assertEqual(count, expected)
        self.assertEqual(_nnx_param_count(layer), count)
        self.assertEqual(layer.num_params, count)
        self.assertEqual(layer.kernel().shape, (3, 3, math.prod(in_modes), math.prod(out_modes)))
        biased = TTConv(in_modes, out_modes, ranks, 3, use_bias=True, rngs=nnx.Rngs(0))
        self.assertEqual(_nnx_param_count(biased), count + math.prod(out_modes))
        self.assertEqual(biased.num_params, count + math.prod(out_modes))

    def test_init_variance_is_lecun(self):
        variances = [
            float(jnp.var(TTConv((4, 4), (4, 4), (6, 5, 1), 3, rngs=nnx.Rngs(s)).kernel()))
            for s in range(4)
        ]
        ratio = np.mean(variances) * (9 * 16)
        self.assertBetween(ratio, 0.5, 2.0)

    def test_jit(self):
        layer = TTConv((2, 3), (3, 2), (3, 2, 1), 3, strides=2, param_dtype=F64,
                       rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6, 6, 6)))
        for impl in ("cores", "full"):
            layer.impl = impl
            np.testing.assert_allclose(_apply(layer, x), layer(x), atol=1e-12)

    def test_auto_rule(self):
        small = TTConv((4, 4, 4), (4, 4, 4), (16, 16, 16, 1), 3, rngs=nnx.Rngs(0))
        self.assertEqual(small.chosen_impl((16, 16), batch=32), "full")
        # Tiny ranks on a wide layer: far fewer multiply-adds in the cores path.
        wide = TTConv((8, 8, 8), (8, 8, 8), (1, 1, 1, 1), 3, rngs=nnx.Rngs(0))
        self.assertEqual(wide.chosen_impl((8, 8), batch=2), "cores")
        flops = tt_conv_flops((3, 3), (8, 8, 8), (8, 8, 8), (1, 1, 1, 1), 128)
        self.assertEqual(flops["cores"], 128 * (9 * 512 + 3 * (64 * 8 * 8)))
        self.assertEqual(wide.flops((8, 8), batch=2), flops)
        self.assertEqual(TTConv((2,), (2,), (1, 1), 3, impl="full",
                                rngs=nnx.Rngs(0)).chosen_impl((4, 4)), "full")

    @parameterized.named_parameters(
        ("ranks_length", dict(ranks=(2, 1)), "ranks"),
        ("ranks_zero", dict(ranks=(2, 0, 1)), "ranks"),
        ("ranks_last", dict(ranks=(2, 2, 2)), "ranks"),
        ("modes_length", dict(out_modes=(8,)), "out_modes"),
        ("modes_zero", dict(in_modes=(2, 0)), "in_modes"),
        ("impl", dict(impl="fast"), "impl"),
        ("padding", dict(padding="REFLECT"), "padding"),
        ("strides", dict(strides=0), "strides"),
        ("kernel_size", dict(kernel_size=(3, 3, 3)), "kernel_size"),
    )
    def test_bad_constructor_arguments(self, override, name):
        kwargs = dict(in_modes=(2, 2), out_modes=(2, 4), ranks=(2, 2, 1), kernel_size=3)
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, name):
            TTConv(**kwargs, rngs=nnx.Rngs(0))

    def test_bad_from_dense_and_input(self):
        kernel = np.zeros((3, 3, 8, 8))
        with self.assertRaisesRegex(ValueError, "in_modes"):
            TTConv.from_dense(kernel, (2, 2), (2, 4))
        with self.assertRaisesRegex(ValueError, "out_modes"):
            TTConv.from_dense(kernel, (2, 4), (2, 2))
        with self.assertRaisesRegex(ValueError, "ranks"):
            TTConv.from_dense(kernel, (2, 4), (2, 4), ranks=(2, 2))
        with self.assertRaisesRegex(ValueError, "ranks"):
            TTConv.from_dense(kernel, (2, 4), (2, 4), ranks=(2, 2, 2))
        layer = TTConv((2, 4), (2, 4), (2, 2, 1), 3, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            layer(jnp.ones((1, 5, 5, 6)))


class TTDenseTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("d1", (6,), (5,), (1, 1)),
        ("d2", (3, 4), (5, 2), (1, 3, 1)),
        ("d3", (2, 3, 2), (2, 2, 3), (1, 2, 3, 1)),
    )
    def test_matches_matrix(self, in_modes, out_modes, ranks):
        layer = TTDense(in_modes, out_modes, ranks, param_dtype=F64, rngs=nnx.Rngs(0))
        layer.bias[...] = jnp.linspace(-1.0, 1.0, layer.out_features, dtype=F64)
        w = layer.matrix()
        self.assertEqual(w.shape, (math.prod(in_modes), math.prod(out_modes)))
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, layer.in_features)))
        np.testing.assert_allclose(layer(x), x @ w + layer.bias[...], atol=1e-12)
        np.testing.assert_allclose(_apply(layer, x), layer(x), atol=1e-12)
        np.testing.assert_allclose(w, _tt.tt_matrix_to_full([c[...] for c in layer.cores]))
        self.assertEqual(_nnx_param_count(layer),
                         _dense_param_count(in_modes, out_modes, ranks) + layer.out_features)

    def test_gradient_matches_dense(self):
        layer = TTDense((3, 4), (2, 5), (1, 3, 1), use_bias=False, param_dtype=F64,
                        rngs=nnx.Rngs(1))
        graphdef, params = nnx.split(layer)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 12)))
        g = np.random.default_rng(3).standard_normal((4, 10))
        core_loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) * g)  # noqa: E731
        full_loss = lambda p: jnp.sum(x @ nnx.merge(graphdef, p).matrix() * g)  # noqa: E731
        for a, b in zip(jax.tree.leaves(jax.grad(core_loss)(params)),
                        jax.tree.leaves(jax.grad(full_loss)(params))):
            np.testing.assert_allclose(a, b, atol=1e-11)

    def test_from_dense(self):
        w = np.random.default_rng(4).standard_normal((12, 10))
        exact = TTDense.from_dense(w, (3, 4), (5, 2), bias=np.arange(10.0))
        np.testing.assert_allclose(exact.matrix(), w, atol=1e-12)
        self.assertEqual(exact.ranks, (1, 8, 1))  # Full rank of the (15, 8) unfolding.
        x = np.random.default_rng(5).standard_normal((3, 12))
        np.testing.assert_allclose(exact(x), x @ w + np.arange(10.0), atol=1e-11)
        capped = TTDense.from_dense(w, (3, 4), (5, 2), (1, 4, 1))
        self.assertEqual(capped.ranks, (1, 4, 1))
        self.assertIsNone(capped.bias)
        tol = TTDense.from_dense(w, (3, 4), (5, 2), rtol=0.4)
        err = np.linalg.norm(np.asarray(tol.matrix()) - w)
        self.assertLessEqual(err, 0.4 * np.linalg.norm(w) * (1 + 1e-10))

    @parameterized.named_parameters(
        ("tt_fc1", (8, 8, 8, 16), (4, 6, 8, 8), (1, 40, 40, 40, 1), 185600),
        ("tt_fc2", (4, 6, 8, 8), (4, 4, 4, 8), (1, 30, 30, 30, 1), None),
    )
    def test_released_configs(self, in_modes, out_modes, ranks, expected):
        layer = TTDense(in_modes, out_modes, ranks, rngs=nnx.Rngs(0))
        count = _dense_param_count(in_modes, out_modes, ranks)
        if expected is not None:
            self.assertEqual(count, expected)
        self.assertEqual(_nnx_param_count(layer), count + math.prod(out_modes))
        self.assertEqual(layer.num_params, count + math.prod(out_modes))
        y = layer(jnp.ones((2, math.prod(in_modes)), jnp.float32))
        self.assertEqual((y.shape, y.dtype), ((2, math.prod(out_modes)), jnp.float32))

    def test_init_variance_is_lecun(self):
        variances = [float(jnp.var(TTDense((4, 4, 4), (4, 4, 4), (1, 6, 6, 1),
                                           rngs=nnx.Rngs(s)).matrix())) for s in range(4)]
        self.assertBetween(np.mean(variances) * 64, 0.5, 2.0)

    def test_loss_decreases_under_jitted_step(self):
        layer = TTDense((2, 4), (2, 2), (1, 2, 1), param_dtype=F64, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(6)
        x, target = rng.standard_normal((16, 8)), rng.standard_normal((16, 4))

        @nnx.jit
        def step(model):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
            params = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
            return loss

        losses = [float(step(layer)) for _ in range(20)]
        self.assertLess(losses[-1], losses[0])

    @parameterized.named_parameters(
        ("ranks_length", dict(ranks=(1, 1)), "ranks"),
        ("ranks_zero", dict(ranks=(1, 0, 1)), "ranks"),
        ("ranks_first", dict(ranks=(2, 2, 1)), "ranks"),
        ("ranks_last", dict(ranks=(1, 2, 2)), "ranks"),
        ("modes_length", dict(out_modes=(8,)), "out_modes"),
    )
    def test_bad_arguments(self, override, name):
        kwargs = dict(in_modes=(2, 2), out_modes=(2, 4), ranks=(1, 2, 1))
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, name):
            TTDense(**kwargs, rngs=nnx.Rngs(0))

    def test_bad_from_dense_and_input(self):
        w = np.zeros((12, 10))
        with self.assertRaisesRegex(ValueError, "in_modes"):
            TTDense.from_dense(w, (3, 3), (5, 2))
        with self.assertRaisesRegex(ValueError, "out_modes"):
            TTDense.from_dense(w, (3, 4), (5, 3))
        with self.assertRaisesRegex(ValueError, "ranks"):
            TTDense.from_dense(w, (3, 4), (5, 2), (2, 2, 1))
        layer = TTDense((3, 4), (5, 2), (1, 2, 1), rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            layer(jnp.ones((2, 10)))


if __name__ == "__main__":
    absltest.main()
