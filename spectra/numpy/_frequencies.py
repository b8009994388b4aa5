"""The per-frequency matrices of a circular conv and their Grams, on the host (NumPy).

For a circular spec whose strides divide the input (e.g. :func:`spectra.exact_circular_spec`'s
embedding of any layer), the layer is block-diagonalised by the 2-D DFT: at frequency
``ω = (u, v)`` its matrix is ``M(ω) = Σ_t φ_t(ω) E_t`` over the kernel's few polyphase taps
``E_t`` (:func:`_polyphase_taps`). :func:`_frequency_chunks` yields the matrices (one complex GEMM
per chunk of frequencies), :class:`_TapGrams` the smaller Gram ``M M^H`` / ``M^H M`` of each
from the taps' real cross-Grams; :func:`_matrix_estimates` and :func:`_gram_estimates` estimate
each frequency's top eigenvalue (Lanczos Ritz values, for ordering the frequencies only). Used by
:mod:`spectra.numpy._fourier` (circulant bound, exact spectra), whose maths these are.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spectra._spec import ConvSpec

#: Most complex entries of per-frequency matrices held at once (they are computed in chunks of
#: frequency rows): bounds the memory of the circulant computations (16 bytes each).
FREQUENCY_CHUNK_ENTRIES = 4_000_000

class _Taps(NamedTuple):
    """A kernel's polyphase taps and the geometry of its frequency grid (see
    :func:`_polyphase_taps`)."""

    taps: np.ndarray  # (g, t1 t2, cog cols) float64, C-contiguous.
    a: np.ndarray  # (t1 t2,) first-axis polyphase offsets of the taps.
    b: np.ndarray  # (t1 t2,) second-axis offsets.
    big: tuple[int, int]  # (N1, N2): the frequency grid (input / strides).
    cog: int
    cols: int


def _polyphase_taps(kernel: np.ndarray, spec: ConvSpec) -> _Taps:
    """The kernel's few polyphase taps ``E[a, b]`` (real ``(c_out / g, (c_in / g) s1 s2)``
    matrices, ``a < t1``, ``b < t2``) of a circular spec whose strides divide the input."""
    kh, kw, cig, cout = kernel.shape
    g = spec.feature_group_count
    cog = cout // g
    (s1, s2), (d1, d2) = spec.strides, spec.kernel_dilation
    big1, big2 = (n // s for n, s in zip(spec.input_shape, spec.strides))
    keff1, keff2 = spec.dilated_kernel_size(kernel.shape)
    t1, t2 = -(-keff1 // s1), -(-keff2 // s2)
    # (g, t1 t2, cog cig s1 s2): per group and tap, the matrix (rows cog, columns (cig, s1, s2)).
    if (s1, s2, d1, d2) == (1, 1, 1, 1):  # The kernel is its own polyphase embedding.
        e = np.asarray(kernel, np.float64).reshape(t1, t2, cig, g, cog)
        taps = np.ascontiguousarray(e.transpose(3, 0, 1, 4, 2)).reshape(g, t1 * t2, -1)
    else:  # Each tap written to its polyphase slot: no zero-embedded copy of the kernel.
        out = np.zeros((g, t1, t2, cog, cig, s1, s2))
        for i in range(kh):
            a, p = divmod(i * d1, s1)
            for j in range(kw):
                b, q = divmod(j * d2, s2)
                out[:, a, b, :, :, p, q] = kernel[i, j].reshape(cig, g, cog).transpose(1, 2, 0)
        taps = out.reshape(g, t1 * t2, -1)
    a = np.repeat(np.arange(t1), t2)
    b = np.tile(np.arange(t2), t1)
    return _Taps(taps, a, b, (big1, big2), cog, cig * s1 * s2)


def _phases(taps: _Taps, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(u) len(v), t1 t2)`` complex ``e^{-2πi (u a / N1 + v b / N2)}``, frequencies in
    ``(u, v)`` row-major order; the integer products are reduced mod N before the division."""
    big1, big2 = taps.big
    t = taps.a.size
    angle = (
        (np.outer(u, taps.a) % big1)[:, None, :] / big1
        + (np.outer(v, taps.b) % big2)[None, :, :] / big2
    ).reshape(-1, t)
    return np.exp(-2j * np.pi * angle)


def _frequency_matrix(taps: _Taps, gi: int, u: int, v: int) -> np.ndarray:
    """The complex128 ``(c_out / g, cols)`` matrix of group ``gi`` at frequency ``(u, v)``."""
    phase = _phases(taps, np.array([u]), np.array([v]))[0]
    parts = np.stack([phase.real, phase.imag]) @ taps.taps[gi]  # One real GEMM: (2, entries).
    m = np.empty(parts.shape[1], np.complex128)
    m.real, m.imag = parts
    return m.reshape(taps.cog, taps.cols)


def _frequency_chunks(kernel: np.ndarray, spec: ConvSpec, dtype=np.complex128, taps=None):
    """Yields the per-frequency matrices of a circular spec (strides dividing) by row chunks.

    Each item: ``dtype`` (complex) ``(g, rows, N2 // 2 + 1, c_out / g, (c_in / g) s1 s2)``, the
    matrices of ``spectra.frequency_matrices`` for a block of first-axis frequencies ``u`` (all of
    them, in order, over the items). **The item is a view of one buffer that the next item
    overwrites**: copy what must outlive the iteration step. Computed from the kernel's few
    polyphase taps ``E[a, b]`` (:func:`_polyphase_taps`), never from the zero-embedded kernel:
    ``M(u, v) = Σ_ab e^{-2πi (u a / N1 + v b / N2)} E[a, b]``, one complex matrix product
    ``(frequencies, taps) @ (taps, entries)`` per group (BLAS ``zgemm`` / ``cgemm``). The exponent
    is periodic: taps beyond the grid (a dilated kernel larger than the input) wrap round it.
    ``dtype=np.complex64``: the same in single precision (half the memory traffic; for
    estimates only). ``taps``: :func:`_polyphase_taps` of the kernel when already computed.
    """
    if taps is None:
        taps = _polyphase_taps(kernel, spec)
    g, t, entries = taps.taps.shape
    big1, big2 = taps.big
    n2h = big2 // 2 + 1
    coefficients = taps.taps.astype(dtype)
    step = max(1, FREQUENCY_CHUNK_ENTRIES // max(n2h * g * entries, 1))
    step = min(step, big1)
    # One buffer for every item: on the 2-core VM measured here, touching pages that had been
    # freed a few seconds before cost ~40x touching reused ones (256 MB: 2 s against 0.05 s).
    buffer = np.empty((g, step * n2h, entries), dtype)
    v = np.arange(n2h)
    for start in range(0, big1, step):
        u = np.arange(start, min(start + step, big1))
        out = buffer[:, : len(u) * n2h]
        np.matmul(_phases(taps, u, v).astype(dtype), coefficients, out=out)
        yield out.reshape(g, len(u), n2h, taps.cog, taps.cols)


#: Most bytes of the tap cross-Grams that :class:`_TapGrams` holds (one group's).
MAX_TAP_GRAM_BYTES = 160 * 2**20
#: Most complex entries of per-frequency Grams that :meth:`_TapGrams.chunks` forms at once.
GRAM_CHUNK_ENTRIES = 2_000_000


def _tap_grams_pay(taps: _Taps) -> bool:
    """Whether :class:`_TapGrams` (Grams from the taps' cross-Grams) pays against one Gram per
    frequency: ``t (t + 1) / 2`` real products (``2 n² k`` flops each) against ``N1 (N2 // 2 +
    1)`` Grams of ``spectra.numpy._fourier._gram`` (``6 n² k`` each), for ``t`` taps, asked to
    be at least 3x fewer flops (the per-frequency sums of ``t²`` terms are memory-bound), and the
    cross-Grams within :data:`MAX_TAP_GRAM_BYTES`."""
    t = taps.taps.shape[1]
    n = min(taps.cog, taps.cols)
    frequencies = taps.big[0] * (taps.big[1] // 2 + 1)
    return t * (t + 1) <= 2 * frequencies and t * t * n * n * 8 <= MAX_TAP_GRAM_BYTES


class _TapGrams:
    """The smaller Gram ``M M^H`` / ``M^H M`` of group ``gi``'s matrix at each frequency of the
    half plane, from the taps' real cross-Grams (computed once, here).

    With ``M(ω) = Σ_t φ_t(ω) E_t``: on the output side ``M M^H = Σ_{t,t'} φ_t conj(φ_t') E_t
    E_t'^T``, on the input side ``M^H M = Σ_{t,t'} conj(φ_t) φ_t' E_t^T E_t'``. The real
    cross-Grams ``E_t E_t'^T`` cost ``t (t + 1) / 2`` real products; each Gram is then a sum of
    ``t²`` of them (:meth:`chunks`: two real products ``(chunk, t²) @ (t², n²)`` per chunk of
    frequencies; :meth:`at`: one frequency). The same Grams as ``_fourier._gram`` of each
    ``M(ω)``, up to float64 rounding of the sums.
    """

    def __init__(self, taps: _Taps, gi: int):
        _, t, _ = taps.taps.shape
        e = taps.taps[gi].reshape(t, taps.cog, taps.cols)
        self.out_side = taps.cog <= taps.cols
        n = self.n = taps.cog if self.out_side else taps.cols
        # The cross-Grams, one real product per pair t <= t' (the others their transposes),
        # written in place: no temporaries of the cross-Grams' size.
        cross = np.empty((t, t, n, n))
        for i in range(t):
            for j in range(i, t):
                if self.out_side:
                    np.matmul(e[i], e[j].T, out=cross[i, j])
                else:
                    np.matmul(e[i].T, e[j], out=cross[i, j])
                if j > i:
                    cross[j, i] = cross[i, j].T
        self.cross = cross.reshape(t * t, n * n)
        self.n2h = taps.big[1] // 2 + 1
        # (frequencies, t) phases of the whole half plane, row-major (u, v); conjugated on the
        # input side, so that each side's Gram is Σ_{t,t'} φ_t conj(φ_t') C[t, t'].
        phases = _phases(taps, np.arange(taps.big[0]), np.arange(self.n2h))
        self.phases = phases if self.out_side else np.conj(phases)

    def _coefficients(self, index: np.ndarray) -> np.ndarray:
        part = self.phases[index]
        return (part[:, :, None] * np.conj(part[:, None, :])).reshape(len(index), -1)

    def at(self, u: int, v: int) -> np.ndarray:
        """The complex128 ``(n, n)`` Gram at frequency ``(u, v)`` (a new array)."""
        coef = self._coefficients(np.array([u * self.n2h + v]))
        gram = np.empty(self.n * self.n, np.complex128)
        gram.real = coef.real @ self.cross
        gram.imag = coef.imag @ self.cross
        return gram.reshape(self.n, self.n)

    def chunks(self):
        """Yields ``(u, v, Grams)`` per chunk of the half plane's frequencies (row-major):
        complex128 ``(chunk, n, n)``, both triangles; **a view of a buffer that the next item
        overwrites**."""
        n = self.n
        total = self.phases.shape[0]
        step = max(1, GRAM_CHUNK_ENTRIES // (n * n))
        re = np.empty((step, n * n))
        im = np.empty((step, n * n))
        grams = np.empty((step, n, n), np.complex128)
        for start in range(0, total, step):
            index = np.arange(start, min(start + step, total))
            coef = self._coefficients(index)
            k = len(index)
            np.matmul(np.ascontiguousarray(coef.real), self.cross, out=re[:k])
            np.matmul(np.ascontiguousarray(coef.imag), self.cross, out=im[:k])
            out = grams[:k]
            out.real = re[:k].reshape(k, n, n)
            out.imag = im[:k].reshape(k, n, n)
            yield index // self.n2h, index % self.n2h, out


def _ritz_estimates(product, v: np.ndarray, steps: int) -> np.ndarray:
    """Top Ritz values of ``steps`` Lanczos steps per entry of a batch: ``(...)``.

    ``product`` maps ``(..., n, 1)`` to ``(..., n, 1)``, each entry's Hermitian positive
    semi-definite matrix times its vector; ``v`` ``(..., n, 1)``: the start vectors. Fully
    reorthogonalised (twice); an entry whose Krylov space is invariant stops there (its next
    vectors are zero). Each value is a Rayleigh quotient, so at most that entry's λ_max (up to
    rounding); for the ordering of frequencies only (measured on WideResNet-50-2's 512- and
    1024-wide layers: within 0.2-1.7% of λ_max where 12 power steps were 4-7% low, which put the
    wrong frequency first in some of them).
    """
    tiny = np.finfo(v.real.dtype).tiny
    basis, alphas, betas = [], [], []
    for _ in range(steps):
        v = v / np.maximum(np.linalg.norm(v, axis=(-2, -1), keepdims=True), tiny)
        basis.append(v)
        w = product(v)
        alphas.append(np.real(np.sum(np.conj(v) * w, axis=(-2, -1))))
        q = np.concatenate(basis, axis=-1)  # (..., n, j + 1)
        qh = np.conj(np.swapaxes(q, -1, -2))
        for _ in range(2):  # Twice is enough.
            w = w - q @ (qh @ w)
        beta = np.linalg.norm(w, axis=(-2, -1))
        scale = np.maximum(np.abs(alphas[-1]), tiny)
        live = (beta > 1e-6 * scale)[..., None, None]  # Else invariant: stop that entry.
        betas.append(np.where(live[..., 0, 0], beta, 0.0))
        v = np.where(live, w, 0)
    k = len(alphas)
    t = np.zeros((*alphas[0].shape, k, k))
    for j in range(k):
        t[..., j, j] = alphas[j]
        if j + 1 < k:
            t[..., j, j + 1] = t[..., j + 1, j] = betas[j]
    return np.linalg.eigvalsh(t)[..., -1]


def _matrix_estimates(m: np.ndarray, steps: int, row_scale=None) -> np.ndarray:
    """Estimates of λ_max(M^H M) per matrix ``(g, ..., r, c)`` (of ``diag(s) M`` with
    ``row_scale`` ``s`` ``(g, r)``): Lanczos Ritz values (:func:`_ritz_estimates`) in single
    precision: they only order the frequencies (the bound is computed from the float64 Grams)."""
    rng = np.random.default_rng(0)
    c = m.shape[-1]
    m = m.astype(np.complex64, copy=False)
    s2 = None
    if row_scale is not None:
        s2 = (np.asarray(row_scale, np.float32) ** 2).reshape(
            m.shape[0], *[1] * (m.ndim - 3), -1, 1
        )
    mt = np.swapaxes(m, -1, -2)  # A view: M^H w = conj(M^T conj(w)), no conjugated copy of M.

    def product(v):
        w = m @ v
        return np.conj(mt @ np.conj(w if s2 is None else s2 * w))

    v = (rng.standard_normal((*m.shape[:-2], c, 1)) + 0j).astype(np.complex64)
    return _ritz_estimates(product, v, steps).astype(np.float64)


def _gram_estimates(grams: np.ndarray, steps: int, scale=None) -> np.ndarray:
    """Estimates of λ_max per Hermitian Gram ``(k, n, n)`` (both triangles; of ``diag(s) G
    diag(s)`` with ``scale`` ``s`` ``(n,)``): Lanczos Ritz values (:func:`_ritz_estimates`)
    from a seeded random start. They only order the frequencies."""
    rng = np.random.default_rng(0)
    k, n, _ = grams.shape
    s = None if scale is None else np.asarray(scale, np.float64).reshape(1, n, 1)

    def product(v):
        return grams @ v if s is None else s * (grams @ (s * v))

    return _ritz_estimates(product, rng.standard_normal((k, n, 1)) + 0j, steps)
