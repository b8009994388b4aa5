"""Per-frequency matrices and Grams of a circular conv on the host (spectra.numpy._frequencies)
against the direct formula, zherk and the dense operator."""

from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from spectra import ConvSpec
from spectra import exact_circular_spec
from spectra.numpy import _frequencies
from tests.spectra.layers import exact_singular_values
from tests.spectra.layers import random_kernel
from tests.spectra.test_numpy_circulant_prune import CASES


class FrequencyMatricesTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_chunks_are_the_direct_formula_and_the_exact_spectrum(self, index):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=500 + index).astype(np.float64)
        emb = exact_circular_spec(spec, kshape)
        taps = _frequencies._polyphase_taps(kernel, emb)
        with mock.patch.object(_frequencies, "FREQUENCY_CHUNK_ENTRIES", 1):  # One row a chunk.
            chunks = [(c.copy(), c64.copy()) for c, c64 in zip(
                _frequencies._frequency_chunks(kernel, emb, taps=taps),
                _frequencies._frequency_chunks(kernel, emb, np.complex64, taps),
            )]
        self.assertGreater(len(chunks), 1)
        values, start = [], 0
        for m, m64 in chunks:
            self.assertEqual(m64.dtype, np.complex64)
            np.testing.assert_allclose(m64, m, atol=1e-5 * np.abs(m).max())
            for gi in range(spec.feature_group_count):
                for r in range(m.shape[1]):
                    for v in range(m.shape[2]):
                        direct = _frequencies._frequency_matrix(taps, gi, start + r, v)
                        np.testing.assert_allclose(m[gi, r, v], direct, atol=1e-13)
            values.append(np.linalg.svd(m, compute_uv=False).max())
            start += m.shape[1]
        # The largest per-frequency singular value is the circular embedding's norm.
        exact = exact_singular_values(kernel, emb)[0]
        self.assertAlmostEqual(max(values) / exact, 1.0, delta=1e-10)

    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_grams_from_tap_cross_grams_equal_zherk(self, index):
        _, kshape, spec = CASES[index]
        kernel = random_kernel(kshape, seed=300 + index)
        emb = exact_circular_spec(spec, kshape)
        taps = _frequencies._polyphase_taps(kernel.astype(np.float64), emb)
        mats = np.concatenate(
            [m.reshape(m.shape[0], -1, *m.shape[3:]) for m in
             (c.copy() for c in _frequencies._frequency_chunks(kernel, emb, taps=taps))], axis=1
        )  # (g, frequencies, rows, cols), row-major (u, v).
        for gi in range(spec.feature_group_count):
            tap_grams = _frequencies._TapGrams(taps, gi)
            with mock.patch.object(_frequencies, "GRAM_CHUNK_ENTRIES", 50):  # Several chunks.
                grams = [(u, v, g.copy()) for us, vs, gs in tap_grams.chunks()
                         for u, v, g in zip(us, vs, gs)]
            self.assertLen(grams, mats.shape[1])
            for f, (u, v, gram) in enumerate(grams):
                m = mats[gi, f]
                want = m @ m.conj().T if m.shape[0] <= m.shape[1] else m.conj().T @ m
                np.testing.assert_allclose(gram, want, atol=1e-12 * np.abs(want).max())
                # One frequency's Gram (the pruning's tops) is the same sum.
                np.testing.assert_allclose(
                    tap_grams.at(u, v), gram, atol=1e-13 * np.abs(want).max()
                )

    def test_input_side_grams(self):
        kernel = random_kernel((3, 3, 2, 9), seed=5)  # c_out > c_in: the Gram on the input side.
        spec = ConvSpec((6, 7), 1, "SAME")
        emb = exact_circular_spec(spec, kernel.shape)
        taps = _frequencies._polyphase_taps(kernel.astype(np.float64), emb)
        self.assertGreater(taps.cog, taps.cols)
        m = next(iter(_frequencies._frequency_chunks(kernel, emb, taps=taps)))[0, 0, 1]
        _, _, grams = next(iter(_frequencies._TapGrams(taps, 0).chunks()))
        np.testing.assert_allclose(grams[1], m.conj().T @ m, atol=1e-12)


if __name__ == "__main__":
    absltest.main()
