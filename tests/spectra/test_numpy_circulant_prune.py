"""The pruned circulant bound (wide layers) against the unpruned one and the dense operator."""

from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra.numpy as snp
from spectra import ConvSpec
from spectra.numpy import _fourier
from tests.spectra.layers import exact_singular_values
from tests.spectra.layers import random_kernel

#: (name, kernel shape, spec): zero padding, stride, dilation, groups, circular, non-square.
CASES = [
    ("same_3x3", (3, 3, 6, 5), ConvSpec((6, 5), 1, "SAME")),
    ("stride2_same", (3, 3, 4, 6), ConvSpec((7, 6), 2, "SAME")),
    ("dilated_valid", (3, 2, 5, 4), ConvSpec((8, 7), 1, "VALID", 2)),
    ("groups2_same", (3, 3, 3, 6), ConvSpec((5, 6), 1, "SAME", 1, 2)),
    ("circular", (3, 3, 4, 4), ConvSpec((6, 6), 1, "CIRCULAR")),
    ("circular_stride2", (3, 3, 3, 5), ConvSpec((6, 8), 2, "CIRCULAR")),
    ("depthwise_x2_stride2", (3, 3, 1, 8), ConvSpec((8, 6), 2, "SAME", 1, 4)),
]


class PrunedCirculantTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_pruned_equals_full(self, index):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=100 + index)
        with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", 10**9):
            full = snp.circulant_top(kernel, spec)
        with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", 2):
            pruned = snp.circulant_top(kernel, spec)
        np.testing.assert_allclose(pruned.group_bounds, full.group_bounds, rtol=1e-9)
        self.assertAlmostEqual(pruned.bound / full.bound, 1.0, delta=1e-9)
        self.assertEqual(pruned.bound, pruned.group_bounds.max())
        self.assertEqual(pruned.vector.shape, full.vector.shape)
        exact = exact_singular_values(kernel, spec)[0]
        self.assertGreaterEqual(pruned.bound * (1 + 1e-12), exact)
        if spec.is_circular:  # Strides divide the input: the circulant bound is the exact norm.
            self.assertAlmostEqual(pruned.bound / exact, 1.0, delta=1e-10)

    def test_wide_layer_default_threshold(self):
        kernel = random_kernel((3, 3, 96, 100), seed=7)
        spec = ConvSpec((3, 3), 1, "SAME")
        pruned = snp.circulant_top(kernel, spec)  # Pruned: both sides >= PRUNE_MIN_SIDE.
        with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", 10**9):
            full = snp.circulant_top(kernel, spec, with_vector=False)
        self.assertAlmostEqual(pruned.bound / full.bound, 1.0, delta=1e-9)
        exact = exact_singular_values(kernel, spec)[0]
        self.assertGreaterEqual(pruned.bound * (1 + 1e-12), exact)

    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_both_pass_two_paths_agree(self, index):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=400 + index)
        tops = {}
        for pays in (True, False):
            with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", 2), mock.patch.object(
                _fourier, "_tap_grams_pay", lambda *a, pays=pays: pays
            ):
                tops[pays] = snp.circulant_top(kernel, spec)
        np.testing.assert_allclose(tops[True].group_bounds, tops[False].group_bounds, rtol=1e-10)
        exact = exact_singular_values(kernel, spec)[0]
        self.assertGreaterEqual(tops[True].bound * (1 + 1e-12), exact)

    @parameterized.parameters((5, 9), (9, 5), (7, 7))
    def test_gram_is_the_smaller_hermitian_gram(self, rows, cols):
        rng = np.random.default_rng(rows * cols)
        m = rng.standard_normal((rows, cols)) + 1j * rng.standard_normal((rows, cols))
        want = m @ m.conj().T if rows <= cols else m.conj().T @ m
        got = _fourier._gram(m)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        np.testing.assert_array_equal(got, got.conj().T)  # Both triangles, exactly Hermitian.

    @parameterized.parameters(6, 24, 80)
    def test_top_vector(self, n):
        rng = np.random.default_rng(n)
        m = rng.standard_normal((n, 2 * n)) + 1j * rng.standard_normal((n, 2 * n))
        gram = m @ m.conj().T
        lam = np.linalg.eigvalsh(gram)
        vec = _fourier._top_vector(gram)
        self.assertAlmostEqual(np.linalg.norm(vec), 1.0, delta=1e-12)
        quotient = float(np.real(vec.conj() @ gram @ vec))
        if n <= _fourier.TOP_VECTOR_STEPS:  # The whole space: an exact top eigenvector.
            self.assertAlmostEqual(quotient / lam[-1], 1.0, delta=1e-12)
            residual = np.linalg.norm(gram @ vec - quotient * vec) / lam[-1]
            self.assertLess(residual, 1e-10)
        else:  # A warm start: well above the second eigenvalue's share, never above the top.
            self.assertLessEqual(quotient, lam[-1] * (1 + 1e-12))
            self.assertGreater(quotient, 0.9 * lam[-1])
        rank_one = np.outer(np.arange(1.0, n + 1), np.arange(1.0, n + 1)) + 0j
        top = _fourier._top_vector(rank_one)  # An invariant Krylov space after one step.
        self.assertAlmostEqual(abs(top @ np.arange(1.0, n + 1)) / np.linalg.norm(
            np.arange(1.0, n + 1)), 1.0, delta=1e-12)

    @parameterized.parameters(((3, 6, 4), False), ((2, 5, 8), True), ((4, 4), False))
    def test_stack_singular_values(self, shape, complex_):
        rng = np.random.default_rng(len(shape))
        m = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0)
        # Well conditioned by construction (a dominant 4 I: σ_min / σ_max above the Gram path's
        # 0.1), so every matrix takes the Gram path.
        m = m + 4.0 * np.eye(*shape[-2:])
        sv = np.linalg.svd(m, compute_uv=False)
        self.assertTrue(np.all(sv[..., -1] ** 2 >= _fourier.GRAM_MIN_RATIO * sv[..., 0] ** 2))
        want = np.linalg.svd(m, compute_uv=False)
        with mock.patch.object(np.linalg, "svd", side_effect=AssertionError("svd called")):
            got = _fourier._stack_singular_values(m)
        self.assertEqual(got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * want.max())
        # A rank-deficient and a badly conditioned matrix in the stack: those two by the SVD
        # (exact zeros and small values stay accurate), the others by their Gram.
        bad = np.array(m.reshape(-1, *shape[-2:]))
        bad[0, :, -1], bad[0, -1, :] = 0.0, 0.0
        bad[-1, :, 0] *= 1e-7
        bad[-1, 0, :] *= 1e-7
        want = np.linalg.svd(bad, compute_uv=False)
        got = _fourier._stack_singular_values(bad)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15 * want.max())
        self.assertLess(got[0, -1], 1e-14 * want.max())  # Not sqrt(u) σ_1, as from a Gram.
        self.assertEqual(_fourier._stack_singular_values(np.zeros((2, 3, 0))).shape, (2, 0))

    def test_below_certificate(self):
        rng = np.random.default_rng(0)
        m = rng.standard_normal((8, 8)) + 1j * rng.standard_normal((8, 8))
        gram = m @ m.conj().T
        lam = np.linalg.eigvalsh(gram)[-1]
        self.assertTrue(_fourier._below(gram.copy(), lam * 1.001))
        self.assertFalse(_fourier._below(gram.copy(), lam * 0.999))
        self.assertTrue(_fourier._below(np.zeros((3, 3), complex), 0.0))


if __name__ == "__main__":
    absltest.main()


class ScaledVariantsTest(parameterized.TestCase):
    """circulant_tops: a kernel and its output-scaled variants (one Gram per frequency)."""

    @parameterized.named_parameters(
        *[
            (f"{c[0]}_{p}", i, p)
            for i, c in enumerate(CASES)
            for p in ("pruned_tap_grams", "pruned_zherk", "full")
        ]
    )
    def test_equals_separate_and_bounds_dense(self, index, prune):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=200 + index)
        rng = np.random.default_rng(index)
        scales = [rng.uniform(0.2, 1.8, kshape[3]), -rng.uniform(0.2, 1.8, kshape[3])]
        side = 2 if prune.startswith("pruned") else 10**9
        pays = prune == "pruned_tap_grams"
        with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", side), mock.patch.object(
            _fourier, "_tap_grams_pay", lambda *a: pays
        ):
            tops = snp.circulant_tops(kernel, spec, scales)
            separate = [snp.circulant_top(kernel, spec)] + [
                snp.circulant_top(np.asarray(kernel, np.float64) * s, spec) for s in scales
            ]
        self.assertLen(tops, 3)
        for top, ref, s in zip(tops, separate, [None] + scales):
            np.testing.assert_allclose(top.group_bounds, ref.group_bounds, rtol=1e-9)
            self.assertEqual(top.bound, top.group_bounds.max())
            self.assertEqual(top.vector.shape, ref.vector.shape)
            k = np.asarray(kernel, np.float64) * (1.0 if s is None else s)
            exact = exact_singular_values(k, spec)[0]  # Float64 dense operator.
            self.assertGreaterEqual(top.bound * (1 + 1e-12), exact)

    @parameterized.parameters(
        ((3, 3, 6, 5), 1, True), ((3, 3, 6, 5), 1, False), ((3, 3, 6, 9), 2, True),
        ((3, 3, 6, 9), 2, False),
    )
    def test_warm_start_is_a_top_singular_vector(self, kshape, stride, pays):
        # Circular, strides dividing: the plane wave of the winning frequency (formed once, at
        # the end, from the Gram's eigenvector) is a top singular vector of the layer, of the
        # kernel and of its scaled variant, on both Gram paths.
        spec = ConvSpec((8, 8), strides=stride, padding="CIRCULAR")
        rng = np.random.default_rng(sum(kshape) + stride)
        kernel = rng.standard_normal(kshape)
        scale = rng.uniform(0.2, 1.8, kshape[3])
        with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", 2), mock.patch.object(
            _fourier, "_tap_grams_pay", lambda *a: pays
        ):
            tops = snp.circulant_tops(kernel, spec, [scale])
        for top, k in zip(tops, (kernel, kernel * scale)):
            v = top.vector
            gain = np.linalg.norm(snp.ConvOperator(k, spec).apply(v)) / np.linalg.norm(v)
            self.assertAlmostEqual(gain / top.bound, 1.0, delta=1e-12)
            self.assertAlmostEqual(top.bound / exact_singular_values(k, spec)[0], 1.0, delta=1e-10)

    def test_no_scales_is_circulant_top(self):
        kernel = random_kernel((3, 3, 4, 6), seed=3)
        spec = ConvSpec((7, 6), 2, "SAME")
        (top,) = snp.circulant_tops(kernel, spec, with_vector=False)
        self.assertEqual(top.bound, snp.circulant_top(kernel, spec).bound)
        self.assertIsNone(top.vector)


class TapSumFloorTest(parameterized.TestCase):
    """tap_sum_bound(floor=...): the looser value only where the tap sum exceeds the floor."""

    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_floor(self, index):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=300 + index)
        exact_taps = snp.tap_sum_bound(kernel, spec, per_group=True)
        dense = exact_singular_values(kernel, spec)[0]
        g = spec.feature_group_count
        for floor in (exact_taps * 0.5, exact_taps * 0.999, exact_taps * 1.001, exact_taps * 2):
            got = snp.tap_sum_bound(kernel, spec, per_group=True, floor=floor)
            self.assertEqual(got.shape, (g,))
            # Never below the tap sum (an upper bound on each group's σ_max, so on the layer's).
            self.assertTrue(np.all(got >= exact_taps * (1 - 1e-12)))
            self.assertGreaterEqual(got.max() * (1 + 1e-12), dense)
            # The smaller of the two bounds per group is unchanged.
            np.testing.assert_allclose(
                np.minimum(got, floor), np.minimum(exact_taps, floor), rtol=1e-12
            )
            # Below the floor: the exact tap sum.
            below = exact_taps < floor
            np.testing.assert_allclose(got[below], exact_taps[below], rtol=1e-12)
        # Far above the floor: the SVDs are skipped (the Frobenius sum, strictly larger here).
        loose = snp.tap_sum_bound(kernel, spec, per_group=True, floor=exact_taps * 0.5)
        if min(kshape[2], kshape[3] // g) == 1:  # Depthwise: each tap is a vector, its norm exact.
            np.testing.assert_allclose(loose, exact_taps, rtol=1e-12)
        else:
            self.assertTrue(np.all(loose > exact_taps))
