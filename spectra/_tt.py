"""Tensor-train (TT) decompositions: TT-SVD, TT-matrices and their core-by-core product.

A d-way tensor ``A`` of shape ``(n_1, ..., n_d)`` in the TT format (Oseledets 2011) is

.. math::

  A(i_1, \\dots, i_d) = G_1[i_1] G_2[i_2] \\cdots G_d[i_d],

with ``G_k[i_k]`` an ``r_{k-1} x r_k`` matrix and ``r_0 = r_d = 1``. A core is stored as an array of
shape ``(r_{k-1}, n_k, r_k)``; ``(r_0, ..., r_d)`` are the TT-ranks.

A TT-matrix (Novikov et al. 2015) is a matrix ``W`` of shape ``(M, N)``, ``M = prod m_k``,
``N = prod n_k``, whose entries are

.. math::

  W\\big((i_1, \\dots, i_d), (j_1, \\dots, j_d)\\big) = G_1[i_1, j_1] \\cdots G_d[i_d, j_d],

with cores of shape ``(r_{k-1}, m_k, n_k, r_k)``. Row and column multi-indices are row-major with
the first mode most significant: ``i = ((i_1 m_2 + i_2) m_3 + i_3) ...`` (NumPy's ``reshape``).

Everything here is pure ``jax.numpy``. :func:`tt_svd` and :func:`tt_matrix_svd` are jit-able in
``max_rank`` mode (static ranks) and not in ``rtol`` mode (the ranks depend on the data).

References:
  I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011 (Algorithm 1,
  TT-SVD, and its Theorem 2.2 error bound).
  A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
  T. Garipov, D. Podoprikhin, A. Novikov, D. Vetrov, "Ultimate tensorization: compressing
  convolutional and FC layers alike", arXiv:1611.03214, 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectra._spec import is_concrete


def normalize_modes(values: Sequence[int], name: str) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (TT mode sizes) as a tuple of ints.

    Args:
      values: the mode sizes, e.g. ``row_modes`` of :func:`tt_matrix_svd`.
      name: the argument's name, for the error message.

    Raises:
      ValueError: naming ``name`` when ``values`` is empty, not a sequence of ints, or holds
        an int < 1.

    >>> normalize_modes([4, 2], "in_modes")
    (4, 2)
    """
    try:
        out = tuple(int(v) for v in values)
    except TypeError as e:
        raise ValueError(f"{name}={values!r} must be a sequence of positive ints") from e
    if not out or any(v < 1 for v in out) or any(v != w for v, w in zip(out, values)):
        raise ValueError(f"{name}={values!r} must be a non-empty sequence of positive ints")
    return out


def _max_ranks(max_rank, num_inner: int) -> tuple[int | None, ...]:
    """``max_rank`` (None, an int or ``num_inner`` ints) as ``num_inner`` caps (None: no cap)."""
    if max_rank is None:
        return (None,) * num_inner
    if isinstance(max_rank, (int, np.integer)):
        if max_rank < 1:
            raise ValueError(f"max_rank={max_rank!r} must be >= 1")
        return (int(max_rank),) * num_inner
    ranks = tuple(max_rank)
    if len(ranks) != num_inner:
        raise ValueError(
            f"max_rank={max_rank!r} must be an int or a sequence of {num_inner} inner ranks "
            f"(one per bond of the {num_inner + 1}-way tensor)"
        )
    if any(not isinstance(r, (int, np.integer)) or r < 1 for r in ranks):
        raise ValueError(f"max_rank={max_rank!r} must hold ints >= 1")
    return tuple(int(r) for r in ranks)


def _check_rtol(rtol) -> float | None:
    if rtol is None:
        return None
    rtol = float(rtol)
    if not rtol >= 0.0:  # Also rejects NaN.
        raise ValueError(f"rtol={rtol!r} must be >= 0")
    return rtol


def _truncation_rank(singular_values: np.ndarray, delta: float) -> int:
    """Smallest ``r >= 1`` with ``sqrt(sum_{i >= r} s_i^2) <= delta`` (``s`` sorted descending)."""
    tails = np.sqrt(np.cumsum(singular_values[::-1] ** 2))[::-1]  # tails[i] = ||s[i:]||.
    below = np.nonzero(tails <= delta)[0]
    return max(1, int(below[0])) if below.size else len(singular_values)


def tt_svd(
    tensor: jax.typing.ArrayLike,
    *,
    max_rank: int | Sequence[int] | None = None,
    rtol: float | None = None,
) -> list[jax.Array]:
    """TT decomposition of a d-way tensor by sequential truncated SVDs (TT-SVD).

    Oseledets (2011), Algorithm 1: unfold ``(r_{k-1} n_k) x (n_{k+1} ... n_d)``, keep the leading
    ``r_k`` singular triplets, carry ``diag(s) V^T`` to the next step.

    * Both ``max_rank`` and ``rtol`` None: full ranks ``r_k = min(prod n_{<=k}, prod n_{>k})``,
      and ``tt_to_full(cores)`` equals ``tensor`` up to rounding (**exact**).
    * ``max_rank``: ranks ``r_k = min(max_rank_k, full r_k)`` (static, so this mode works under
      ``jax.jit`` and ``jax.vmap``). An **approximation**, quasi-optimal: the error is at most
      ``sqrt(d - 1)`` times that of the best TT approximation with these ranks.
    * ``rtol``: each step drops the longest tail of singular values whose norm is at most
      ``rtol ||A||_F / sqrt(d - 1)``, which **guarantees** ``||A - TT(A)||_F <= rtol ||A||_F``
      (Oseledets, Theorem 2.2). The ranks depend on the values, so this mode needs a concrete
      ``tensor``: it is **not jit-able** (ValueError under ``jax.jit``). With ``max_rank`` as well,
      each rank is the smaller of the two and the guarantee no longer holds.

    Args:
      tensor: array of shape ``(n_1, ..., n_d)``, ``d >= 1``.
      max_rank: optional cap on the inner ranks ``(r_1, ..., r_{d-1})``: one int for all of them,
        or a sequence of ``d - 1`` ints.
      rtol: optional relative Frobenius tolerance, ``>= 0``.

    Returns:
      ``d`` cores, core ``k`` of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``, in the
      dtype of ``tensor`` (floating).

    Raises:
      ValueError: ``tensor`` is a scalar or has an empty dimension; ``max_rank`` is not an int
        >= 1 or a sequence of ``d - 1`` of them; ``rtol`` < 0; ``rtol`` given under ``jax.jit``.

    Example (a rank-1 tensor; ``rtol`` above the float32 rounding of the SVDs, ~1e-7):

    >>> import numpy as np
    >>> a = np.einsum("i,j,k->ijk", np.arange(1.0, 3.0), np.ones(3), np.arange(4.0))
    >>> cores = tt_svd(a, rtol=1e-5)
    >>> [c.shape for c in cores]
    [(1, 2, 1), (1, 3, 1), (1, 4, 1)]
    >>> bool(np.allclose(tt_to_full(cores), a, atol=1e-5))
    True
    """
    tensor = jnp.asarray(tensor)
    if not jnp.issubdtype(tensor.dtype, jnp.inexact):
        tensor = tensor.astype(jnp.result_type(float))
    shape = tuple(tensor.shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"tensor must have at least one dimension and none empty; got {shape}")
    d = len(shape)
    caps = _max_ranks(max_rank, d - 1)
    rtol = _check_rtol(rtol)
    if rtol is not None and not is_concrete(tensor):
        raise ValueError(
            "rtol= chooses data-dependent ranks and needs a concrete tensor (not under jax.jit); "
            "use max_rank= for static ranks"
        )
    if rtol is None:
        return list(_tt_svd_static(tensor, caps))
    norm = float(jnp.linalg.norm(tensor.ravel()))
    return _tt_svd(tensor, caps, rtol * norm / math.sqrt(d - 1) if d > 1 else 0.0)


def _tt_svd(tensor: jax.Array, caps: tuple[int | None, ...], delta: float | None) -> list:
    """TT-SVD with rank caps and, when ``delta`` is not None, a per-step tail threshold."""
    shape = tuple(tensor.shape)
    d = len(shape)
    cores = []
    rank = 1
    rest = tensor.reshape(shape[0], -1)
    for k in range(d - 1):
        n_k = shape[k]
        unfolding = rest.reshape(rank * n_k, -1)
        u, s, vt = jnp.linalg.svd(unfolding, full_matrices=False)
        new_rank = s.shape[0]
        if delta is not None:
            new_rank = _truncation_rank(np.asarray(s), delta)
        if caps[k] is not None:
            new_rank = min(new_rank, caps[k])
        cores.append(u[:, :new_rank].reshape(rank, n_k, new_rank))
        rest = s[:new_rank, None] * vt[:new_rank]
        rank = new_rank
    cores.append(rest.reshape(rank, shape[-1], 1))
    return cores


#: Static-rank TT-SVD compiled once per (shape, dtype, caps): one XLA program instead of many
#: eagerly dispatched ops.
_tt_svd_static = jax.jit(lambda tensor, caps: _tt_svd(tensor, caps, None), static_argnums=1)


@jax.jit
def tt_to_full(cores: Sequence[jax.typing.ArrayLike]) -> jax.Array:
    """Contracts TT cores ``(r_{k-1}, n_k, r_k)`` into the full tensor ``(n_1, ..., n_d)``.

    Exact. Boundary ranks other than 1 are kept as leading/trailing axes (dropped when 1), so
    ``r_0 = r_d = 1`` gives shape ``(n_1, ..., n_d)``.
    """
    cores = [jnp.asarray(c) for c in cores]
    _check_cores(cores, 3, "cores")
    modes = [c.shape[1] for c in cores]
    r0, rd = cores[0].shape[0], cores[-1].shape[-1]
    full = cores[0].reshape(r0 * modes[0], -1)
    for core in cores[1:]:
        full = (full.reshape(-1, core.shape[0]) @ core.reshape(core.shape[0], -1))
    out_shape = ((r0,) if r0 != 1 else ()) + tuple(modes) + ((rd,) if rd != 1 else ())
    return full.reshape(out_shape)


def _check_cores(cores: Sequence[jax.Array], ndim: int, name: str) -> None:
    if not cores:
        raise ValueError(f"{name} must be a non-empty list of cores")
    for k, core in enumerate(cores):
        if core.ndim != ndim:
            raise ValueError(f"{name}[{k}] must be {ndim}-D; got shape {core.shape}")
        if k and core.shape[0] != cores[k - 1].shape[-1]:
            raise ValueError(
                f"{name}[{k}] has left rank {core.shape[0]} but {name}[{k - 1}] has right rank "
                f"{cores[k - 1].shape[-1]}"
            )


def tt_ranks(cores: Sequence[jax.typing.ArrayLike]) -> tuple[int, ...]:
    """The TT-ranks ``(r_0, r_1, ..., r_d)`` of a list of TT (or TT-matrix) cores."""
    shapes = [np.shape(c) for c in cores]
    return (int(shapes[0][0]), *(int(s[-1]) for s in shapes))


def tt_num_params(cores: Sequence[jax.typing.ArrayLike]) -> int:
    """Number of stored entries, ``sum_k size(core_k)``: ``sum_k r_{k-1} n_k r_k`` (TT) or
    ``sum_k r_{k-1} m_k n_k r_k`` (TT-matrix)."""
    return int(sum(math.prod(np.shape(c)) for c in cores))


def _check_modes(matrix_shape, row_modes, col_modes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    row_modes = normalize_modes(row_modes, "row_modes")
    col_modes = normalize_modes(col_modes, "col_modes")
    if len(row_modes) != len(col_modes):
        raise ValueError(
            f"row_modes={row_modes} and col_modes={col_modes} must have the same length"
        )
    if len(matrix_shape) != 2:
        raise ValueError(f"matrix must be 2-D (M, N); got shape {tuple(matrix_shape)}")
    if math.prod(row_modes) != matrix_shape[0]:
        raise ValueError(
            f"row_modes={row_modes} multiply to {math.prod(row_modes)}, but matrix has "
            f"{matrix_shape[0]} rows"
        )
    if math.prod(col_modes) != matrix_shape[1]:
        raise ValueError(
            f"col_modes={col_modes} multiply to {math.prod(col_modes)}, but matrix has "
            f"{matrix_shape[1]} columns"
        )
    return row_modes, col_modes


def tt_matrix_svd(
    matrix: jax.typing.ArrayLike,
    row_modes: Sequence[int],
    col_modes: Sequence[int],
    *,
    max_rank: int | Sequence[int] | None = None,
    rtol: float | None = None,
) -> list[jax.Array]:
    """TT-matrix decomposition of ``matrix`` ``(prod m_k, prod n_k)``.

    The matrix is reshaped to ``(m_1, ..., m_d, n_1, ..., n_d)`` (row-major, first mode most
    significant), permuted to ``(m_1, n_1, ..., m_d, n_d)``, merged into the d-way tensor
    ``(m_1 n_1, ..., m_d n_d)`` and decomposed by :func:`tt_svd` with the same ``max_rank`` /
    ``rtol`` semantics: exact at full rank, ``||W - TT(W)||_F <= rtol ||W||_F`` in ``rtol`` mode
    (not jit-able), an approximation with static ranks in ``max_rank`` mode (jit-able).

    Args:
      matrix: ``(M, N)`` with ``M = prod(row_modes)``, ``N = prod(col_modes)``.
      row_modes: ``(m_1, ..., m_d)``.
      col_modes: ``(n_1, ..., n_d)``, same length.
      max_rank: optional cap on the ``d - 1`` inner ranks (int or sequence).
      rtol: optional relative Frobenius tolerance.

    Returns:
      ``d`` cores of shape ``(r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.

    Raises:
      ValueError: naming ``row_modes`` / ``col_modes`` when their product does not match the
        matrix, or their lengths differ; ``max_rank`` / ``rtol`` as in :func:`tt_svd`.
    """
    matrix = jnp.asarray(matrix)
    row_modes, col_modes = _check_modes(matrix.shape, row_modes, col_modes)
    d = len(row_modes)
    perm = [axis for k in range(d) for axis in (k, d + k)]
    tensor = matrix.reshape(*row_modes, *col_modes).transpose(perm)
    tensor = tensor.reshape([m * n for m, n in zip(row_modes, col_modes)])
    cores = tt_svd(tensor, max_rank=max_rank, rtol=rtol)
    return [c.reshape(c.shape[0], m, n, c.shape[-1])
            for c, m, n in zip(cores, row_modes, col_modes)]


@jax.jit
def tt_matrix_to_full(cores: Sequence[jax.typing.ArrayLike]) -> jax.Array:
    """Contracts TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)`` into the matrix ``(M, N)``. Exact.

    ``r_0 = r_d = 1`` is required.
    """
    cores = [jnp.asarray(c) for c in cores]
    _check_cores(cores, 4, "cores")
    ranks = tt_ranks(cores)
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"cores must have boundary ranks r_0 = r_d = 1; got ranks {ranks}")
    row_modes = [c.shape[1] for c in cores]
    col_modes = [c.shape[2] for c in cores]
    d = len(cores)
    full = tt_to_full([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores])
    full = full.reshape([m for pair in zip(row_modes, col_modes) for m in pair])
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return full.transpose(perm).reshape(math.prod(row_modes), math.prod(col_modes))


def tt_matrix_contract(cores: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """Core-by-core ``x @ W`` with open boundary ranks: ``(P, M, r_0) -> (P, N, r_d)``.

    ``x[p, (i_1..i_d), a]`` is contracted with ``G_1[a, i_1, j_1, :] ... G_d[:, i_d, j_d, b]``.
    Step k contracts ``(r_{k-1}, m_k)`` of the running tensor ``(P, m_k, M_rest, N_done, r)``
    with core k, giving ``(P, M_rest, N_done * n_k, r_k)``: cost
    ``P * (prod_{j>k} m_j) * (prod_{j<k} n_j) * r_{k-1} m_k n_k r_k`` multiply-adds. Exact (no
    approximation beyond rounding); never forms ``W``.
    """
    p, m, r0 = x.shape
    if r0 != cores[0].shape[0]:
        raise ValueError(f"x has boundary rank {r0}; cores[0] expects {cores[0].shape[0]}")
    m_rest, n_done = m, 1
    t = x
    for core in cores:
        r_left, m_k, n_k, r_right = core.shape
        m_rest //= m_k
        t = t.reshape(p, m_k, m_rest, n_done, r_left)
        t = jnp.einsum("piqar,rijs->pqajs", t, core.astype(t.dtype))
        n_done *= n_k
    return t.reshape(p, n_done, cores[-1].shape[-1])


@jax.jit
def tt_matrix_apply(cores: Sequence[jax.typing.ArrayLike], x: jax.typing.ArrayLike) -> jax.Array:
    """``x @ W`` for the TT-matrix ``W`` ``(M, N)`` of ``cores``, core by core.

    This is the orientation of :class:`train.layers.TTDense` (``W`` is ``(in, out)``, row modes
    = ``in_modes``). Cost ``O(batch * d * r^2 * max(M, N) * max(m_k, n_k))`` instead of
    ``batch * M * N``; ``W`` is never formed. Exact.

    Args:
      cores: TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.
      x: ``(..., M)`` with ``M = prod m_k``.

    Returns:
      ``(..., N)``, ``N = prod n_k``, in the promoted dtype of ``x`` and the cores.

    Raises:
      ValueError: ``x.shape[-1]`` is not ``prod m_k``, or the cores are not a TT-matrix with
        boundary ranks 1.
    """
    cores = [jnp.asarray(c) for c in cores]
    _check_cores(cores, 4, "cores")
    ranks = tt_ranks(cores)
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"cores must have boundary ranks r_0 = r_d = 1; got ranks {ranks}")
    x = jnp.asarray(x)
    dtype = jnp.result_type(x, *cores)
    m = math.prod(c.shape[1] for c in cores)
    if x.ndim < 1 or x.shape[-1] != m:
        raise ValueError(f"x must have shape (..., {m}) (prod of the row modes); got {x.shape}")
    batch = x.shape[:-1]
    flat = x.astype(dtype).reshape(-1, m, 1)
    out = tt_matrix_contract([c.astype(dtype) for c in cores], flat)
    return out.reshape(*batch, -1)


def tt_matvec(cores: Sequence[jax.typing.ArrayLike], v: jax.typing.ArrayLike) -> jax.Array:
    """``W v`` for the TT-matrix ``W`` ``(M, N)``: ``v`` ``(..., N)`` -> ``(..., M)``. Exact.

    The transpose of :func:`tt_matrix_apply`: ``tt_matvec(cores, v) == v @ W.T``.
    """
    return tt_matrix_apply([jnp.swapaxes(jnp.asarray(c), 1, 2) for c in cores], v)
