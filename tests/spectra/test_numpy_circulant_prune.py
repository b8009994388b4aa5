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
