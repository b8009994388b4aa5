"""`clip_operator_norm` against dense SVD (float64) and the NumPy reference of Sedghi et al."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from threadpoolctl import threadpool_limits

import spectra
from spectra._project import CLIP_METHODS
from spectra._project import clip_operator_norm
from tests.spectra import layers

_GRID_SHAPES = (
    "k1", "k3x2", "stride2", "dilation2x1_stride2", "groups2",
    "groups2_dilation2_stride2",
)


def _grid_cases():
    return [
        c for c in layers.layer_cases(("CIRCULAR", "SAME", "VALID", "FULL"))
        if c[0].rsplit("_", 1)[0] in _GRID_SHAPES
    ]


def _sigma_max(kernel, spec) -> float:
    # One BLAS thread: on a small shared machine, multi-threaded OpenBLAS next to JAX's spinning
    # thread pool makes this SVD ~100x slower (measured: 1 s instead of 10 ms).
    with threadpool_limits(limits=1, user_api="blas"):
        return float(layers.exact_singular_values(kernel, spec)[0])


def _embedded_sigma_max(kernel, spec) -> float:
    """σ_max of the circular operator the methods work on, by dense SVD."""
    return _sigma_max(kernel, spectra.circulant_embedding(spec, np.shape(kernel)))


def _numpy_sedghi_clip(kernel, n, c):
    """Reference (Sedghi et al. 2019, brain-research/conv-sv): clip per frequency, truncate."""
    kh, kw = kernel.shape[:2]
    t = np.fft.fft2(kernel, n, axes=[0, 1])
    with threadpool_limits(limits=1, user_api="blas"):
        u, d, vh = np.linalg.svd(t, full_matrices=False)
    t_clipped = u @ (np.minimum(d, c)[..., None] * vh)
    return np.fft.ifft2(t_clipped, axes=[0, 1]).real[:kh, :kw]


class CertifiedTest(parameterized.TestCase):

    @parameterized.named_parameters(*_grid_cases())
    def test_certified_and_rescale_are_feasible(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=5)
        sigma = _sigma_max(kernel, spec)
        max_norm = 0.4 * sigma
        for method, num_rounds in (("certified", 1), ("rescale", 1)):
            result = clip_operator_norm(kernel, spec, max_norm, method=method,
                                        num_rounds=num_rounds)
            self.assertEqual(result.kernel.shape, kshape)
            self.assertEqual(result.kernel.dtype, kernel.dtype)
            self.assertLessEqual(_sigma_max(result.kernel, spec), max_norm * (1 + 1e-6),
                                 msg=f"{method}, {num_rounds} rounds")
            self.assertLessEqual(float(result.feasibility_gap), 1e-9 * max_norm)
            self.assertFalse(np.allclose(result.kernel, kernel))

    def test_certified_zero_rounds_is_exact_rescale(self):
        spec = spectra.ConvSpec((6, 5), padding="SAME")
        kernel = layers.random_kernel((3, 3, 2, 3), seed=2)
        sigma_embedded = _embedded_sigma_max(kernel, spec)
        result = clip_operator_norm(kernel, spec, 1.0, method="certified", num_rounds=0)
        np.testing.assert_allclose(result.kernel, kernel / sigma_embedded, rtol=1e-10)
        np.testing.assert_allclose(_embedded_sigma_max(result.kernel, spec), 1.0, rtol=1e-10)

    def test_feasibility_gap_is_exact_on_the_embedding(self):
        spec = spectra.ConvSpec((7, 6), strides=2, padding="SAME", feature_group_count=2)
        kernel = layers.random_kernel((3, 2, 2, 4), seed=3)
        max_norm = 0.5 * _embedded_sigma_max(kernel, spec)
        for method in ("sedghi", "dykstra"):
            result = clip_operator_norm(kernel, spec, max_norm, method=method, num_rounds=2)
            np.testing.assert_allclose(
                float(result.feasibility_gap) + max_norm,
                _embedded_sigma_max(result.kernel, spec), rtol=1e-10)
            self.assertGreater(float(result.feasibility_gap), 0.0)  # Not yet feasible.
        # 'rescale': the gap uses the Gram-iteration upper bound; it is <= 0 after the rescale.
        result = clip_operator_norm(kernel, spec, max_norm, method="rescale")
        self.assertLessEqual(_embedded_sigma_max(result.kernel, spec) - max_norm,
                             float(result.feasibility_gap) + 1e-12)

    def test_float32_certified(self):
        spec = spectra.ConvSpec((8, 8), strides=2, padding="SAME")
        kernel = layers.random_kernel((3, 3, 4, 8), seed=1, dtype=np.float32)
        result = clip_operator_norm(kernel, spec, 1.0)
        self.assertEqual(result.kernel.dtype, np.float32)
        self.assertLessEqual(_sigma_max(result.kernel, spec), 1.0 + 1e-5)


class SedghiTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("rect_kernel_2to3", (3, 4, 2, 3), (8, 10)),
        ("single_channel_2x3", (2, 3, 1, 1), (6, 6)),
        ("k3_4to2", (3, 3, 4, 2), (7, 5)),
    )
    def test_one_round_matches_numpy_reference(self, kshape, n):
        spec = spectra.ConvSpec(n, padding="CIRCULAR")
        kernel = layers.random_kernel(kshape, seed=7)
        max_norm = 0.6 * _sigma_max(kernel, spec)
        expected = _numpy_sedghi_clip(kernel, n, max_norm)
        for method in ("sedghi", "dykstra"):  # One Dykstra round is one alternating round.
            result = clip_operator_norm(kernel, spec, max_norm, method=method)
            np.testing.assert_allclose(result.kernel, expected, atol=1e-10)
        # The certified method starts from the same round, then rescales exactly.
        result = clip_operator_norm(kernel, spec, max_norm, method="certified")
        sigma_expected = _sigma_max(expected, spec)
        np.testing.assert_allclose(
            result.kernel, expected * min(1.0, max_norm / sigma_expected), atol=1e-10)

    @parameterized.named_parameters(("circular", "CIRCULAR", (8, 8)), ("same", "SAME", (6, 5)))
    def test_repeated_clipping_is_monotone(self, padding, n):
        # brain-research/conv-sv testMultiChannelClipRepeated, smaller: 3 -> 4 channels, 3x4.
        spec = spectra.ConvSpec(n, padding=padding)
        kernel = layers.random_kernel((3, 4, 3, 4), seed=0)
        max_norm = 0.3 * _embedded_sigma_max(kernel, spec)
        sigmas = [_embedded_sigma_max(kernel, spec)]
        current = kernel
        for _ in range(10):
            current = clip_operator_norm(current, spec, max_norm, method="sedghi").kernel
            sigmas.append(_embedded_sigma_max(current, spec))
        self.assertTrue(np.all(np.diff(sigmas) <= 1e-12), msg=str(sigmas))
        self.assertLess(sigmas[-1], sigmas[1])
        ten_rounds = clip_operator_norm(kernel, spec, max_norm, method="sedghi", num_rounds=10)
        np.testing.assert_allclose(ten_rounds.kernel, current, atol=1e-10)
        np.testing.assert_allclose(float(ten_rounds.feasibility_gap) + max_norm, sigmas[-1],
                                   rtol=1e-10)


class DykstraTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("circular", "CIRCULAR", (6, 6), (3, 3, 2, 3), 300),
        ("same", "SAME", (6, 5), (3, 2, 3, 2), 1000),
    )
    def test_converges_to_a_nearer_feasible_point(self, padding, n, kshape, num_rounds):
        spec = spectra.ConvSpec(n, padding=padding)
        kernel = layers.random_kernel(kshape, seed=0)
        max_norm = 0.5 * _embedded_sigma_max(kernel, spec)
        clip = functools.partial(clip_operator_norm, kernel, spec, max_norm)
        dykstra = clip(method="dykstra", num_rounds=num_rounds)
        alternating = clip(method="sedghi", num_rounds=num_rounds)
        rescaled = clip(method="certified", num_rounds=0)
        # Measured: Dykstra is feasible to ~1e-6 (relative) after these rounds; alternating
        # projections to rounding.
        self.assertLessEqual(_embedded_sigma_max(dykstra.kernel, spec), max_norm * (1 + 1e-4))
        np.testing.assert_allclose(float(dykstra.feasibility_gap) + max_norm,
                                   _embedded_sigma_max(dykstra.kernel, spec), rtol=1e-10)
        self.assertLessEqual(_embedded_sigma_max(alternating.kernel, spec),
                             max_norm * (1 + 1e-8))
        distance = {name: float(np.linalg.norm(r.kernel - kernel)) for name, r in
                    (("dykstra", dykstra), ("alternating", alternating), ("rescale", rescaled))}
        # Measured margins: ~3% closer than alternating, ~10% closer than the rescale.
        self.assertLess(distance["dykstra"], 0.99 * distance["alternating"], msg=str(distance))
        self.assertLess(distance["dykstra"], 0.99 * distance["rescale"], msg=str(distance))
        # Nearest-point condition <K0 - K*, Y - K*> <= 0 for the other feasible points Y.
        residual = kernel - np.asarray(dykstra.kernel)
        for other in (alternating, rescaled):
            inner = float(np.sum(residual * (np.asarray(other.kernel) - dykstra.kernel)))
            self.assertLessEqual(inner, 1e-3 * distance["dykstra"] ** 2)


class NoOpAndTransformsTest(parameterized.TestCase):

    @parameterized.named_parameters(*[(m, m) for m in CLIP_METHODS])
    def test_below_the_ball_is_bit_identical(self, method):
        spec = spectra.ConvSpec((6, 7), strides=2, padding="SAME")
        for dtype, use_jit in ((np.float64, False), (np.float32, True)):
            kernel = layers.random_kernel((3, 3, 2, 3), seed=4, dtype=dtype)
            max_norm = 1.5 * _embedded_sigma_max(kernel, spec)
            clip = functools.partial(clip_operator_norm, spec=spec, method=method, num_rounds=2)
            result = (jax.jit(clip) if use_jit else clip)(kernel, max_norm=max_norm)
            self.assertEqual(result.kernel.dtype, dtype)
            self.assertEqual(np.asarray(result.kernel).tobytes(), kernel.tobytes())
            self.assertLess(float(result.feasibility_gap), 0.0)

    @parameterized.named_parameters(*[(m, m) for m in CLIP_METHODS])
    def test_jit_and_vmap_match_a_loop(self, method):
        spec = spectra.ConvSpec((6, 6), padding="SAME", kernel_dilation=(1, 2))
        kernels = layers.random_kernel((3, 2, 3, 2, 3), seed=6)
        kernels[1] *= 1e-3  # Below the ball: returned as is inside vmap too.
        max_norms = np.array([1.0, 2.0, 0.5])

        def clip(k, c):
            return clip_operator_norm(k, spec, c, method=method, num_rounds=2)

        batched = jax.jit(jax.vmap(clip))(kernels, max_norms)
        shared = jax.vmap(clip, in_axes=(0, None))(kernels, 1.0)
        for i in range(3):
            single = clip(kernels[i], max_norms[i])
            np.testing.assert_allclose(batched.kernel[i], single.kernel, atol=1e-12)
            np.testing.assert_allclose(batched.feasibility_gap[i], single.feasibility_gap,
                                       atol=1e-12)
            np.testing.assert_allclose(shared.kernel[i], clip(kernels[i], 1.0).kernel,
                                       atol=1e-12)
        np.testing.assert_array_equal(batched.kernel[1], kernels[1])

    def test_traced_max_norm_under_jit(self):
        spec = spectra.ConvSpec((5, 5), padding="CIRCULAR")
        kernel = layers.random_kernel((2, 2, 2, 2), seed=8)
        fn = jax.jit(lambda c: clip_operator_norm(kernel, spec, c * 2.0).kernel)
        np.testing.assert_allclose(fn(jnp.asarray(0.5)), clip_operator_norm(
            kernel, spec, 1.0).kernel, atol=1e-12)


class PowerTest(parameterized.TestCase):
    """`clip_operator_norm_power`: a warm-started Krylov estimate of the real layer's σ_max."""

    @parameterized.named_parameters(
        *[c for c in layers.layer_cases(("CIRCULAR", "SAME", "VALID", "FULL"))
          if c[0].rsplit("_", 1)[0] in _GRID_SHAPES]
    )
    def test_converged_estimate_is_exact_and_rescales_exactly(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=3)
        exact = _sigma_max(kernel, spec)
        c_in = spec.channels(kshape)[0]
        v0 = np.random.default_rng(0).normal(size=(*spec.input_shape, c_in))
        result = spectra.clip_operator_norm_power(kernel, spec, 0.5 * exact, v0,
                                                  num_iterations=300)
        self.assertLessEqual(float(result.sigma), exact * (1 + 1e-12))  # A lower estimate.
        self.assertAlmostEqual(float(result.sigma), exact, delta=1e-6 * exact)
        self.assertAlmostEqual(_sigma_max(result.kernel, spec), 0.5 * exact, delta=1e-6 * exact)
        self.assertAlmostEqual(float(jnp.linalg.norm(result.vector)), 1.0, places=10)

    @parameterized.parameters(1, 2, 4, 8)
    def test_krylov_estimate_is_a_lower_estimate_and_beats_power(self, num_iterations):
        spec = spectra.ConvSpec((7, 6), padding="SAME", strides=(2, 1))
        kernel = layers.random_kernel((3, 3, 4, 5), seed=1)
        exact = _sigma_max(kernel, spec)
        v = np.random.default_rng(2).normal(size=(7, 6, 4))
        sigma = float(spectra.clip_operator_norm_power(
            kernel, spec, 1e6, v, num_iterations=num_iterations).sigma)
        self.assertLessEqual(sigma, exact * (1 + 1e-12))
        # Plain power iteration with the same number of products, as a reference.
        op = layers.dense_operator(kernel, spec)  # The jitted program of `_sigma_max` above.
        x = v.reshape(-1) / np.linalg.norm(v)
        for _ in range(num_iterations):
            x = op.T @ (op @ x)
            x /= np.linalg.norm(x)
        self.assertGreaterEqual(sigma, np.linalg.norm(op @ x) * (1 - 1e-12))

    def test_below_the_ball_is_bit_identical_and_jit_vmap(self):
        spec = spectra.ConvSpec((6, 6), padding="SAME")
        kernels = jnp.stack([layers.random_kernel((3, 3, 2, 3), seed=s) for s in range(3)])
        vectors = jnp.ones((3, 6, 6, 2))
        big = spectra.clip_operator_norm_power(kernels[0], spec, 1e3, vectors[0])
        np.testing.assert_array_equal(big.kernel, kernels[0])
        fn = functools.partial(spectra.clip_operator_norm_power, spec=spec, num_iterations=3)
        batched = jax.jit(jax.vmap(lambda k, v: fn(k, max_norm=0.3, vector=v)))(kernels, vectors)
        for i in range(3):
            single = fn(kernels[i], max_norm=0.3, vector=vectors[i])
            np.testing.assert_allclose(batched.kernel[i], single.kernel, rtol=1e-10)
            np.testing.assert_allclose(batched.sigma[i], single.sigma, rtol=1e-10)

    def test_errors(self):
        spec = spectra.ConvSpec((6, 6), padding="SAME")
        kernel = jnp.ones((3, 3, 2, 3))
        with self.assertRaisesRegex(ValueError, "vector"):
            spectra.clip_operator_norm_power(kernel, spec, 1.0, jnp.ones((6, 6, 3)))
        with self.assertRaisesRegex(ValueError, "num_iterations"):
            spectra.clip_operator_norm_power(kernel, spec, 1.0, jnp.ones((6, 6, 2)),
                                             num_iterations=-1)
        with self.assertRaisesRegex(ValueError, "max_norm"):
            spectra.clip_operator_norm_power(kernel, spec, 0.0, jnp.ones((6, 6, 2)))


class ErrorsTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.spec = spectra.ConvSpec((6, 6), padding="SAME")
        self.kernel = layers.random_kernel((3, 3, 2, 2))

    @parameterized.named_parameters(("zero", 0.0), ("negative", -1.0), ("nan", float("nan")))
    def test_bad_max_norm(self, max_norm):
        with self.assertRaisesRegex(ValueError, "max_norm"):
            clip_operator_norm(self.kernel, self.spec, max_norm)
        with self.assertRaisesRegex(ValueError, "max_norm"):
            clip_operator_norm(self.kernel, self.spec, jnp.asarray(max_norm))

    def test_non_scalar_max_norm(self):
        with self.assertRaisesRegex(ValueError, "max_norm"):
            clip_operator_norm(self.kernel, self.spec, np.ones(2))

    def test_bad_method_and_rounds(self):
        with self.assertRaisesRegex(ValueError, "method='power'"):
            clip_operator_norm(self.kernel, self.spec, 1.0, method="power")
        with self.assertRaisesRegex(ValueError, "num_rounds"):
            clip_operator_norm(self.kernel, self.spec, 1.0, num_rounds=-1)

    def test_circular_stride_not_dividing_input_works_on_the_stride_1_layer(self):
        # The strided layer is a row subsample of the stride-1 circular layer on that axis.
        spec = spectra.ConvSpec((7, 6), strides=2, padding="CIRCULAR")
        self.assertEqual(spectra.circulant_embedding(spec, self.kernel.shape).strides, (1, 2))
        max_norm = 0.5 * _sigma_max(self.kernel, spec)
        for method in ("certified", "rescale"):
            result = clip_operator_norm(self.kernel, spec, max_norm, method=method)
            self.assertLessEqual(_sigma_max(result.kernel, spec), max_norm * (1 + 1e-9))

    def test_kernel_not_matching_spec(self):
        spec = spectra.ConvSpec((6, 6), padding="SAME", in_features=3)
        with self.assertRaisesRegex(ValueError, "in_features"):
            clip_operator_norm(self.kernel, spec, 1.0)


if __name__ == "__main__":
    absltest.main()
