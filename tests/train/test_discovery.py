"""`train.find_convs` / `find_convs_nnx`: every spec is checked against the real layer."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
from jax import lax

import spectra
import train

TOL = 1e-10


def _conv_layer(cin, cout, kernel_size, seed=0, **kwargs):
    return nnx.Conv(
        cin, cout, kernel_size, rngs=nnx.Rngs(seed), param_dtype=jnp.float64, **kwargs
    )


def _input(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


class ConvChecks(parameterized.TestCase):

    def assert_spec_matches_layer(self, layer: nnx.Conv, spec: spectra.ConvSpec, x):
        """``spectra.conv`` with ``spec`` reproduces the layer (bias removed) on its input."""
        self.assertIsInstance(spec, spectra.ConvSpec)
        kernel = layer.kernel.get_value()
        expected = layer(x)
        if layer.bias is not None:
            expected = expected - layer.bias.get_value()
        got = spectra.conv(kernel, x, spec)
        self.assertEqual(got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
        dense = spectra.dense_operator(kernel, spec)
        out_h, out_w = spec.output_shape(kernel.shape)
        self.assertEqual(
            dense.shape,
            (out_h * out_w * kernel.shape[3], x.shape[1] * x.shape[2] * x.shape[3]),
        )
        np.testing.assert_allclose(
            dense @ x[0].ravel(), expected[0].ravel(), rtol=0, atol=TOL
        )


class SingleLayerTest(ConvChecks):

    @parameterized.named_parameters(
        ("same", dict(padding="SAME"), (3, 3), (8, 8), "SAME"),
        ("valid", dict(padding="VALID"), (3, 3), (8, 8), "VALID"),
        ("circular", dict(padding="CIRCULAR"), (3, 3), (8, 8), "CIRCULAR"),
        ("circular_even_kernel", dict(padding="CIRCULAR"), (2, 4), (6, 8), "CIRCULAR"),
        ("full_like_explicit", dict(padding=((2, 2), (2, 2))), (3, 3), (8, 8), "FULL"),
        ("explicit_pairs", dict(padding=((2, 0), (1, 3))), (3, 3), (8, 8), ((2, 0), (1, 3))),
        ("explicit_int_same", dict(padding=1), (3, 3), (8, 8), "SAME"),
        ("explicit_int", dict(padding=1), (5, 5), (8, 8), ((1, 1), (1, 1))),
        ("non_square_input", dict(padding="SAME"), (3, 2), (8, 5), "SAME"),
        ("stride2_same", dict(padding="SAME", strides=2), (3, 3), (8, 8), "SAME"),
        ("stride2x1_valid", dict(padding="VALID", strides=(2, 1)), (3, 3), (8, 7), "VALID"),
        ("stride2_circular", dict(padding="CIRCULAR", strides=2), (3, 3), (8, 6), "CIRCULAR"),
        ("dilation2_same", dict(padding="SAME", kernel_dilation=2), (3, 3), (8, 8), "SAME"),
        ("dilation_circular", dict(padding="CIRCULAR", kernel_dilation=(2, 1)), (3, 3),
         (8, 7), "CIRCULAR"),
        ("groups2", dict(padding="SAME", feature_group_count=2), (3, 3), (8, 8), "SAME"),
        ("depthwise_circular", dict(padding="CIRCULAR", feature_group_count=4), (3, 3),
         (8, 8), "CIRCULAR"),
        ("depthwise_valid_stride2", dict(padding="VALID", feature_group_count=4, strides=2),
         (3, 3), (8, 8), "VALID"),
    )
    def test_nnx_conv(self, kwargs, kernel_size, input_hw, padding):
        cin, cout = 4, 4
        layer = _conv_layer(cin, cout, kernel_size, **kwargs)
        x = _input((1, *input_hw, cin))
        specs = train.find_convs_nnx(layer, x)
        self.assertIsNone(specs["bias"])
        spec = specs["kernel"]
        self.assertEqual(spec.padding, padding)
        self.assertEqual(spec.input_shape, input_hw)
        self.assertEqual(spec.in_features, cin)
        self.assertEqual(spec.feature_group_count, kwargs.get("feature_group_count", 1))
        self.assert_spec_matches_layer(layer, spec, x)

    def test_same_structure_as_pure_params(self):
        layer = _conv_layer(2, 3, (3, 3), use_bias=False)
        specs = train.find_convs_nnx(layer, _input((2, 8, 8, 2)))
        params = nnx.as_pure(nnx.state(layer, nnx.Param))
        self.assertEqual(
            jax.tree.structure(specs, is_leaf=lambda s: s is None),
            jax.tree.structure(params),
        )

    def test_unbatched_input_and_float32(self):
        layer = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
        x = jnp.ones((6, 5, 2), jnp.float32)
        spec = train.find_convs_nnx(layer, x)["kernel"]
        self.assertEqual(spec, spectra.ConvSpec((6, 5), padding="CIRCULAR", in_features=2))


class Block(nnx.Module):
    """CIRCULAR conv -> BatchNorm -> strided SAME conv -> one conv applied twice; a 4-D Param
    that is not a conv kernel (an embedding table)."""

    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        self.c1 = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", **f64)
        self.bn = nnx.BatchNorm(3, param_dtype=jnp.float64, rngs=rngs)
        self.bn.mean.set_value(jnp.zeros(3, jnp.float64))  # Flax keeps float32 statistics.
        self.bn.var.set_value(jnp.ones(3, jnp.float64))
        self.c2 = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", **f64)
        self.shared = nnx.Conv(4, 4, (3, 3), padding="SAME", use_bias=False, **f64)
        self.table = nnx.Param(jnp.ones((2, 2, 2, 2), jnp.float64))

    def __call__(self, x, record=None):
        def call(name, layer, h):
            if record is not None:
                record.append((name, layer, h))
            return layer(h)

        h = nnx.relu(self.bn(call("c1", self.c1, x)))
        h = call("c2", self.c2, h)
        h = call("shared", self.shared, nnx.relu(call("shared", self.shared, h)))
        return h.mean() + self.table[0, 0, 0, 0]


class ModelTest(ConvChecks):

    def check_model(self, model, specs, x):
        record = []
        model(x, record=record)
        checked = set()
        for name, layer, h in record:
            self.assert_spec_matches_layer(layer, specs[name]["kernel"], h)
            checked.add(name)
        self.assertEqual(checked, {"c1", "c2", "shared"})
        self.assertIsNone(specs["table"])
        self.assertIsNone(specs["bn"]["scale"])
        self.assertIsNone(specs["c1"]["bias"])
        self.assertEqual(specs["c1"]["kernel"].padding, "CIRCULAR")
        self.assertEqual(specs["c2"]["kernel"].strides, (2, 2))
        self.assertEqual(specs["shared"]["kernel"].input_shape, (4, 5))

    def test_model_with_batchnorm_and_shared_kernel(self):
        model = Block(nnx.Rngs(0))
        x = _input((2, 8, 10, 2))
        before = nnx.state(model, nnx.BatchStat)
        specs = train.find_convs_nnx(model, x)
        jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model, nnx.BatchStat))
        model.eval()  # Check the specs with fixed statistics.
        self.check_model(model, specs, x)

    def test_model_under_nnx_jit(self):
        model = Block(nnx.Rngs(0))
        x = _input((2, 8, 10, 2))

        @nnx.jit
        def forward(m, x):
            return m(x)

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def apply_fn(p, r, x):
            return forward(nnx.merge(graphdef, p, r), x)

        specs = train.find_convs(apply_fn, nnx.as_pure(params), rest, x)
        model.eval()
        self.check_model(model, specs, x)

    def test_plain_function_with_control_flow(self):
        """A kernel inside jit, remat, cond and a scan body; NCHW activations, cast kernel."""
        dn = ("NCHW", "HWIO", "NCHW")

        def conv(w, h):
            return lax.conv_general_dilated(
                h, w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn
            )

        def apply_fn(params, x):
            h = jax.jit(jax.checkpoint(conv))(params["a"], x)
            h = lax.cond(h.sum() > 0, lambda h: conv(params["b"], h), lambda h: h, h)
            h, _ = lax.scan(lambda c, _: (conv(params["b"], c), None), h, None, length=2)
            return h

        params = {"a": jnp.ones((3, 3, 2, 2)), "b": jnp.ones((3, 3, 2, 2)), "c": jnp.ones(3)}
        specs = train.find_convs(apply_fn, params, jnp.ones((1, 2, 8, 6), jnp.float32))
        expected = spectra.ConvSpec((8, 6), padding="SAME", in_features=2)
        self.assertEqual(specs, {"a": expected, "b": expected, "c": None})

    def test_padding_done_outside_the_conv(self):
        """A hand-written wrap pad is CIRCULAR; reflect/zero pads give a VALID conv on the padded
        input; a static Python kwarg is passed as is."""
        dn = ("NHWC", "HWIO", "NHWC")

        def wrap(x):  # Wrap-around by concatenation (pads (1, 1) and (0, 1): a 3x2 kernel).
            x = jnp.concatenate([x[:, -1:], x, x[:, :1]], axis=1)
            return jnp.concatenate([x, x[:, :, :1]], axis=2)

        def apply_fn(params, x, mode="wrap"):
            pads = ((0, 0), (1, 1), (0, 1), (0, 0))
            h = {"wrap": wrap, "reflect": lambda x: jnp.pad(x, pads, mode="reflect"),
                 "zero": lambda x: jnp.pad(x, pads)}[mode](x)
            return lax.conv_general_dilated(h, params["w"], (1, 1), "VALID", dimension_numbers=dn)

        params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 2, 3)))}
        x = _input((1, 6, 5, 2))
        spec = train.find_convs(apply_fn, params, x)["w"]
        self.assertEqual(spec, spectra.ConvSpec((6, 5), padding="CIRCULAR", in_features=2))
        np.testing.assert_allclose(
            spectra.conv(params["w"], x, spec), apply_fn(params, x), rtol=0, atol=TOL
        )
        for mode in ("reflect", "zero"):
            spec = train.find_convs(apply_fn, params, x, mode=mode)["w"]
            self.assertEqual(spec, spectra.ConvSpec((8, 6), padding="VALID", in_features=2))

    def test_masked_kernel_is_not_a_conv_kernel(self):
        layer = _conv_layer(2, 2, (3, 3), mask=jnp.ones((3, 3, 2, 2)))
        self.assertIsNone(train.find_convs_nnx(layer, _input((1, 8, 8, 2)))["kernel"])


class ErrorTest(parameterized.TestCase):

    def test_kernel_used_with_two_input_sizes(self):
        layer = _conv_layer(2, 2, (3, 3))

        def apply_fn(p, x, y):
            m = nnx.merge(nnx.graphdef(layer), p)
            return m(x).sum() + m(y).sum()

        params = nnx.as_pure(nnx.state(layer))
        with self.assertRaisesRegex(ValueError, r"\['kernel'\].*two convs"):
            train.find_convs(apply_fn, params, _input((1, 8, 8, 2)), _input((1, 6, 6, 2)))

    def test_transposed_conv(self):
        layer = nnx.ConvTranspose(2, 2, (3, 3), strides=2, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "kernel.*transposed conv"):
            train.find_convs_nnx(layer, _input((1, 8, 8, 2)))

    def test_oihw_kernel_layout(self):
        def apply_fn(p, x):
            return lax.conv_general_dilated(
                x, p["w"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
            )

        with self.assertRaisesRegex(ValueError, r"\['w'\].*layout"):
            train.find_convs(apply_fn, {"w": jnp.ones((2, 2, 3, 3))}, jnp.ones((1, 2, 8, 8)))

    def test_one_d_conv(self):
        layer = nnx.Conv(2, 2, (3,), rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "kernel.*1-D conv"):
            train.find_convs_nnx(layer, jnp.ones((1, 8, 2)))


if __name__ == "__main__":
    absltest.main()
