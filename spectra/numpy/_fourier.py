"""Exact spectra and the circulant bound on the host: per frequency, per block, per group.

NumPy, float64, no XLA; the maths of :mod:`spectra._fourier` and :mod:`spectra._exact`:

* :func:`circulant_top`: σ_max of the circulant embedding per group (``spectra``'s
  ``symbol_grid_bound``: an **upper bound** for zero padding, **exact** for circular layers
  whose strides divide the input) and a warm start for Lanczos.
* :func:`singular_values`: all singular values, **exactly**, by ``'fft'`` (circular, strides
  dividing the input: per-frequency polyphase matrices, Sedghi et al. 2019), ``'dense'`` (SVD
  of the diagonal blocks of the operator, one per group) or ``'matrix'`` (layers in which no
  input pixel is read twice: SVD of the kernel's per-pixel blocks, :func:`disjoint_windows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from spectra._bounds import exact_circular_spec
from spectra._fourier import half_plane_multiplicity
from spectra._spec import ConvSpec
from spectra.numpy._frequencies import _frequency_chunks
from spectra.numpy._frequencies import _frequency_matrix
from spectra.numpy._frequencies import _gram_estimates
from spectra.numpy._frequencies import _matrix_estimates
from spectra.numpy._frequencies import _polyphase_taps
from spectra.numpy._frequencies import _tap_grams_pay
from spectra.numpy._frequencies import _TapGrams
from spectra.numpy._operator import ConvOperator
from spectra.numpy._operator import axis_geometry
from spectra.numpy._operator import float64_kernel

#: The exact methods of :func:`singular_values`.
HOST_EXACT_METHODS = ("fft", "dense", "matrix")


def fft_applies(spec: ConvSpec) -> bool:
    """True when the exact per-frequency (FFT) method applies: circular, strides divide."""
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


def _smaller_grams(m: np.ndarray) -> np.ndarray:
    """The smaller Gram ``M Mᴴ`` or ``Mᴴ M`` of each matrix of a stack ``(..., r, c)``."""
    mh = np.conj(np.swapaxes(m, -1, -2))
    return m @ mh if m.shape[-2] <= m.shape[-1] else mh @ m


def _top_singular_values(m: np.ndarray) -> np.ndarray:
    """σ_max of each matrix of a stack ``(..., r, c)``: λ_max of the smaller Gram (eigvalsh)."""
    if min(m.shape[-2:]) == 1:
        return np.sqrt(np.sum(np.abs(m) ** 2, axis=(-2, -1)))
    return np.sqrt(np.maximum(np.linalg.eigvalsh(_smaller_grams(m))[..., -1], 0.0))


#: :func:`_stack_singular_values` takes a matrix's singular values from its smaller Gram's
#: eigenvalues when the smallest is at least this fraction of the largest (``σ_min >= σ_max /
#: 10``); otherwise from the SVD.
GRAM_MIN_RATIO = 1e-2


def _stack_singular_values(m: np.ndarray) -> np.ndarray:
    """All singular values of each matrix of a stack ``(..., r, c)``: ``(..., min(r, c))``,
    descending per matrix, **exact** to rounding.

    The square roots of the eigenvalues of the smaller Gram (``eigvalsh``; measured 3.3x faster
    than the SVD at ``2048 x 1024``, single-threaded) for each well-conditioned matrix, the SVD
    for the others. Rounding (:mod:`spectra.numpy._rounding`, items 2. and 3.: the top value's
    allowance :func:`spectra.numpy.matrix_rtol` already covers this path): the computed Gram is
    ``G + E`` with ``||E||_2 <= n γ_k σ_1²`` (``n`` the smaller side, ``k`` the larger) and
    ``eigvalsh`` puts each eigenvalue within ``p(n) u σ_1²`` of one of ``G + E`` (Weyl), so
    ``|λ̂_i - σ_i²| <= δ σ_1²`` with ``δ = n γ_k + p(n) u`` and ``|σ̂_i - σ_i| = |λ̂_i - σ_i²|
    / (σ̂_i + σ_i) <= δ σ_1 (σ_1 / σ̂_i)``. With ``λ̂_min >= GRAM_MIN_RATIO λ̂_max`` that is
    at most ``10 δ σ_1`` for every value (worst case ``~4e-9 σ_1`` at ``n = 1024, k = 2048``
    with ``p(n) = n²``; the SVD's, ``p(n) u σ_1``, ``~1e-10 σ_1``); an ill-conditioned or
    rank-deficient matrix goes to the SVD, whose error does not grow with ``σ_1 / σ_i``.
    """
    lead, (r, c) = m.shape[:-2], m.shape[-2:]
    if min(r, c) == 0:
        return np.zeros((*lead, 0))
    m = m.reshape(-1, r, c)
    lam = np.linalg.eigvalsh(_smaller_grams(m))[:, ::-1]
    ok = (lam[:, 0] > 0) & (lam[:, -1] >= GRAM_MIN_RATIO * lam[:, 0])
    values = np.sqrt(np.maximum(lam, 0.0))
    if not np.all(ok):  # Only the ill-conditioned matrices of the stack.
        values[~ok] = np.linalg.svd(m[~ok], compute_uv=False)
    return values.reshape(*lead, -1)


def frequency_entries(spec: ConvSpec, kshape: Sequence[int]) -> int:
    """Complex entries of all the per-frequency matrices of :func:`circulant_top` (its cost)."""
    emb = exact_circular_spec(spec, kshape)
    n1, n2 = (n // s for n, s in zip(emb.input_shape, emb.strides))
    return n1 * (n2 // 2 + 1) * kshape[2] * kshape[3] * math.prod(emb.strides)


class CirculantTop(NamedTuple):
    """Result of :func:`circulant_top`.

    Attributes:
      bound: ``max(group_bounds)``: ``spectra.symbol_grid_bound``, an **upper bound** on the
        layer's σ_max (exact for circular layers whose strides divide the input).
      group_bounds: ``(g,)``: the same per group (an upper bound on each group's σ_max).
      vector: input-shaped ``(H, W, c_in)`` float64 warm start, or ``None``.
    """

    bound: float
    group_bounds: np.ndarray
    vector: np.ndarray | None


#: Smaller side of the per-frequency matrices from which :func:`circulant_top` prunes frequencies
#: (a Cholesky test per frequency instead of an eigenvalue decomposition); below it, eigvalsh of
#: every frequency (cheap there).
PRUNE_MIN_SIDE = 96
#: Lanczos steps per frequency whose top Ritz value orders the frequencies before pruning.
PRUNE_KRYLOV_STEPS = 12


def _gram(m: np.ndarray) -> np.ndarray:
    """The smaller Gram ``M M^H`` or ``M^H M`` of one complex matrix ``(r, c)``, both triangles.

    From real products that release the GIL (NumPy ``matmul``; SciPy's BLAS wrapper ``zherk``
    holds it, so two report threads forming Grams ran one at a time): with ``M = A + iB``,
    ``M M^H = [A B] [A B]^T + i (B A^T - (B A^T)^T)``, ``3 r² c`` real multiply-adds (``zherk``:
    ``2 r² c``; measured as fast, single-threaded, at ``r = 1024``). Rounding: inner dimension
    ``2c`` (:mod:`spectra.numpy._rounding`, item 3.).
    """
    if m.shape[0] > m.shape[1]:
        return np.conj(_gram(m.T))  # M^H M = conj(M^T (M^T)^H): M^T's Gram, conjugated.
    r, c = m.shape
    x = np.empty((r, 2 * c))
    x[:, :c], x[:, c:] = m.real, m.imag
    gram = np.empty((r, r), np.complex128)
    gram.real = x @ x.T
    y = x[:, c:] @ x[:, :c].T
    gram.imag = y - y.T
    return gram


def _top_eigenvalue(gram: np.ndarray) -> float:
    """λ_max of a Hermitian Gram (both triangles), by LAPACK through NumPy's ``eigvalsh`` (it
    releases the GIL; SciPy's ``eigh`` holds it, and its ``subset_by_index`` saved nothing
    measurable at ``n = 1024``: the reduction to tridiagonal form dominates)."""
    return max(float(np.linalg.eigvalsh(gram)[-1]), 0.0)


#: Krylov dimension of :func:`_top_vector`.
TOP_VECTOR_STEPS = 24


def _top_vector(gram: np.ndarray, steps: int = TOP_VECTOR_STEPS) -> np.ndarray:
    """A unit top eigenvector of a Hermitian Gram, for a warm start only: the Rayleigh-Ritz
    vector of the Krylov space of dimension ``min(n, steps)`` from a seeded random start (fully
    reorthogonalised). **Exact** (to rounding) when ``n <= steps``; for larger Grams an
    approximation that Lanczos refines (it never serves as a value or a bound)."""
    n = gram.shape[0]
    k = min(n, steps)
    q = np.zeros((n, k), np.complex128)
    w = np.zeros((n, k), np.complex128)
    v = np.random.default_rng(0).standard_normal(n) + 0j
    for j in range(k):
        for _ in range(2):  # Twice is enough (Giraud et al.'s "twice is enough").
            v = v - q[:, :j] @ (np.conj(q[:, :j].T) @ v)
        norm = np.linalg.norm(v)
        if norm <= 1e-12 * max(np.linalg.norm(w[:, :j]), np.finfo(float).tiny):
            k = j  # The Krylov space is invariant: its Ritz vectors are eigenvectors.
            break  # (Never at j = 0: the random start is nonzero.)
        q[:, j] = v / norm
        w[:, j] = v = gram @ q[:, j]
    h = np.conj(q[:, :k].T) @ w[:, :k]
    _, vecs = np.linalg.eigh((h + np.conj(h.T)) / 2)
    vec = q[:, :k] @ vecs[:, -1]
    return vec / np.linalg.norm(vec)


def _right_vector(m: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``m``'s unit top right singular vector from the top eigenvector ``vec`` of its smaller
    Gram (:func:`_top_vector`): ``vec`` itself, or ``M^H u / ||M^H u||`` when the Gram is
    ``M M^H`` (the output side)."""
    if m.shape[0] <= m.shape[1]:
        vec = np.conj(m.T) @ vec
    return vec / max(np.linalg.norm(vec), np.finfo(float).tiny)


def _below(gram: np.ndarray, tau: float) -> bool:
    """Certifies ``λ_max(gram) <= tau`` by a Cholesky factorisation of ``τ' I - gram`` (a
    Hermitian Gram, both triangles; the factorisation reads the lower one).

    With ``τ' = τ / (1 + 2 n γ_{n+1})``: a Cholesky factorisation that succeeds in floating point
    is the exact one of ``τ' I - G + E`` with ``|E| <= γ_{n+1} |R^H| |R|`` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, Thm 10.3), so ``||E||_2 <= ||R||_F^2 γ_{n+1}
    <= γ_{n+1} tr(τ' I - G) / (1 - γ_{n+1}) <= n γ_{n+1} τ' / (1 - γ_{n+1})`` and
    ``λ_max(G) <= τ' + ||E||_2 <= τ``. False: no certificate (then the caller computes λ_max).
    """
    n = gram.shape[0]
    u = np.finfo(np.float64).eps / 2
    gamma = (n + 1) * u / (1 - (n + 1) * u)
    tau_p = tau / (1 + 2 * n * gamma)
    if not tau_p > 0:  # Only the zero matrix is certified below 0.
        return tau >= 0 and not np.any(gram)
    a = -gram
    a[np.diag_indices(n)] += tau_p
    try:  # NumPy's LAPACK call releases the GIL (SciPy's zpotrf wrapper holds it).
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return False
    return True


def _circulant_pruned(kernel, emb, g, row_scales=(None,), with_vector=True):
    """Per-group max of per-frequency λ_max, pruning frequencies certified below the best.

    Pass 1: Lanczos estimates per frequency (:func:`_ritz_estimates`; on the complex64 matrices,
    or on the Grams where those come from the taps' cross-Grams); the exact top (``eigh``) of the
    frequency with the largest estimate starts the best per group. Pass 2: each other frequency is
    certified ``λ_max <= best`` by :func:`_below` (a Cholesky factorisation, no eigenvalues) or
    else its exact top is computed (and the best raised). The result equals the max over all
    frequencies of their ``eigvalsh`` top up to LAPACK's rounding. Variants whose first top is
    the same frequency share its Gram; the top right singular vector (the warm start, when
    ``with_vector``) is formed at the end, of the winning frequency only (:func:`_top_vector` of
    its kept Gram). Every LAPACK and BLAS call goes through NumPy, which releases the GIL: the
    report's two host threads run them at once.

    ``row_scales``: one entry per variant of the layer, ``None`` (the kernel itself) or a
    ``(g, c_out / g)`` per-output-channel scale ``s`` (the kernel scaled on its outputs: each
    per-frequency matrix is ``diag(s) M(ω)``). When the Gram is on the output side (``rows <=
    cols``), a scaled variant's Gram is ``diag(s) G(ω) diag(s)``: one Gram per frequency
    serves every variant. Returns one ``(bound, group tops, (group, u, v, right vector or
    None))`` per variant.
    """
    nv = len(row_scales)

    def one(mat, vi, gi):  # One frequency's matrix (cog, cols) of group gi, variant vi.
        s = row_scales[vi]
        return mat if s is None else mat * s[gi][:, None]

    taps = _polyphase_taps(kernel, emb)
    keep = [{} for _ in range(nv)]  # Per variant and group: (estimate, (u, v)) of the top.

    def consider(vi, gi, est, us, vs):  # The largest estimate of a chunk, kept if the best.
        i = int(np.argmax(est))
        if gi not in keep[vi] or est[i] > keep[vi][gi][0]:
            keep[vi][gi] = (float(est[i]), (int(us[i]), int(vs[i])))

    group_best = np.zeros((nv, g))
    # Per variant and group: (u, v, the variant's Gram) of the best frequency; the right singular
    # vector (the warm start) is formed at the end, for the winner only.
    where = [[None] * g for _ in range(nv)]

    # Per group: each variant's diag(s) ⊗ diag(s) (None: unscaled), formed once, not per frequency.
    outers = [
        [None if s is None else np.outer(s[gi], s[gi]) for s in row_scales] for gi in range(g)
    ]

    def scaled(gram, vi, gi):  # The variant's Gram diag(s) G diag(s).
        outer = outers[gi][vi]
        return gram if outer is None else gram * outer

    def start_best(gi, gram_at):  # The exact tops of the frequencies of largest estimate.
        tops = {}  # (u, v) -> Gram: variants whose top frequencies coincide share it.
        for vi in range(nv):
            _, (u, v) = keep[vi][gi]
            if (u, v) not in tops:
                tops[u, v] = gram_at(u, v)
            gram = scaled(tops[u, v], vi, gi)
            group_best[vi, gi], where[vi][gi] = _top_eigenvalue(gram), (u, v, gram)

    big1, big2 = (n // s for n, s in zip(emb.input_shape, emb.strides))
    # A real kernel's matrices at -k are the conjugates of those at k (the same singular values):
    # on the columns v = 0 and v = N2 / 2 of the half plane, row u repeats row (N1 - u) mod N1.
    self_conjugate = {0, big2 / 2}

    def visit(gi, u, v, gram):
        """Certify frequency (u, v) of group gi below the best, or raise the best."""
        todo = [vi for vi in range(nv) if (u, v) != keep[vi][gi][1]]
        for vi in todo:
            gv = scaled(gram, vi, gi)
            if _below(gv, group_best[vi, gi]):
                continue
            lam = _top_eigenvalue(gv)
            if lam > group_best[vi, gi]:
                group_best[vi, gi] = lam
                where[vi][gi] = (u, v, np.array(gv))  # A copy: gram may be a chunk's view.

    def repeated(u, v):  # The conjugate of a frequency already visited.
        return v in self_conjugate and (big1 - u) % big1 < u

    if _tap_grams_pay(taps):
        # Grams from the taps' cross-Grams (computed once per group): the ordering pass is
        # Lanczos on the Grams themselves (float64; a second pass over the Grams costs two
        # real products per chunk, far less than the cross-Grams).
        for gi in range(g):
            grams_of = _TapGrams(taps, gi)
            for us, vs, grams in grams_of.chunks():
                for vi in range(nv):
                    s = None if row_scales[vi] is None else row_scales[vi][gi]
                    consider(vi, gi, _gram_estimates(grams, PRUNE_KRYLOV_STEPS, s), us, vs)
            start_best(gi, grams_of.at)
            for us, vs, grams in grams_of.chunks():
                for u, v, gram in zip(us.tolist(), vs.tolist(), grams):
                    if not repeated(u, v):
                        visit(gi, u, v, gram)
            del grams_of  # Its cross-Grams freed before the next group's are formed.
    else:
        start = 0
        # Pass 1 in single precision: the estimates only order the frequencies.
        for m in _frequency_chunks(kernel, emb, np.complex64, taps):
            n2h = m.shape[2]
            us, vs = np.divmod(np.arange(m.shape[1] * n2h), n2h)
            for vi in range(nv):
                est = _matrix_estimates(m, PRUNE_KRYLOV_STEPS, row_scales[vi])  # (g, rows, N2h)
                for gi in range(g):
                    consider(vi, gi, est[gi].reshape(-1), us + start, vs)
            start += m.shape[1]
        for gi in range(g):
            start_best(gi, lambda u, v, gi=gi: _gram(_frequency_matrix(taps, gi, u, v)))
        start = 0
        for m in _frequency_chunks(kernel, emb, taps=taps):
            for gi in range(g):
                for r in range(m.shape[1]):
                    u = start + r
                    for v in range(m.shape[2]):
                        if not repeated(u, v):
                            visit(gi, u, v, _gram(m[gi, r, v]))
            start += m.shape[1]
    out = []
    for vi in range(nv):
        gi = int(np.argmax(group_best[vi]))
        u, v, gram = where[vi][gi]
        w = None
        if with_vector:
            w = _right_vector(one(_frequency_matrix(taps, gi, u, v), vi, gi), _top_vector(gram))
        out.append((float(np.sqrt(group_best[vi, gi])), np.sqrt(group_best[vi]), (gi, u, v, w)))
    return out


def circulant_top(kernel, spec: ConvSpec, *, with_vector: bool = True) -> CirculantTop:
    """σ_max of the circulant embedding per group (LAPACK ``eigvalsh``, float64) and its top.

    The circular layer of :func:`spectra.exact_circular_spec` contains ``spec``'s operator
    (zero padding: the circulant embedding, exact statement ``σ_max(A) <= σ_max(circulant)``).
    Its σ_max is the max over the frequency grid of the per-frequency σ_max.

    For wide layers (per-frequency matrices whose smaller side is ``>= PRUNE_MIN_SIDE``) the
    frequencies are pruned: the exact top (LAPACK ``eigh`` of the smaller Gram) is computed only
    for the frequency of the largest Lanczos estimate and for frequencies that a
    Cholesky factorisation of ``τ' I - G(ω)`` (rounding margin included, :func:`_below`) cannot
    certify below the best so far; the max is the same (up to LAPACK's rounding) at a fraction of
    the cost.

    The top of that circular layer is a plane wave ``Re(w̄ e^{2πi⟨k, τ⟩})`` over the polyphase
    components ``τ`` of its input grid, with ``w`` the top right singular vector of the
    maximising frequency ``k``'s matrix, in the maximising group. Restricted to the layer's own
    input pixels (windowed by the lowest sine mode for zero padding) it is a warm start for
    Lanczos, not a singular vector: :func:`spectra.numpy.lanczos_spectral_norm` adds it to a
    random vector, never uses it alone.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      with_vector: compute the warm start.

    Returns:
      :class:`CirculantTop`.
    """
    return circulant_tops(kernel, spec, with_vector=with_vector)[0]


def circulant_tops(kernel, spec: ConvSpec, scales=(), *, with_vector: bool = True):
    """:func:`circulant_top` of the kernel and of each ``kernel * scale`` (output channels scaled,
    e.g. a BatchNorm folded in; computed in float64), in one pass where possible.

    Wide layers whose per-frequency Gram is on the output side (``c_out / g <= (c_in / g) s1
    s2``): each frequency's Gram ``G(ω)`` is computed once, a scaled kernel's is ``diag(s) G(ω)
    diag(s)``; the same pruning and certificates per variant. Otherwise one
    :func:`circulant_top` per variant.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      scales: ``(c_out,)`` per-channel scales.
      with_vector: compute the warm starts.

    Returns:
      ``[CirculantTop of kernel] + [CirculantTop of kernel * scale for scale in scales]``.
    """
    kernel, kshape = float64_kernel(kernel, spec)
    emb = exact_circular_spec(spec, kshape)
    g = spec.feature_group_count
    rows, cols = kshape[3] // g, kshape[2] * math.prod(emb.strides)
    scales = [np.asarray(c, np.float64).reshape(kshape[3]) for c in scales]
    if min(rows, cols) >= PRUNE_MIN_SIDE and (rows <= cols or not scales):
        row_scales = [None] + [c.reshape(g, rows) for c in scales]
        out = []
        for best, group_best, (gi, u, v, w) in _circulant_pruned(
            kernel, emb, g, row_scales, with_vector
        ):
            vector = _warm_start(spec, emb, kshape, gi, u, v, w) if with_vector else None
            out.append(CirculantTop(best, group_best, vector))
        return out
    if scales:
        return [
            circulant_tops(k, spec, with_vector=with_vector)[0]
            for k in [kernel] + [kernel * c for c in scales]
        ]
    group_best = np.full(g, -1.0)
    best, where = -1.0, None
    start = 0
    for m in _frequency_chunks(kernel, emb):
        tops = _top_singular_values(m)  # (g, rows, N2h)
        group_best = np.maximum(group_best, tops.reshape(g, -1).max(axis=1))
        i = int(np.argmax(tops))
        if tops.flat[i] > best:
            gi, r, v = np.unravel_index(i, tops.shape)
            best, where = float(tops.flat[i]), (gi, start + r, v, m[gi, r, v].copy())
        start += m.shape[1]
    if not with_vector or where is None:
        return [CirculantTop(best, group_best, None)]
    gi, u, v, mat = where
    w = np.linalg.svd(mat)[2][0].conj()  # Top right singular vector, (cig * s1 * s2,).
    return [CirculantTop(best, group_best, _warm_start(spec, emb, kshape, gi, u, v, w))]


def _warm_start(spec, emb, kshape, gi, u, v, w) -> np.ndarray:
    """The plane wave of frequency ``(u, v)`` and right vector ``w`` of group ``gi`` on the
    layer's input pixels (see :func:`circulant_top`)."""
    g = spec.feature_group_count
    cig = kshape[2]
    (s1, s2), (b1, b2) = emb.strides, (n // s for n, s in zip(emb.input_shape, emb.strides))
    w = w.reshape(cig, s1, s2)
    (lo1, _), (lo2, _) = spec.pads(kshape)
    n1, n2 = spec.input_shape
    p1, p2 = (np.arange(n1) + lo1) % emb.input_shape[0], (np.arange(n2) + lo2) % emb.input_shape[1]
    phase = (
        np.exp(2j * np.pi * (u * (p1 // s1) / b1))[:, None]
        * np.exp(2j * np.pi * (v * (p2 // s2) / b2))[None, :]
    )
    wave = np.conj(w[:, p1 % s1][:, :, p2 % s2]).transpose(1, 2, 0) * phase[..., None]
    if not spec.is_circular:  # The lowest mode of a zero-padded (Toeplitz-like) operator.
        envelope = np.outer(*(np.sin(np.pi * (np.arange(n) + 1) / (n + 1)) for n in (n1, n2)))
        wave = wave * envelope[..., None]
    x = np.zeros((n1, n2, cig * g))
    x[..., gi * cig : (gi + 1) * cig] = wave.real
    return x


def symbol_grid_bound(kernel, spec: ConvSpec) -> float:
    """``spectra.symbol_grid_bound`` on the host: :func:`circulant_top`'s ``bound``.

    Returns:
      An **upper bound** on the layer's σ_max; **exact** for circular specs whose strides
      divide the input.
    """
    return circulant_top(kernel, spec, with_vector=False).bound


def _circular_singular_values(kernel: np.ndarray, spec: ConvSpec, kshape) -> np.ndarray:
    if not fft_applies(spec):
        raise ValueError(
            f"spec={spec} must be circular with strides dividing input_shape for the exact "
            "per-frequency spectrum"
        )
    big2 = spec.input_shape[1] // spec.strides[1]
    mult = half_plane_multiplicity(big2)
    parts = []
    for m in _frequency_chunks(kernel, spec):
        sv = _stack_singular_values(m)  # (g, rows, N2h, r)
        parts.append(np.repeat(sv, mult, axis=2).ravel())
    values = -np.sort(-np.concatenate(parts))
    return values[: spec.num_singular_values(kshape)]


def _axis_reads(n: int, m: int, lo: int, s: int, d: int, k: int) -> np.ndarray:
    """``(m, k)`` input positions read along one axis of a zero-padded layer (``-1``: a pad)."""
    pos = s * np.arange(m)[:, None] + d * np.arange(k)[None, :] - lo
    return np.where((pos >= 0) & (pos < n), pos, -1)


def disjoint_windows(spec: ConvSpec, kernel_shape: Sequence[int]) -> bool:
    """True when no input pixel is read by two different (output pixel, tap) pairs.

    Zero padding only (circular layers have their exact FFT method). Holds for 1x1 kernels at
    any stride and padding, and for strides at least the dilated kernel size ("patchify"); then
    ``singular_values(..., 'matrix')`` is exact. Decided by enumerating the reads along each
    axis (the 2-D reads are the products of the per-axis ones).
    """
    if spec.is_circular:
        return False
    for n, m, lo, s, d, k in axis_geometry(spec, tuple(kernel_shape)):
        reads = _axis_reads(n, m, lo, s, d, k)
        reads = reads[reads >= 0]
        if np.unique(reads).size != reads.size:
            return False
    return True


def _block_singular_values(kernel: np.ndarray, spec: ConvSpec, kshape) -> np.ndarray:
    if not disjoint_windows(spec, kshape):
        raise ValueError(
            f"spec={spec} reads some input pixel twice: the layer is not block diagonal"
        )
    kh, kw, cig, cout = kshape
    g = spec.feature_group_count
    masks = []
    for n, m, lo, s, d, k in axis_geometry(spec, kshape):
        patterns, counts = np.unique(
            _axis_reads(n, m, lo, s, d, k) >= 0, axis=0, return_counts=True
        )
        masks.append((patterns, counts))
    taps = kernel.reshape(kh, kw, cig, g, cout // g)
    parts = []
    for rows, c1 in zip(*masks[0]):
        for cols, c2 in zip(*masks[1]):
            block = taps[rows][:, cols]  # (t1, t2, cig, g, cog)
            if block.size == 0:
                continue
            block = block.transpose(3, 0, 1, 2, 4).reshape(g, -1, cout // g)
            sv = _stack_singular_values(block).ravel()
            parts.append(np.repeat(sv, int(c1) * int(c2)))
    return _pad_values(parts, spec.num_singular_values(kshape))


def _pad_values(parts: list[np.ndarray], total: int) -> np.ndarray:
    """Concatenated, sorted descending, zero-padded / cut to ``total`` values."""
    values = -np.sort(-np.concatenate(parts)) if parts else np.zeros(0)
    if values.size < total:
        values = np.concatenate([values, np.zeros(total - values.size)])
    return values[:total]


def _dense_singular_values(kernel: np.ndarray, spec: ConvSpec, kshape) -> np.ndarray:
    blocks = ConvOperator(kernel, spec).group_matrices()  # (g, out_g, in_g)
    values = _stack_singular_values(blocks).ravel()
    return _pad_values([values], spec.num_singular_values(kshape))


def dense_cost(spec: ConvSpec, kernel_shape: Sequence[int]) -> tuple[int, float]:
    """``(max block dim, flops)`` of ``singular_values(..., 'dense')``: the groups' blocks are
    ``(out_dim / g, in_dim / g)``, each SVD ~ ``rows cols min(rows, cols)`` flops."""
    g = spec.feature_group_count
    rows, cols = spec.out_dim(kernel_shape) // g, spec.in_dim(kernel_shape) // g
    return max(rows, cols), float(g) * rows * cols * min(rows, cols)


def singular_values(kernel, spec: ConvSpec, method: str = "dense") -> np.ndarray:
    """All singular values of the layer, **exactly** (LAPACK, float64: the SVD, or the smaller
    Gram's eigenvalues where well conditioned, :func:`_stack_singular_values`), sorted descending.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.
      method: ``'fft'``: per-frequency (polyphase) matrices of a circular layer whose strides
        divide the input (Sedghi et al. 2019; taps wrap round inputs smaller than the kernel),
        as ``spectra.singular_values(kernel, spec, 'fft')``. ``'dense'``: the SVD of each
        group's diagonal block of the operator (``g`` blocks ``(out_dim / g, in_dim / g)``: a
        grouped operator is block diagonal, its singular values the union of the blocks').
        ``'matrix'``: layers with :func:`disjoint_windows`, whose operator is, after permuting
        rows and columns, block diagonal with one block per output pixel and group (the kernel
        restricted to the taps that read real input), plus zero columns.

    Returns:
      ``(spec.num_singular_values(kernel.shape),)``.

    Raises:
      ValueError: naming ``method`` when unknown, ``spec`` when the method does not apply.

    Example:
      >>> import numpy as np
      >>> from spectra import ConvSpec
      >>> k = np.ones((3, 3, 1, 2))
      >>> spec = ConvSpec((4, 4), padding='CIRCULAR', feature_group_count=1)
      >>> bool(np.allclose(singular_values(k, spec, 'fft'), singular_values(k, spec, 'dense')))
      True
    """
    kernel, kshape = float64_kernel(kernel, spec)
    if method == "fft":
        return _circular_singular_values(kernel, spec, kshape)
    if method == "dense":
        return _dense_singular_values(kernel, spec, kshape)
    if method == "matrix":
        return _block_singular_values(kernel, spec, kshape)
    raise ValueError(f"method={method!r} is unknown; expected one of {HOST_EXACT_METHODS}")
