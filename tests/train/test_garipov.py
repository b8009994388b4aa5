"""Garipov et al. (2016)'s networks: layout, parameter counts (41.65, 3.18), TT layers."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
from jax import lax

import spectra
from train import find_convs_nnx
from train import flops
from train.models import garipov
from train.models.resnet import count_params

# A width-reduced network for fast numerical tests: channels 4, 4, 8, 8, 8, 8.
SMALL = dict(channels=(4, 4, 8, 8, 8, 8), fc_features=(16, 8))
SMALL_TT_CONV = {
    2: ((2, 2), (2, 2), (3, 2, 1)),
    3: ((2, 2), (2, 4), (3, 2, 1)),
    4: ((2, 4), (2, 4), (2, 3, 1)),
}


def _abstract(**kwargs):
    """The network built abstractly (shapes only; fast for the 14M-parameter one)."""
    return nnx.eval_shape(lambda: garipov.GaripovNet(**kwargs, rngs=nnx.Rngs(0)))


def _bn(features):
    return 2 * features


def _tt_conv_params(in_modes, out_modes, ranks, k=3):
    return k * k * ranks[0] + sum(
        r0 * c * s * r1 for r0, c, s, r1 in zip(ranks[:-1], in_modes, out_modes, ranks[1:])
    )


def _tt_fc_params(in_modes, out_modes, ranks):
    return sum(r0 * m * n * r1 for r0, m, n, r1 in zip(ranks[:-1], in_modes, out_modes, ranks[1:]))


class ParameterCountTest(parameterized.TestCase):
    """The counts of the notes (§4): 13,934,538 / 334,554 = 41.65; TT-conv: 3.18."""

    def _conv_part(self, tt_conv=None):
        channels = (3, *garipov.CONV_CHANNELS)
        total = 0
        for layer in range(1, 7):
            c_in, c_out = channels[layer - 1], channels[layer]
            if tt_conv and layer in tt_conv:
                total += _tt_conv_params(*tt_conv[layer])
            else:
                total += 9 * c_in * c_out
            total += _bn(c_out)
        return total

    def test_conv_fc_baseline_is_the_notes_count(self):
        expected = self._conv_part() + 8192 * 1536 + _bn(1536) + 1536 * 512 + _bn(512) + 5130
        self.assertEqual(expected, 13_934_538)
        self.assertEqual(count_params(_abstract(variant="conv_fc")), 13_934_538)

    def test_tt_conv_tt_fc_is_the_notes_count(self):
        config = garipov.RELEASED_TT_CONV_TT_FC
        fc = config["tt_fc"]
        expected = (self._conv_part(config["tt_conv"]) + _tt_fc_params(*fc[1]) + _bn(1536)
                    + _tt_fc_params(*fc[2]) + _bn(512) + 5130)
        self.assertEqual(expected, 334_554)
        self.assertEqual(count_params(_abstract(**config)), 334_554)

    def test_ratio_41_65(self):
        baseline = _abstract(variant="conv_fc")
        compressed = _abstract(**garipov.RELEASED_TT_CONV_TT_FC)
        ratio = garipov.compression_ratio(baseline, compressed)
        self.assertEqual(ratio, 13_934_538 / 334_554)
        self.assertEqual(round(ratio, 2), 41.65)

    def test_tt_conv_ratio_3_18_and_global_pool_3_23(self):
        tt_conv = garipov.RELEASED_TT_CONV["tt_conv"]
        baseline = _abstract(variant="conv")
        compressed = _abstract(**garipov.RELEASED_TT_CONV)
        self.assertEqual(count_params(baseline), self._conv_part() + 512 * 10 + 10)
        self.assertEqual(count_params(compressed), self._conv_part(tt_conv) + 512 * 10 + 10)
        self.assertEqual(count_params(baseline), 561_098)
        self.assertEqual(round(garipov.compression_ratio(baseline, compressed), 2), 3.18)
        # A global average pool (128 features into FC-10) gives the poster's ~557k and 3.23.
        baseline = _abstract(variant="conv", head_pool="global")
        compressed = _abstract(**garipov.RELEASED_TT_CONV, head_pool="global")
        self.assertEqual(count_params(baseline), 557_258)
        self.assertEqual(round(garipov.compression_ratio(baseline, compressed), 2), 3.23)

    def test_compression_ratio_of_ints(self):
        self.assertEqual(garipov.compression_ratio(10, 4), 2.5)
        with self.assertRaisesRegex(ValueError, "positive"):
            garipov.compression_ratio(10, 0)

    def test_naive_tt_count(self):
        ranks = (3, 9, 32)
        model = _abstract(variant="conv", naive_tt_conv=ranks)
        channels = (3, *garipov.CONV_CHANNELS)
        expected = 9 * 3 * 64 + 5130 + sum(_bn(c) for c in garipov.CONV_CHANNELS)
        for layer in range(2, 7):
            c_in, c_out = channels[layer - 1], channels[layer]
            expected += 3 * 3 + 3 * 3 * 9 + 9 * c_in * 32 + 32 * c_out
        self.assertEqual(count_params(model), expected)
        self.assertEqual(model.conv_kinds, ("dense",) + ("naive_tt",) * 5)

    def test_flops_of_the_baseline(self):
        channels = (3, *garipov.CONV_CHANNELS)
        sizes = (32, 32, 16, 16, 8, 8)
        convs = sum(s * s * 9 * channels[i] * channels[i + 1] for i, s in enumerate(sizes))
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        self.assertEqual(flops.count_flops(_abstract(variant="conv"), x), convs + 512 * 10)
        self.assertEqual(
            flops.count_flops(_abstract(variant="conv_fc"), x),
            convs + 8192 * 1536 + 1536 * 512 + 512 * 10,
        )


class LayoutTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("conv_32", "conv", "avg4", (32, 32), 2 * 2 * 8),
        ("conv_16", "conv", "avg4", (16, 16), 1 * 1 * 8),
        ("conv_12_global", "conv", "global", (12, 12), 8),
        ("conv_fc_32", "conv_fc", "avg4", (32, 32), 8 * 8 * 8),
        ("conv_fc_16x12", "conv_fc", "avg4", (16, 12), 4 * 3 * 8),
    )
    def test_output_shapes(self, variant, head_pool, shape, flat):
        net = garipov.GaripovNet(variant, in_channels=1, num_classes=5, input_shape=shape,
                                 head_pool=head_pool, **SMALL, rngs=nnx.Rngs(0))
        self.assertEqual(net.flatten_features, flat)
        net.eval()
        self.assertEqual(net(jnp.ones((3, *shape, 1))).shape, (3, 5))

    def test_conv_input_sizes_and_specs(self):
        net = _abstract(variant="conv")
        self.assertEqual(net.conv_input_shapes, ((32, 32),) * 2 + ((16, 16),) * 2 + ((8, 8),) * 2)
        self.assertEqual(net.flatten_features, 512)
        self.assertEqual(_abstract(variant="conv_fc").flatten_features, 8192)
        names = [name for name, _, _ in net.conv_specs()]
        self.assertEqual(names, [f"conv{i}" for i in range(1, 7)])
        spec = net.conv_specs()[4][2]
        self.assertEqual((spec.input_shape, spec.padding), ((8, 8), "SAME"))

    def test_tt_network_gradient_and_sgd_step(self):
        net = garipov.GaripovNet("conv_fc", in_channels=1, input_shape=(8, 8), head_pool="global",
                                 tt_conv=SMALL_TT_CONV, naive_tt_conv={5: (2, 4, 3)},
                                 tt_fc={1: ((2, 4, 4), (2, 4, 2), (1, 3, 3, 1))}, **SMALL,
                                 rngs=nnx.Rngs(0))
        self.assertEqual(net.conv_kinds, ("dense", "tt", "tt", "tt", "naive_tt", "dense"))
        self.assertEqual(net.fc_kinds, ("tt", "dense", "dense"))
        # float64 (parameters and input) so that finite differences check the gradient tightly.
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1), jnp.float64)
        labels = jnp.arange(4)
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.as_pure(params))
        # The BatchNorm statistics too: training mode writes float64 batch statistics into them.
        rest = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            nnx.as_pure(rest),
        )

        @jax.jit
        def loss(params):  # Training mode: BatchNorm on batch statistics.
            logits = nnx.merge(graphdef, params, rest)(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        # The gradient through the TT cores is the derivative of the loss: central finite
        # differences along a random direction of every parameter.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        direction = treedef.unflatten(
            [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
        eps = 1e-6
        shifted = [jax.tree.map(lambda p, d, e=e: p + e * d, params, direction)
                   for e in (eps, -eps)]
        numeric = (float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in
                       zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5)
        # A real SGD step (of length 1e-3) lowers the loss by at least half of what the gradient
        # predicts (Armijo condition).
        squared_norm = sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads))
        self.assertGreater(squared_norm, 0.0)
        lr = 1e-3 / np.sqrt(squared_norm)
        stepped = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        self.assertLess(float(loss(stepped)), float(value) - 0.5 * lr * squared_norm)

    def test_find_convs_sees_only_the_dense_convs(self):
        # A TT layer's kernel is rebuilt from its cores, not a parameter: find_convs_nnx does not
        # describe it; conv_specs() gives its operator.
        net = garipov.GaripovNet("conv", in_channels=1, input_shape=(16, 16),
                                 tt_conv=SMALL_TT_CONV, **SMALL, rngs=nnx.Rngs(0))
        specs = find_convs_nnx(net, jnp.zeros((1, 16, 16, 1), jnp.float32))
        found = [s for s in jax.tree.leaves(specs, is_leaf=lambda s: s is None) if s is not None]
        self.assertLen(found, 3)  # conv1, conv5, conv6.

    @parameterized.named_parameters(
        ("variant", dict(variant="dense"), "variant"),
        ("head_pool", dict(head_pool="max"), "head_pool"),
        ("too_small", dict(input_shape=(8, 8)), "input_shape"),
        ("tt_fc_on_conv", dict(tt_fc={1: ((2,), (2,), (1, 1))}), "tt_fc"),
        ("modes", dict(tt_conv={2: ((2, 2), (2, 4), (2, 2, 1))}), "out_modes"),
        ("layer", dict(tt_conv={7: ((2,), (2,), (1, 1))}), "tt_conv"),
        ("both", dict(tt_conv={2: ((2, 2), (2, 2), (2, 2, 1))}, naive_tt_conv={2: (1, 1, 1)}),
         "both"),
        ("channels", dict(channels=(4, 4)), "channels"),
    )
    def test_bad_arguments(self, kwargs, message):
        kwargs = {"channels": SMALL["channels"], **kwargs}
        with self.assertRaisesRegex(ValueError, message):
            garipov.GaripovNet(**kwargs, rngs=nnx.Rngs(0))


class NaiveTTConvTest(parameterized.TestCase):

    def test_forward_is_the_conv_of_its_kernel(self):
        layer = garipov.NaiveTTConv(4, 6, 3, (2, 5, 3), param_dtype=jnp.float64,
                                    rngs=nnx.Rngs(1))
        x = jax.random.normal(jax.random.key(2), (2, 7, 5, 4), jnp.float64)
        expected = lax.conv_general_dilated(x, layer.kernel(), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
        self.assertEqual(layer.kernel().shape, (3, 3, 4, 6))
        self.assertEqual(count_params(layer), 3 * 2 + 2 * 3 * 5 + 5 * 4 * 3 + 3 * 6)

    def test_init_variance_is_he(self):
        layer = garipov.NaiveTTConv(64, 64, 3, (3, 9, 64), rngs=nnx.Rngs(0))
        var = float(jnp.var(layer.kernel()))
        self.assertAlmostEqual(var / (2 / (9 * 64)), 1.0, delta=0.25)

    def test_from_dense_full_rank_is_exact(self):
        kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5), jnp.float64)
        layer = garipov.NaiveTTConv.from_dense(kernel)
        np.testing.assert_allclose(layer.kernel(), kernel, rtol=1e-10, atol=1e-10)
        self.assertEqual(layer.ranks, (3, 9, 5))

    def test_one_by_one_is_a_low_rank_matrix(self):
        # With 1x1 filters the naive format is an ordinary rank-r factorisation (poster).
        layer = garipov.NaiveTTConv(8, 6, 1, (1, 1, 2), param_dtype=jnp.float64,
                                    rngs=nnx.Rngs(0))
        self.assertEqual(np.linalg.matrix_rank(np.asarray(layer.kernel()[0, 0])), 2)

    def test_bad_ranks(self):
        with self.assertRaisesRegex(ValueError, "ranks"):
            garipov.NaiveTTConv(4, 4, 3, (2, 2), rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "padding"):
            garipov.NaiveTTConv(4, 4, 3, (2, 2, 2), padding="CIRCULAR", rngs=nnx.Rngs(0))


class DecomposeTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.net = garipov.GaripovNet("conv_fc", in_channels=1, input_shape=(8, 8),
                                      param_dtype=jnp.float64, **SMALL, rngs=nnx.Rngs(0))
        self.net.eval()
        self.x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float64)

    def test_full_rank_keeps_the_function(self):
        big = {k: (i, o, (99,) * (len(r) - 1) + (1,)) for k, (i, o, r) in SMALL_TT_CONV.items()}
        new = garipov.decompose_tt(self.net, tt_conv=big, naive_tt_conv={5: (9, 9, 9)},
                                tt_fc={1: ((2, 4, 4), (2, 4, 2), (1, 99, 99, 1)),
                                       3: ((8,), (10,), (1, 1))})
        self.assertEqual(new.conv_kinds, ("dense", "tt", "tt", "tt", "naive_tt", "dense"))
        self.assertEqual(new.fc_kinds, ("tt", "dense", "tt"))
        np.testing.assert_allclose(new(self.x), self.net(self.x), rtol=1e-9, atol=1e-9)
        self.assertEqual(self.net.conv_kinds, ("dense",) * 6)  # The input is untouched.

    def test_truncation_compresses(self):
        new = garipov.decompose_tt(self.net, tt_conv=SMALL_TT_CONV)
        self.assertLess(count_params(new), count_params(self.net))
        for layer in (2, 3, 4):
            self.assertEqual(new.convs[layer - 1].ranks, SMALL_TT_CONV[layer][2])
        self.assertTrue(np.all(np.isfinite(new(self.x))))

    def test_sigma_max_of_a_tt_layer(self):
        new = garipov.decompose_tt(self.net, tt_conv=SMALL_TT_CONV)
        name, layer, spec = new.conv_specs()[2]
        kernel = garipov.layer_kernel(layer)
        dense = spectra.dense_operator(kernel, spec)
        expected = np.linalg.svd(np.asarray(dense), compute_uv=False)[0]
        got = spectra.spectral_norm(kernel, spec, method="dense")
        self.assertEqual(name, "conv3")
        np.testing.assert_allclose(got, expected, rtol=1e-10)
        self.assertEqual(garipov.layer_kernel(self.net.convs[0]).shape, (3, 3, 1, 4))
        self.assertEqual(garipov.layer_matrix(self.net.fcs[0]).shape, (2 * 2 * 8, 16))

    def test_bad_layers(self):
        new = garipov.decompose_tt(self.net, tt_conv=SMALL_TT_CONV)
        with self.assertRaisesRegex(ValueError, "not a dense conv"):
            garipov.decompose_tt(new, tt_conv={2: SMALL_TT_CONV[2]})
        with self.assertRaisesRegex(ValueError, "not a dense FC"):
            garipov.decompose_tt(new, tt_fc={4: ((2,), (2,), (1, 1))})


if __name__ == "__main__":
    absltest.main()
