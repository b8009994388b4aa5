"""TT-SVD, TT-matrices and the core-by-core product against dense NumPy in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from spectra import _tt

TOL = 1e-12


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _random_tt(modes, ranks, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((r0, n, r1)) for r0, n, r1 in zip(ranks[:-1], modes, ranks[1:])]


def _decaying(shape, seed=0):
    """A tensor whose unfoldings have decaying singular values (sum of TT terms of rank 1..)."""
    out = np.zeros(shape)
    for k in range(6):
        cores = _random_tt(shape, (1,) + (2,) * (len(shape) - 1) + (1,), seed=seed + k)
        out += 0.3 ** k * np.asarray(_tt.tt_to_full(cores))
    return out


class TTSVDTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("4way", (3, 4, 2, 5)),
        ("5way", (2, 3, 2, 3, 2)),
        ("1way", (7,)),
        ("2way", (4, 6)),
    )
    def test_exact_at_full_rank(self, shape):
        a = _random(shape, seed=1)
        cores = _tt.tt_svd(a)
        np.testing.assert_allclose(_tt.tt_to_full(cores), a, atol=TOL * np.abs(a).max() * 10)
        full = tuple(
            min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(len(shape) + 1))
        self.assertEqual(_tt.tt_ranks(cores), full)
        for core, n in zip(cores, shape):
            self.assertEqual(core.shape[1], n)
        self.assertEqual(_tt.tt_num_params(cores), sum(c.size for c in cores))

    @parameterized.parameters(0.0, 0.01, 0.1, 0.3, 0.7, 1.0)
    def test_rtol_guarantee(self, rtol):
        a = _decaying((4, 3, 5, 4), seed=2)
        cores = _tt.tt_svd(a, rtol=rtol)
        err = np.linalg.norm(np.asarray(_tt.tt_to_full(cores)) - a)
        self.assertLessEqual(err, rtol * np.linalg.norm(a) * (1 + 1e-10) + 1e-12)
        if rtol >= 0.1:  # The tolerance must actually truncate this tensor.
            self.assertLess(_tt.tt_num_params(cores), _tt.tt_num_params(_tt.tt_svd(a)))

    def test_recovers_low_tt_rank(self):
        ranks = (1, 2, 3, 2, 1)
        a = np.asarray(_tt.tt_to_full(_random_tt((3, 4, 5, 3), ranks, seed=3)))
        cores = _tt.tt_svd(a, rtol=1e-10)
        self.assertEqual(_tt.tt_ranks(cores), ranks)
        np.testing.assert_allclose(_tt.tt_to_full(cores), a, atol=1e-10 * np.abs(a).max())

    @parameterized.named_parameters(
        ("int", 2, (1, 2, 2, 2, 1)),
        ("sequence", (1, 3, 2), (1, 1, 3, 2, 1)),
        ("capped_by_full_rank", 100, (1, 3, 12, 4, 1)),
    )
    def test_max_rank_respected_and_jittable(self, max_rank, expected):
        a = _random((3, 4, 3, 4), seed=4)
        cores = _tt.tt_svd(a, max_rank=max_rank)
        self.assertEqual(_tt.tt_ranks(cores), expected)
        jitted = jax.jit(lambda t: _tt.tt_svd(t, max_rank=max_rank))(a)
        for got, want in zip(jitted, cores):
            np.testing.assert_allclose(got, want, atol=1e-10)

    def test_max_rank_error_matches_discarded_tail(self):
        # Quasi-optimality: the error is at most sqrt(d-1) x the best rank-r error of each
        # unfolding; for d = 2 TT-SVD is the truncated SVD, so the error is exactly the tail.
        a = _random((6, 8), seed=5)
        s = np.linalg.svd(a, compute_uv=False)
        cores = _tt.tt_svd(a, max_rank=3)
        err = np.linalg.norm(np.asarray(_tt.tt_to_full(cores)) - a)
        self.assertAlmostEqual(err, np.linalg.norm(s[3:]), places=10)

    def test_vmap_with_max_rank(self):
        stack = _random((3, 2, 3, 4), seed=6)
        batched = jax.vmap(lambda t: _tt.tt_to_full(_tt.tt_svd(t, max_rank=(2, 3))))(stack)
        for t, got in zip(stack, batched):
            np.testing.assert_allclose(got, _tt.tt_to_full(_tt.tt_svd(t, max_rank=(2, 3))),
                                       atol=1e-10)

    def test_rtol_under_jit_raises(self):
        with self.assertRaisesRegex(ValueError, "rtol"):
            jax.jit(lambda t: _tt.tt_svd(t, rtol=0.1))(_random((2, 3, 4)))

    @parameterized.named_parameters(
        ("max_rank_zero", {"max_rank": 0}, "max_rank"),
        ("max_rank_length", {"max_rank": (2, 2, 2)}, "max_rank"),
        ("max_rank_entry", {"max_rank": (2, 0)}, "max_rank"),
        ("rtol_negative", {"rtol": -0.1}, "rtol"),
    )
    def test_bad_arguments(self, kwargs, name):
        with self.assertRaisesRegex(ValueError, name):
            _tt.tt_svd(_random((2, 3, 4)), **kwargs)

    def test_scalar_raises(self):
        with self.assertRaisesRegex(ValueError, "tensor"):
            _tt.tt_svd(np.float64(1.0))


class TTMatrixTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("d1", (6,), (5,)),
        ("d2", (3, 4), (5, 2)),
        ("d3", (2, 3, 2), (2, 2, 3)),
    )
    def test_round_trip_and_products(self, row_modes, col_modes):
        m, n = math.prod(row_modes), math.prod(col_modes)
        w = _random((m, n), seed=7)
        cores = _tt.tt_matrix_svd(w, row_modes, col_modes)
        for core, mk, nk in zip(cores, row_modes, col_modes):
            self.assertEqual(core.shape[1:3], (mk, nk))
        np.testing.assert_allclose(_tt.tt_matrix_to_full(cores), w, atol=1e-12)
        x = _random((2, 3, m), seed=8)
        np.testing.assert_allclose(_tt.tt_matrix_apply(cores, x), x @ w, atol=1e-11)
        v = _random((4, n), seed=9)
        np.testing.assert_allclose(_tt.tt_matvec(cores, v), v @ w.T, atol=1e-11)

    def test_index_convention(self):
        # W((i1, i2), (j1, j2)) = G1[i1, j1] G2[i2, j2], rows and columns row-major.
        rng = np.random.default_rng(10)
        g1, g2 = rng.standard_normal((1, 2, 3, 2)), rng.standard_normal((2, 4, 5, 1))
        w = np.asarray(_tt.tt_matrix_to_full([g1, g2]))
        self.assertEqual(w.shape, (8, 15))
        i1, i2, j1, j2 = 1, 3, 2, 4
        self.assertAlmostEqual(w[i1 * 4 + i2, j1 * 5 + j2],
                               float(g1[0, i1, j1] @ g2[:, i2, j2, 0]), places=12)

    def test_truncated_matrix(self):
        w = _random((16, 12), seed=11)
        cores = _tt.tt_matrix_svd(w, (4, 4), (3, 4), rtol=0.5)
        err = np.linalg.norm(np.asarray(_tt.tt_matrix_to_full(cores)) - w)
        self.assertLessEqual(err, 0.5 * np.linalg.norm(w) * (1 + 1e-10))
        capped = _tt.tt_matrix_svd(w, (4, 4), (3, 4), max_rank=2)
        self.assertEqual(_tt.tt_ranks(capped), (1, 2, 1))
        self.assertEqual(_tt.tt_num_params(capped), 4 * 3 * 2 + 2 * 4 * 4)

    @parameterized.named_parameters(
        ("rows", (3, 3), (5, 2), "row_modes"),
        ("cols", (3, 4), (5, 3), "col_modes"),
        ("lengths", (12,), (5, 2), "row_modes"),
        ("zero_mode", (12, 0), (5, 2), "row_modes"),
    )
    def test_bad_modes(self, row_modes, col_modes, name):
        with self.assertRaisesRegex(ValueError, name):
            _tt.tt_matrix_svd(_random((12, 10)), row_modes, col_modes)

    def test_apply_bad_input(self):
        cores = _tt.tt_matrix_svd(_random((12, 10)), (3, 4), (5, 2))
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            _tt.tt_matrix_apply(cores, jnp.ones((2, 10)))

    def test_apply_float32(self):
        cores = [c.astype(np.float32) for c in _tt.tt_matrix_svd(_random((12, 10)), (3, 4),
                                                                   (5, 2))]
        y = _tt.tt_matrix_apply(cores, np.ones((2, 12), np.float32))
        self.assertEqual(y.dtype, jnp.float32)


if __name__ == "__main__":
    absltest.main()
