"""`conv`, `conv_transpose` and `dense_operator` against the real Flax layer."""

import functools

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
from tests.spectra import layers


@functools.partial(jax.jit, static_argnums=3)
def _operator_and_products(kernel, x, y, spec):
    """One compiled program per layer: the dense matrix, the conv of x, the transpose on y."""
    return (spectra.dense_operator(kernel, spec), spectra.conv(kernel, x, spec),
            spectra.conv_transpose(kernel, y, spec))


class ConvTest(parameterized.TestCase):

    @parameterized.named_parameters(*layers.layer_cases())
    def test_conv_equals_flax_nnx_conv(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=1)
        cin, cout = spec.channels(kshape)
        padding = spec.padding
        if padding == "FULL":  # nnx.Conv has no 'FULL': it is explicit k_eff - 1 zero pads.
            padding = spec.pads(kshape)
        # The kernel is given as the initialiser: a random init compiles a sampler per shape.
        layer = nnx.Conv(
            cin, cout, kshape[:2], strides=spec.strides, padding=padding,
            kernel_dilation=spec.kernel_dilation, feature_group_count=spec.feature_group_count,
            use_bias=False, precision=jax.lax.Precision.HIGHEST, param_dtype=np.float64,
            kernel_init=lambda key, shape, dtype: jax.numpy.asarray(kernel, dtype),
            rngs=nnx.Rngs(0),
        )
        np.testing.assert_array_equal(layer.kernel[...], kernel)
        x = np.random.default_rng(2).normal(size=(2, *spec.input_shape, cin))
        np.testing.assert_allclose(spectra.conv(kernel, x, spec), layer(x), atol=1e-12)
        # Unbatched input: its shape (traced, nothing compiled; the values are those of the
        # batched call above and of the dense test below).
        unbatched = jax.eval_shape(functools.partial(spectra.conv, spec=spec), kernel, x[0])
        self.assertEqual(unbatched.shape, (*spec.output_shape(kshape), cout))

    @parameterized.named_parameters(*layers.layer_cases())
    def test_dense_operator_and_transpose(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=3)
        cin, cout = spec.channels(kshape)
        rng = np.random.default_rng(4)
        x = rng.normal(size=(*spec.input_shape, cin))
        y = rng.normal(size=(*spec.output_shape(kshape), cout))
        # One jitted program for the three (eager calls compile ~15 small programs per layer;
        # `conv` eager is checked against Flax above, `dense_operator` eager below).
        dense, conv_x, transpose_y = map(np.asarray,
                                         _operator_and_products(kernel, x, y, spec))
        self.assertEqual(dense.shape, (spec.out_dim(kshape), spec.in_dim(kshape)))
        np.testing.assert_allclose(dense @ x.ravel(), conv_x.ravel(), atol=1e-12)
        np.testing.assert_allclose(dense.T @ y.ravel(), transpose_y.ravel(), atol=1e-12)

    def test_dense_operator_under_jit_and_vmap(self):
        spec = spectra.ConvSpec((5, 4), padding="SAME")
        kernels = layers.random_kernel((3, 3, 3, 2, 2))
        batched = jax.jit(jax.vmap(lambda k: spectra.dense_operator(k, spec)))(kernels)
        for i in range(3):  # Eager.
            np.testing.assert_allclose(batched[i], spectra.dense_operator(kernels[i], spec))
        # `conv` and `conv_transpose` eager on an unbatched input (the grid above runs them jitted).
        x = np.random.default_rng(5).normal(size=(5, 4, 2))
        y = np.random.default_rng(6).normal(size=(5, 4, 2))
        np.testing.assert_allclose(np.ravel(spectra.conv(kernels[0], x, spec)),
                                   batched[0] @ x.ravel(), atol=1e-12)
        np.testing.assert_allclose(np.ravel(spectra.conv_transpose(kernels[0], y, spec)),
                                   batched[0].T @ y.ravel(), atol=1e-12)

    def test_wrong_input_shape(self):
        spec = spectra.ConvSpec((5, 4))
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            spectra.conv(np.ones((3, 3, 2, 2)), np.ones((5, 5, 2)), spec)


if __name__ == "__main__":
    absltest.main()
