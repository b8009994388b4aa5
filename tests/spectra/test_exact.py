"""Exact spectra (`fft`, `dense`, `lanczos`, `fft_gram`) against the dense ground truth."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from tests.spectra import layers

F64_TOL = 1e-10


def _finite_difference_check(test, fn, kernel, eps=1e-6, rtol=1e-5, seed=7):
    direction = np.random.default_rng(seed).normal(size=kernel.shape)
    expected = (fn(kernel + eps * direction) - fn(kernel - eps * direction)) / (2 * eps)
    got = jnp.vdot(jax.grad(fn)(kernel), direction)
    test.assertTrue(np.isfinite(float(got)))
    np.testing.assert_allclose(float(got), float(expected), rtol=rtol, atol=1e-8)


class FFTSpectrumTest(parameterized.TestCase):

    @parameterized.named_parameters(*layers.circular_fft_cases())
    def test_full_spectrum_matches_dense_f64(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=11)
        exact = layers.exact_singular_values(kernel, spec)
        got = np.asarray(spectra.singular_values(kernel, spec, method="fft"))
        self.assertEqual(got.shape, (spec.num_singular_values(kshape),))
        np.testing.assert_allclose(got, exact, rtol=0, atol=F64_TOL * exact[0])
        np.testing.assert_allclose(spectra.singular_values(kernel, spec), got)  # auto -> fft
        self.assertAlmostEqual(float(spectra.spectral_norm(kernel, spec, "fft")), exact[0],
                               delta=F64_TOL * exact[0])

    @parameterized.named_parameters(*layers.circular_fft_cases())
    def test_full_spectrum_f32(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=12)
        exact = layers.exact_singular_values(kernel, spec)
        got = spectra.singular_values(kernel.astype(np.float32), spec, method="fft")
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * exact[0])

    @parameterized.named_parameters(*layers.circular_fft_cases())
    def test_gram_bracket_contains_exact(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=13)
        sigma = layers.exact_singular_values(kernel, spec)[0]
        lower, upper = spectra.circular_norm_bracket(kernel, spec, num_squarings=8)
        self.assertLessEqual(float(lower), sigma * (1 + 1e-12))
        self.assertGreaterEqual(float(upper), sigma * (1 - 1e-12))
        np.testing.assert_allclose(float(lower), sigma, rtol=1e-8)
        self.assertAlmostEqual(float(spectra.spectral_norm(kernel, spec, "fft_gram")),
                               float(spectra.circular_norm_bracket(kernel, spec)[0]))

    def test_known_values(self):
        # σ(4·I) = 4 with multiplicity n² c; a centred delta kernel is a permutation: all ones.
        spec = spectra.ConvSpec((6, 5), padding="CIRCULAR")
        np.testing.assert_allclose(spectra.singular_values(4.0 * np.eye(3)[None, None], spec),
                                   np.full(90, 4.0))
        delta = np.zeros((3, 3, 2, 2))
        delta[1, 1] = np.eye(2)
        np.testing.assert_allclose(spectra.singular_values(delta, spec), np.ones(60), atol=1e-14)
        # A 1-channel all-ones 2x2 kernel: σ = |1 + e^{iu}| |1 + e^{iv}| over the 4x4 grid.
        spec4 = spectra.ConvSpec((4, 4), padding="CIRCULAR")
        u = 2 * np.pi * np.arange(4) / 4
        expected = np.sort(np.outer(np.abs(1 + np.exp(1j * u)), np.abs(1 + np.exp(1j * u)))
                           .ravel())[::-1]
        np.testing.assert_allclose(spectra.singular_values(np.ones((2, 2, 1, 1)), spec4),
                                   expected, atol=1e-14)

    def test_frequency_matrices_round_trip(self):
        for _, kshape, spec in layers.circular_fft_cases():
            kernel = layers.random_kernel(kshape, seed=14)
            fm = spectra.frequency_matrices(kernel, spec)
            back = spectra.kernel_from_frequency_matrices(fm.matrices, spec, kshape)
            np.testing.assert_allclose(back, kernel, atol=1e-12)
            self.assertEqual(int(fm.multiplicity.sum()),
                             spec.input_shape[1] // spec.strides[1])


class ZeroPaddedTest(parameterized.TestCase):

    @parameterized.named_parameters(*layers.layer_cases())
    def test_lanczos_sigma_max_matches_dense(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=21)
        dense = layers.dense_operator(kernel, spec)
        exact = np.linalg.svd(dense, compute_uv=False)
        result = spectra.lanczos_spectral_norm(kernel, spec)
        np.testing.assert_allclose(float(result.value), exact[0], rtol=1e-9)
        self.assertLessEqual(float(result.residual), 1e-10)
        # The returned vectors are the top singular pair: A v = σ u (A: the dense matrix of the
        # real conv, so no extra conv program is compiled per layer).
        self.assertEqual(result.right_vector.shape, (*spec.input_shape, spec.channels(kshape)[0]))
        self.assertEqual(result.left_vector.shape, (*spec.output_shape(kshape), kshape[-1]))
        av = dense @ np.ravel(result.right_vector)
        np.testing.assert_allclose(av, np.ravel(result.value * result.left_vector),
                                   atol=1e-6 * exact[0])

    @parameterized.named_parameters(*layers.layer_cases(("SAME", "VALID", "FULL")))
    def test_dense_and_auto_full_spectrum(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=22)
        exact = layers.exact_singular_values(kernel, spec)
        for method in ("auto", "dense"):
            got = np.asarray(spectra.singular_values(kernel, spec, method=method))
            np.testing.assert_allclose(got, exact, rtol=0, atol=F64_TOL * exact[0])

    def test_lanczos_f32(self):
        spec = spectra.ConvSpec((10, 9), (2, 1), "SAME", (1, 2))
        kernel = layers.random_kernel((3, 3, 4, 6), seed=23)
        exact = layers.exact_singular_values(kernel, spec)[0]
        got = spectra.spectral_norm(kernel.astype(np.float32), spec, method="lanczos")
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(float(got), exact, rtol=1e-5)

    def test_lanczos_warm_start(self):
        spec = spectra.ConvSpec((8, 8), padding="SAME")
        kernel = layers.random_kernel((3, 3, 3, 3), seed=24)
        cold = spectra.lanczos_spectral_norm(kernel, spec)
        warm = spectra.lanczos_spectral_norm(kernel * 1.01, spec,
                                             initial_vector=cold.right_vector)
        np.testing.assert_allclose(float(warm.value), 1.01 * float(cold.value), rtol=1e-9)
        self.assertLessEqual(int(warm.num_restarts), int(cold.num_restarts))

    def test_ordering_facts(self):
        # ||S_n|| <= ||L_n|| <= ||C_N|| for N >= n + k - 1 (papers.md §0); strided <= unstrided.
        kernel = layers.random_kernel((3, 3, 2, 3), seed=25)
        norm = functools.partial(spectra.spectral_norm, kernel, method="dense")
        same = norm(spectra.ConvSpec((8, 8), padding="SAME"))
        full = norm(spectra.ConvSpec((8, 8), padding="FULL"))
        circ = norm(spectra.ConvSpec((10, 10), padding="CIRCULAR"))
        strided = norm(spectra.ConvSpec((8, 8), 2, padding="SAME"))
        self.assertLessEqual(float(same), float(full))
        self.assertLessEqual(float(full), float(circ) * (1 + 1e-12))
        self.assertLessEqual(float(strided), float(same))


class TransformsTest(parameterized.TestCase):
    """jit, vmap over 3 stacked kernels, and grad against finite differences."""

    @parameterized.named_parameters(
        ("fft_circular_stride2_groups2", "fft",
         spectra.ConvSpec((8, 6), (2, 2), "CIRCULAR", 1, 2), (3, 2, 2, 4)),
        ("fft_gram_dilated", "fft_gram",
         spectra.ConvSpec((7, 6), 1, "CIRCULAR", 2), (3, 3, 2, 3)),
        ("lanczos_same_stride2", "lanczos", spectra.ConvSpec((8, 7), 2, "SAME"), (3, 3, 2, 3)),
        ("lanczos_valid_dilated", "lanczos",
         spectra.ConvSpec((8, 8), 1, "VALID", 2), (2, 3, 3, 2)),
        ("dense_full_groups", "dense", spectra.ConvSpec((5, 6), 1, "FULL", 1, 2), (2, 2, 1, 4)),
    )
    def test_spectral_norm_jit_vmap_grad(self, method, spec, kshape):
        kernels = layers.random_kernel((3, *kshape), seed=31)
        fn = functools.partial(spectra.spectral_norm, spec=spec, method=method)
        eager = np.array([float(fn(k)) for k in kernels])
        np.testing.assert_allclose(jax.jit(fn)(kernels[0]), eager[0], rtol=1e-10)
        np.testing.assert_allclose(jax.jit(jax.vmap(fn))(kernels), eager, rtol=1e-10)
        exact = [layers.exact_singular_values(k, spec)[0] for k in kernels]
        np.testing.assert_allclose(eager, exact, rtol=1e-8)
        _finite_difference_check(self, jax.jit(fn), kernels[0])

    @parameterized.named_parameters(
        ("fft", "fft", spectra.ConvSpec((6, 4), (2, 1), "CIRCULAR", 1, 1)),
        ("dense", "dense", spectra.ConvSpec((5, 4), 1, "VALID", (1, 2))),
    )
    def test_singular_values_jit_vmap_grad(self, method, spec):
        kernels = layers.random_kernel((3, 2, 2, 2, 3), seed=32)
        fn = functools.partial(spectra.singular_values, spec=spec, method=method)
        batched = jax.jit(jax.vmap(fn))(kernels)
        for i in range(3):
            np.testing.assert_allclose(batched[i], layers.exact_singular_values(kernels[i], spec),
                                       atol=1e-10 * batched[i, 0])
        _finite_difference_check(self, lambda k: jnp.sum(fn(k) ** 3), kernels[0])

    def test_frequency_matrices_and_bracket_vmap(self):
        spec = spectra.ConvSpec((6, 6), 2, "CIRCULAR")
        kernels = layers.random_kernel((3, 3, 3, 2, 2), seed=33)
        mats = jax.jit(jax.vmap(lambda k: spectra.frequency_matrices(k, spec).matrices))(kernels)
        brackets = jax.vmap(lambda k: spectra.circular_norm_bracket(k, spec))(kernels)
        for i in range(3):
            np.testing.assert_allclose(mats[i], spectra.frequency_matrices(kernels[i], spec)
                                       .matrices)
            np.testing.assert_allclose(brackets[0][i], spectra.circular_norm_bracket(
                kernels[i], spec)[0])


class BadInputTest(parameterized.TestCase):

    def test_fft_needs_circular_and_dividing_stride(self):
        kernel = np.ones((3, 3, 2, 2))
        with self.assertRaisesRegex(ValueError, "strides=\\(2, 2\\) must divide input_shape"):
            spectra.singular_values(kernel, spectra.ConvSpec((7, 8), 2, "CIRCULAR"), "fft")
        with self.assertRaisesRegex(ValueError, "padding='SAME'.*CIRCULAR"):
            spectra.spectral_norm(kernel, spectra.ConvSpec((8, 8), 1, "SAME"), "fft")

    def test_auto_falls_back(self):
        kernel = layers.random_kernel((3, 3, 2, 2), seed=41)
        spec = spectra.ConvSpec((7, 8), 2, "CIRCULAR")  # stride does not divide: dense
        np.testing.assert_allclose(spectra.singular_values(kernel, spec),
                                   layers.exact_singular_values(kernel, spec), atol=1e-10)
        big = spectra.ConvSpec((48, 48), padding="SAME")
        with self.assertRaisesRegex(ValueError, "spectral_density.*circulant"):
            spectra.singular_values(np.ones((3, 3, 2, 2)), big)

    def test_unknown_method(self):
        spec = spectra.ConvSpec((8, 8))
        with self.assertRaisesRegex(ValueError, "method='svd' is unknown"):
            spectra.singular_values(np.ones((3, 3, 1, 1)), spec, method="svd")
        with self.assertRaisesRegex(ValueError, "method='svd' is unknown"):
            spectra.spectral_norm(np.ones((3, 3, 1, 1)), spec, method="svd")

    def test_bad_initial_vector(self):
        with self.assertRaisesRegex(ValueError, "initial_vector"):
            spectra.lanczos_spectral_norm(np.ones((3, 3, 1, 1)), spectra.ConvSpec((8, 8)),
                                          initial_vector=np.ones(5))


if __name__ == "__main__":
    absltest.main()
