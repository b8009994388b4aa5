"""`conv`, `conv_transpose` and `dense_operator` against the real Flax layer."""

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
from tests.spectra import layers


class ConvTest(parameterized.TestCase):

    @parameterized.named_parameters(*layers.layer_cases())
    def test_conv_equals_flax_nnx_conv(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=1)
        cin, cout = spec.channels(kshape)
        padding = spec.padding
        if padding == "FULL":  # nnx.Conv has no 'FULL': it is explicit k_eff - 1 zero pads.
            padding = spec.pads(kshape)
        layer = nnx.Conv(
            cin, cout, kshape[:2], strides=spec.strides, padding=padding,
            kernel_dilation=spec.kernel_dilation, feature_group_count=spec.feature_group_count,
            use_bias=False, precision=jax.lax.Precision.HIGHEST, param_dtype=np.float64,
            rngs=nnx.Rngs(0),
        )
        layer.kernel[...] = kernel
        x = np.random.default_rng(2).normal(size=(2, *spec.input_shape, cin))
        np.testing.assert_allclose(spectra.conv(kernel, x, spec), layer(x), atol=1e-12)
        self.assertEqual(spectra.conv(kernel, x[0], spec).shape,
                         (*spec.output_shape(kshape), cout))

    @parameterized.named_parameters(*layers.layer_cases())
    def test_dense_operator_and_transpose(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=3)
        cin, cout = spec.channels(kshape)
        dense = np.asarray(spectra.dense_operator(kernel, spec))
        self.assertEqual(dense.shape, (spec.out_dim(kshape), spec.in_dim(kshape)))
        rng = np.random.default_rng(4)
        x = rng.normal(size=(*spec.input_shape, cin))
        y = rng.normal(size=(*spec.output_shape(kshape), cout))
        np.testing.assert_allclose(dense @ x.ravel(), np.ravel(spectra.conv(kernel, x, spec)),
                                   atol=1e-12)
        np.testing.assert_allclose(dense.T @ y.ravel(),
                                   np.ravel(spectra.conv_transpose(kernel, y, spec)), atol=1e-12)

    def test_dense_operator_under_jit_and_vmap(self):
        spec = spectra.ConvSpec((5, 4), padding="SAME")
        kernels = layers.random_kernel((3, 3, 3, 2, 2))
        batched = jax.jit(jax.vmap(lambda k: spectra.dense_operator(k, spec)))(kernels)
        for i in range(3):
            np.testing.assert_allclose(batched[i], spectra.dense_operator(kernels[i], spec))

    def test_wrong_input_shape(self):
        spec = spectra.ConvSpec((5, 4))
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            spectra.conv(np.ones((3, 3, 2, 2)), np.ones((5, 5, 2)), spec)


if __name__ == "__main__":
    absltest.main()
