"""Rounding allowances (spectra.numpy._rounding): sizes, errors, and that they cover real
rounding, measured in float32 (where it is large enough to see) against float64."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra.numpy as snp
from spectra import ConvSpec
from spectra._bounds import exact_circular_spec
from spectra.numpy._frequencies import _frequency_chunks
from tests.spectra.layers import random_kernel

_CASES = (
    ("square", (3, 3, 8, 8), ConvSpec((8, 8))),
    ("cin_ne_cout_stride2", (3, 3, 6, 10), ConvSpec((9, 7), strides=(2, 2))),
    ("dilated_circular", (3, 3, 4, 5), ConvSpec((8, 8), padding="CIRCULAR", kernel_dilation=2)),
    ("grouped", (3, 3, 4, 12), ConvSpec((6, 6), feature_group_count=3)),
    ("kernel_larger_than_input", (5, 5, 3, 4), ConvSpec((2, 3), padding=((2, 2), (2, 2)))),
)


class RoundingTest(parameterized.TestCase):
    def test_sizes(self):
        spec = ConvSpec((3, 3))
        wide = snp.rounding_rtol((3, 3, 1024, 1024), spec, ["symbol_grid", "tap_sum"])
        narrow = snp.rounding_rtol((3, 3, 16, 16), spec, ["symbol_grid", "tap_sum"])
        self.assertGreater(wide, narrow)
        self.assertGreater(narrow, 0.0)
        self.assertLess(wide, 1e-7)  # Negligible in float64 even for wide layers.
        single = snp.rounding_rtol((3, 3, 16, 16), spec, ["symbol_grid"], np.float32)
        self.assertGreater(single, narrow * 1e8)  # Scales with the unit roundoff.
        self.assertEqual(snp.rounding_rtol((3, 3, 16, 16), spec, []), 0.0)
        # The largest over the methods.
        both = snp.rounding_rtol((3, 3, 16, 16), spec, ["tap_sum", "dense"])
        self.assertEqual(
            both, max(snp.rounding_rtol((3, 3, 16, 16), spec, [m]) for m in ("tap_sum", "dense"))
        )

    def test_rounded_kernel(self):
        # A kernel whose entries are rounded products (a folded BatchNorm): + u sqrt(rank).
        spec = ConvSpec((6, 5), strides=2)
        kshape = (3, 3, 4, 8)
        plain = snp.rounding_rtol(kshape, spec, ["symbol_grid"])
        rounded = snp.rounding_rtol(kshape, spec, ["symbol_grid"], rounded_kernel=True)
        rank = min(spec.in_dim(kshape), spec.out_dim(kshape))
        term = 1.01 * 2.0**-53 * np.sqrt(rank)
        self.assertAlmostEqual(rounded - plain, term, delta=1e-6 * term)  # Up to the subtraction.

    def test_errors(self):
        spec = ConvSpec((3, 3))
        with self.assertRaisesRegex(ValueError, "methods"):
            snp.rounding_rtol((3, 3, 2, 2), spec, ["power"])
        with self.assertRaisesRegex(ValueError, "dtype"):
            snp.rounding_rtol((3, 3, 2, 2), spec, ["dense"], np.int32)
        with self.assertRaisesRegex(ValueError, "rows"):
            snp.matrix_rtol(-1, 3)
        with self.assertRaisesRegex(ValueError, "cols"):
            snp.matrix_rtol(2, 2.5)

    def test_round_up_and_down(self):
        self.assertGreater(snp.round_up(1.0, 0.0), 1.0)  # Strictly: one ulp at least.
        self.assertLess(snp.round_down(1.0, 0.0), 1.0)
        self.assertAlmostEqual(snp.round_up(2.0, 1e-6), 2.0 * (1 + 1e-6), delta=1e-15)

    @parameterized.parameters(((16, 16),), ((40, 7),), ((3, 200),), ((128, 96),))
    def test_matrix_rtol_covers_float32_svd(self, shape):
        # The float32 SVD's σ_max against float64's (exact to ~1e-16, far below float32's
        # allowance): the float32 allowance must cover the difference.
        rng = np.random.default_rng(sum(shape))
        for scale in (1.0, 1e-3):
            m = rng.standard_normal(shape) * np.geomspace(1, scale, shape[1])
            exact = np.linalg.svd(m, compute_uv=False)[0]
            single = float(np.linalg.svd(m.astype(np.float32), compute_uv=False)[0])
            rho = snp.matrix_rtol(*shape, dtype=np.float32)
            # The float32 input itself is rounded: within u_32 of m entrywise, covered by ρ.
            self.assertLessEqual(abs(single - exact), rho * exact)
            self.assertLessEqual(exact, snp.round_up(single, rho))

    @parameterized.named_parameters(*_CASES)
    def test_frequency_rtol_covers_float32_circulant(self, kshape, spec):
        # The circulant bound computed in single precision (per-frequency matrices from the
        # taps in complex64, eigvalsh of their complex64 Grams) is within the float32 allowance
        # of the float64 bound.
        kernel = random_kernel(kshape, seed=sum(kshape))
        exact = snp.symbol_grid_bound(kernel, spec)
        emb = exact_circular_spec(spec, kshape)
        single = 0.0
        for m in _frequency_chunks(kernel, emb, np.complex64):
            mh = np.conj(np.swapaxes(m, -1, -2))
            gram = m @ mh if m.shape[-2] <= m.shape[-1] else mh @ m
            single = max(single, float(np.linalg.eigvalsh(gram)[..., -1].max()))
        single = float(np.sqrt(np.float32(single)))
        rho = snp.rounding_rtol(kshape, spec, ["symbol_grid"], np.float32)
        self.assertLessEqual(exact, snp.round_up(single, rho))
        self.assertLessEqual(abs(single - exact), rho * exact)
        # And in float64 the allowance is far below any tolerance the report states.
        self.assertLess(snp.rounding_rtol(kshape, spec, ["symbol_grid"]), 1e-9)

    @parameterized.named_parameters(*_CASES)
    def test_tap_sum_rtol_covers_float32(self, kshape, spec):
        kernel = random_kernel(kshape, seed=sum(kshape) + 1)
        exact = snp.tap_sum_bound(kernel, spec)
        g = spec.feature_group_count
        taps = kernel.astype(np.float32).reshape(kshape[0] * kshape[1], kshape[2], g, -1)
        single = max(sum(float(np.linalg.norm(t[:, j], 2)) for t in taps) for j in range(g))
        rho = snp.rounding_rtol(kshape, spec, ["tap_sum"], np.float32)
        self.assertLessEqual(abs(single - exact), rho * exact)


if __name__ == "__main__":
    absltest.main()
