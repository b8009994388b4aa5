"""Certified spectral-norm upper bounds (`spectra._bounds`) against the dense ground truth."""

import functools

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from spectra import _bounds
from tests.spectra import layers

UPPER_BOUNDS = _bounds.UPPER_BOUNDS
RTOL = 1e-10  # Slack for rounding only.

# Circular layers whose strides do not divide the input (a row subsample of the stride-1 layer).
_EXTRA_CASES = (
    ("circular_stride_not_dividing", (2, 3, 2, 3), spectra.ConvSpec((5, 7), 2, "CIRCULAR")),
    ("circular_stride_not_dividing_dilated_groups", (3, 2, 1, 4),
     spectra.ConvSpec((7, 6), (2, 4), "CIRCULAR", (2, 1), 2)),
)


def _all_cases():
    return [*layers.layer_cases(), *_EXTRA_CASES]


def _fft_exact(spec):
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


class BoundsAboveExactTest(parameterized.TestCase):

    @parameterized.named_parameters(*_all_cases())
    def test_every_bound_is_above_exact(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=11)
        exact = layers.exact_singular_values(kernel, spec)[0]
        v = {name: float(f(kernel, spec)) for name, f in UPPER_BOUNDS.items()}
        for name, value in v.items():
            self.assertGreaterEqual(value, exact * (1 - RTOL), msg=name)
        if _fft_exact(spec):
            np.testing.assert_allclose(v["symbol_grid"], exact, rtol=RTOL)
        # Orderings that hold in exact arithmetic.
        for lo, hi in [
            ("symbol_grid", "gram_iteration"), ("symbol_grid", "tensor_norm"),
            ("symbol_grid", "symbol_sup"), ("tensor_norm", "matricisation"),
            ("matricisation", "singla_feizi"), ("l1_matrix", "l1_schur"),
            ("l1_matrix", "frobenius"), ("frobenius", "frobenius_kernel"),
        ]:
            self.assertLessEqual(v[lo], v[hi] * (1 + RTOL), msg=f"{lo} <= {hi}")


class TightnessTest(absltest.TestCase):

    def test_one_by_one_kernel(self):
        kernel = layers.random_kernel((1, 1, 3, 5), seed=2)
        spec = spectra.ConvSpec((5, 4), padding="SAME")
        norm = np.linalg.norm(kernel[0, 0], 2)
        np.testing.assert_allclose(layers.exact_singular_values(kernel, spec)[0], norm)
        for name in ("symbol_grid", "tensor_norm", "symbol_sup", "matricisation",
                     "singla_feizi", "tap_sum"):
            np.testing.assert_allclose(UPPER_BOUNDS[name](kernel, spec), norm, rtol=1e-12,
                                       err_msg=name)
        # Gram iteration overshoots by at most rank^(1/2^(t+1)).
        gram = float(UPPER_BOUNDS["gram_iteration"](kernel, spec))
        self.assertBetween(gram, norm * (1 - RTOL), norm * 3 ** (1 / 128) * (1 + RTOL))
        np.testing.assert_allclose(
            UPPER_BOUNDS["araujo_lipbound"](kernel, spec), np.linalg.norm(kernel), rtol=1e-12)
        positive = np.abs(kernel)
        np.testing.assert_allclose(UPPER_BOUNDS["l1_matrix"](positive, spec),
                                   np.linalg.norm(positive[0, 0], 2), rtol=1e-12)

    def test_identity_like_kernel(self):
        kernel = np.zeros((3, 3, 4, 4))
        kernel[1, 1] = 2.0 * np.eye(4)
        spec = spectra.ConvSpec((6, 5), padding="SAME")
        for name in ("symbol_grid", "symbol_sup", "tap_sum", "l1_matrix", "l1_schur"):
            np.testing.assert_allclose(UPPER_BOUNDS[name](kernel, spec), 2.0, rtol=1e-12,
                                       err_msg=name)

    def test_symbol_sup_correction_is_sharp(self):
        # |1 - e^{-iw}| peaks at w = π, which a 3-point grid misses: max_grid = √3 = 2 cos(π/6),
        # and the cos correction restores the sup exactly.
        kernel = np.array([1.0, -1.0]).reshape(2, 1, 1, 1)
        spec = spectra.ConvSpec((4, 1), padding="CIRCULAR")
        np.testing.assert_allclose(_bounds.symbol_sup_bound(kernel, spec, grid_size=(3, 1)), 2.0,
                                   rtol=1e-12)
        np.testing.assert_allclose(layers.exact_singular_values(kernel, spec)[0], 2.0)

    def test_grid_corrections_bound_the_fine_grid_sup(self):
        kernel = layers.random_kernel((3, 2, 2, 3), seed=4)
        spec = spectra.ConvSpec((8, 8), padding="VALID")
        sym = np.fft.fft2(kernel, s=(256, 256), axes=(0, 1)).transpose(0, 1, 3, 2)
        sup2 = np.linalg.svd(sym, compute_uv=False)[..., 0].max()
        sup_f = np.linalg.norm(sym, axis=(-2, -1)).max()
        for grid in (3, (5, 2), 8):
            self.assertGreaterEqual(
                float(_bounds.symbol_sup_bound(kernel, spec, grid_size=grid)), sup2 * (1 - RTOL))
            self.assertGreaterEqual(
                float(_bounds.araujo_lipbound(kernel, spec, grid_size=grid)), sup_f * (1 - RTOL))
        # The default grid is within 2% of the sup.
        self.assertLess(float(_bounds.symbol_sup_bound(kernel, spec)), 1.0196 * sup2)

    def test_real_tensor_norm_is_not_a_bound(self):
        # K[0] = I, K[1] = rotation by 90°: σ_max = 2, but sqrt(2) * (real tensor norm) = sqrt(2).
        kernel = np.zeros((2, 1, 2, 2))
        kernel[0, 0] = np.eye(2)
        kernel[1, 0] = [[0.0, -1.0], [1.0, 0.0]]
        spec = spectra.ConvSpec((8, 1), padding="CIRCULAR")
        exact = layers.exact_singular_values(kernel, spec)[0]
        np.testing.assert_allclose(exact, 2.0)
        theta = np.linspace(0, np.pi, 721)
        real_norm = max(np.linalg.norm(np.cos(t) * kernel[0, 0] + np.sin(t) * kernel[1, 0], 2)
                        for t in theta)
        self.assertAlmostEqual(np.sqrt(2) * real_norm, np.sqrt(2))
        self.assertGreaterEqual(float(_bounds.tensor_norm_bound(kernel, spec)), exact * (1 - RTOL))

    def test_circular_stride_not_dividing_is_not_polyphase(self):
        # Rows 0, 2, 4 of a 5-px circular [1, 1] conv: σ = √3 > √2 = the stride-2 polyphase sup.
        kernel = np.ones((2, 1, 1, 1))
        spec = spectra.ConvSpec((5, 1), (2, 1), "CIRCULAR")
        exact = layers.exact_singular_values(kernel, spec)[0]
        np.testing.assert_allclose(exact, np.sqrt(3))
        for name, f in UPPER_BOUNDS.items():
            self.assertGreaterEqual(float(f(kernel, spec)), exact * (1 - RTOL), msg=name)
        zero_padded = spectra.ConvSpec((5, 1), (2, 1), "VALID")  # Polyphase applies: √2.
        np.testing.assert_allclose(_bounds.symbol_sup_bound(kernel, zero_padded), np.sqrt(2))

    def test_polyphase_warm_start_is_the_exact_circular_norm(self):
        for name, kshape, spec in layers.circular_fft_cases():
            if spec.strides != (1, 1):
                kernel = layers.random_kernel(kshape, seed=6)
                np.testing.assert_allclose(
                    _bounds.tensor_norm_bound(kernel, spec, num_iterations=0),
                    layers.exact_singular_values(kernel, spec)[0], rtol=RTOL, err_msg=name)


# A zero-padded layer with stride, dilation and groups: every code path of every bound.
_TRANSFORM_KSHAPE = (3, 2, 2, 4)
_TRANSFORM_SPEC = spectra.ConvSpec((8, 8), (2, 1), "SAME", (1, 2), 2)


class TransformsTest(parameterized.TestCase):

    @parameterized.parameters(*UPPER_BOUNDS)
    def test_jit_vmap_grad(self, name):
        kshape, spec = _TRANSFORM_KSHAPE, _TRANSFORM_SPEC
        f = functools.partial(UPPER_BOUNDS[name], spec=spec)
        kernels = layers.random_kernel((3, *kshape), seed=8)
        # One compile: values and gradients of 3 stacked kernels under jit(vmap(.)).
        values, grads = jax.jit(jax.vmap(jax.value_and_grad(f)))(kernels)
        np.testing.assert_allclose(values, [f(k) for k in kernels], rtol=1e-10)
        self.assertTrue(np.all(np.isfinite(grads)))
        # Directional derivative against central differences (float64, smooth point).
        direction = layers.random_kernel(kshape, seed=9)
        eps = 1e-6
        fd = (float(f(kernels[0] + eps * direction)) - float(f(kernels[0] - eps * direction)))
        fd /= 2 * eps
        np.testing.assert_allclose(np.vdot(grads[0], direction), fd, rtol=1e-5, atol=1e-7)


class ValidationTest(absltest.TestCase):

    def test_bad_arguments(self):
        kernel = np.ones((3, 3, 2, 2))
        spec = spectra.ConvSpec((6, 6))
        with self.assertRaisesRegex(ValueError, "grid_size"):
            _bounds.symbol_sup_bound(kernel, spec, grid_size=2)
        with self.assertRaisesRegex(ValueError, "grid_size"):
            _bounds.araujo_lipbound(kernel, spec, grid_size=(8, 8, 8))
        with self.assertRaisesRegex(ValueError, "num_iterations"):
            _bounds.gram_iteration_bound(kernel, spec, num_iterations=-1)
        with self.assertRaisesRegex(ValueError, "num_iterations"):
            _bounds.tensor_norm_bound(kernel, spec, num_iterations=-1)
        with self.assertRaisesRegex(ValueError, "kernel"):
            _bounds.l1_matrix_bound(np.ones((3, 3, 2)), spec)

    def test_integer_kernel_is_promoted(self):
        spec = spectra.ConvSpec((4, 4), padding="CIRCULAR")
        kernel = np.zeros((1, 1, 1, 1), dtype=np.int32) + 3
        for name, f in UPPER_BOUNDS.items():
            self.assertAlmostEqual(float(f(kernel, spec)), 3.0, places=1, msg=name)


if __name__ == "__main__":
    absltest.main()
