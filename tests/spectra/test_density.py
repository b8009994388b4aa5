"""Tests for spectra/_density.py: the symbol, the circulant and spectral-density approximations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from spectra import _density
from spectra._fourier import embed_kernel
from spectra._spec import ConvSpec
from tests.spectra import layers


def _kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _exact(kernel, spec):
    # NumPy SVD of the dense matrix of the real conv (one jitted program per layer, cached).
    return layers.exact_singular_values(kernel, spec)


def _rel_err(approx, exact):
    return np.linalg.norm(np.asarray(approx) - exact) / np.linalg.norm(exact)


class SpectralDensityTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("plain", (3, 3, 2, 4), (1, 1), 8),
        ("rectangular_dilated", (2, 3, 3, 2), (2, 1), 9),
    )
    def test_matches_fft2_of_embedded_kernel(self, shape, dilation, n):
        kernel = _kernel(shape)
        spec = ConvSpec((n, n), padding="CIRCULAR", kernel_dilation=dilation)
        fft = np.fft.fft2(np.asarray(embed_kernel(jnp.asarray(kernel), spec)), axes=(0, 1))
        u = 2 * np.pi * np.arange(n) / n
        omegas = np.stack(np.meshgrid(u, u, indexing="ij"), axis=-1)
        symbol = _density.spectral_density(kernel, omegas, kernel_dilation=dilation)
        self.assertEqual(symbol.shape, (n, n, shape[3], shape[2]))
        np.testing.assert_allclose(symbol, np.swapaxes(fft, -1, -2), atol=1e-10)

    def test_groups_give_block_diagonal_matrix(self):
        groups, cig, cog = 3, 2, 2
        kernel = _kernel((3, 3, cig, groups * cog))
        omegas = np.random.default_rng(1).uniform(0, 2 * np.pi, (5, 2))
        symbol = np.asarray(
            _density.spectral_density(kernel, omegas, feature_group_count=groups))
        self.assertEqual(symbol.shape, (5, groups * cog, groups * cig))
        for a in range(groups):
            for b in range(groups):
                block = symbol[:, a * cog:(a + 1) * cog, b * cig:(b + 1) * cig]
                if a == b:
                    expected = _density.spectral_density(
                        kernel[..., a * cog:(a + 1) * cog], omegas)
                    np.testing.assert_allclose(block, expected, atol=1e-12)
                else:
                    np.testing.assert_array_equal(block, 0)

    def test_bad_omegas_raise(self):
        with self.assertRaisesRegex(ValueError, "omegas"):
            _density.spectral_density(_kernel((3, 3, 1, 1)), np.zeros((4, 3)))

    def test_bad_kernel_and_groups_raise(self):
        with self.assertRaisesRegex(ValueError, "kernel"):
            _density.spectral_density(np.zeros((3, 3, 1)), np.zeros((1, 2)))
        with self.assertRaisesRegex(ValueError, "feature_group_count"):
            _density.spectral_density(_kernel((3, 3, 1, 3)), np.zeros((1, 2)),
                                      feature_group_count=2)


class CirculantTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("stride1", dict(input_shape=(6, 7)), (3, 3, 2, 3)),
        ("stride2", dict(input_shape=(8, 6), strides=2), (3, 3, 3, 2)),
        ("dilated_groups", dict(input_shape=(7, 7), kernel_dilation=2, feature_group_count=2),
         (2, 2, 1, 4)),
    )
    def test_exact_for_circular_specs(self, spec_kwargs, shape):
        kernel = _kernel(shape)
        spec = ConvSpec(padding="CIRCULAR", **spec_kwargs)
        np.testing.assert_allclose(
            _density.circulant_singular_values(kernel, spec), _exact(kernel, spec), atol=1e-10)

    def test_polyphase_symbol_matches_frequency_matrices(self):
        # Same grid 2πu/(n/s) through the polyphase kernel and through frequency_matrices.
        kernel = _kernel((3, 3, 2, 3))
        spec = ConvSpec((8, 8), strides=2, padding="SAME", kernel_dilation=2)
        np.testing.assert_allclose(
            _density.spectral_density_singular_values(kernel, spec, "circulant", "none"),
            _density.circulant_singular_values(kernel, spec), atol=1e-10)

    def test_non_dividing_stride_does_not_raise(self):
        kernel = _kernel((3, 3, 2, 2))
        spec = ConvSpec((7, 7), strides=2, padding="CIRCULAR")
        values = np.asarray(_density.circulant_singular_values(kernel, spec))
        self.assertEqual(values.shape, (spec.num_singular_values(kernel.shape),))
        self.assertTrue(np.all(np.diff(values) <= 0))
        self.assertGreater(values[0], 0)


class ApproximationShapeTest(parameterized.TestCase):

    @parameterized.product(
        padding=["SAME", "VALID", "FULL", ((2, 0), (1, 1)), "CIRCULAR"],
        strides=[1, 2, 3],
    )
    def test_length_and_sorting(self, padding, strides):
        kernel = _kernel((3, 2, 2, 3))
        spec = ConvSpec((7, 8), strides=strides, padding=padding)
        total = spec.num_singular_values(kernel.shape)
        outputs = [_density.circulant_singular_values(kernel, spec)]
        outputs += [_density.spectral_density_singular_values(kernel, spec, grid=g)
                    for g in _density.GRIDS]
        outputs += [_density.spectral_density_singular_values(kernel, spec, correction=c)
                    for c in _density.CORRECTIONS]
        for values in outputs:
            values = np.asarray(values)
            self.assertEqual(values.shape, (total,))
            self.assertTrue(np.all(np.isfinite(values)))
            self.assertTrue(np.all(values >= 0))
            self.assertTrue(np.all(np.diff(values) <= 1e-12))

    def test_custom_grid(self):
        grid = _density.FrequencyGrid(lambda n, k, pads, s: 2 * np.pi * np.arange(n) / n)
        kernel = _kernel((3, 3, 2, 2))
        spec = ConvSpec((6, 6))
        np.testing.assert_allclose(
            _density.spectral_density_singular_values(kernel, spec, grid, "none"),
            _density.spectral_density_singular_values(kernel, spec, "circulant", "none"))

    def test_bad_grid_and_correction_raise(self):
        kernel, spec = _kernel((3, 3, 1, 1)), ConvSpec((6, 6))
        with self.assertRaisesRegex(ValueError, "grid"):
            _density.spectral_density_singular_values(kernel, spec, grid="nope")
        with self.assertRaisesRegex(ValueError, "correction"):
            _density.spectral_density_singular_values(kernel, spec, correction="nope")


class TransformsTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("density", functools.partial(_density.spectral_density_singular_values)),
        ("density_none", functools.partial(
            _density.spectral_density_singular_values, grid="dst", correction="none")),
        ("circulant", _density.circulant_singular_values),
    )
    def test_jit_and_vmap(self, fn):
        spec = ConvSpec((6, 6), strides=2, padding="VALID", feature_group_count=2)
        kernels = np.stack([_kernel((3, 3, 1, 4), seed=s) for s in range(3)])
        expected = np.stack([np.asarray(fn(k, spec)) for k in kernels])
        jitted = jax.jit(fn, static_argnums=1)
        np.testing.assert_allclose(jitted(kernels[0], spec), expected[0], atol=1e-10)
        batched = jax.jit(jax.vmap(lambda k: fn(k, spec)))(kernels)
        np.testing.assert_allclose(batched, expected, atol=1e-10)

    def test_float32(self):
        kernel = _kernel((3, 3, 2, 3)).astype(np.float32)
        values = _density.spectral_density_singular_values(kernel, ConvSpec((8, 8)))
        self.assertEqual(values.dtype, jnp.float32)


class AccuracyTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("same", "SAME", dict(dilation=(1, 1))),
        ("valid_strided", "VALID", dict(strides=2)),
        ("full_dilated_groups", "FULL", dict(dilation=(2, 1), groups=2)),
    )
    def test_frobenius_norm_is_exact(self, padding, options):
        groups = options.get("groups", 1)
        kernel = _kernel((3, 2, 2, 2 * groups))
        spec = ConvSpec((7, 6), strides=options.get("strides", 1), padding=padding,
                        kernel_dilation=options.get("dilation", (1, 1)),
                        feature_group_count=groups)
        exact = _exact(kernel, spec)
        np.testing.assert_allclose(
            _density.frobenius_norm_squared(kernel, spec), np.sum(exact**2), rtol=1e-10)
        for correction in _density.CORRECTIONS[1:]:
            approx = _density.spectral_density_singular_values(kernel, spec,
                                                               correction=correction)
            np.testing.assert_allclose(np.sum(np.asarray(approx) ** 2), np.sum(exact**2),
                                       rtol=1e-8)

    @parameterized.named_parameters(
        # FULL, k = 2: LᵀL is the tridiagonal Toeplitz matrix of Σ_o |f_o|², whose eigenvalues
        # are exactly its symbol at πj/(n+1): the DST grid at the input size is exact.
        ("full_input_grid", "FULL", (2, 1, 1, 3), "dst"),
        # VALID, k = 2: LLᵀ is tridiagonal Toeplitz of size m: DST grid at the output size.
        ("valid_output_grid", "VALID", (2, 1, 3, 1), "dst_output"),
    )
    def test_dst_grid_exact_for_tridiagonal_gram(self, padding, shape, grid):
        kernel = _kernel(shape, seed=3)
        spec = ConvSpec((11, 1), padding=padding)
        approx = _density.spectral_density_singular_values(kernel, spec, grid, "none")
        np.testing.assert_allclose(approx, _exact(kernel, spec), atol=1e-10)
        # The circular grid is not exact there (measured relative error 8e-4 for FULL).
        circ = _density.spectral_density_singular_values(kernel, spec, "circulant", "none")
        self.assertGreater(_rel_err(circ, _exact(kernel, spec)), 1e-4)

    def test_default_beats_circulant_at_large_input(self):
        # Measured (float64), seed 0: default 0.0115, circulant 0.0360, plain ('dst', 'none')
        # 0.0388; over seeds 0..4 the default is 0.010-0.022 and the circulant 0.026-0.036.
        kernel = _kernel((3, 3, 2, 3), seed=0)
        spec = ConvSpec((24, 24), padding="SAME")
        exact = _exact(kernel, spec)
        err_default = _rel_err(_density.spectral_density_singular_values(kernel, spec), exact)
        err_circulant = _rel_err(_density.circulant_singular_values(kernel, spec), exact)
        self.assertLess(err_default, 0.02)
        self.assertLess(err_default, 0.5 * err_circulant)


if __name__ == "__main__":
    absltest.main()
