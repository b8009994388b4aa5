"""Per-frequency and block spectra of conv layers on the host (NumPy, float64, no XLA).

The companions of ``train.report._host`` (see its doc for why the host): exact spectra where the
operator block-diagonalises, the circulant-embedding bound, and the spectral-density
approximation for the plots.

* :func:`circular_singular_values_numpy`: the **exact** spectrum of a circular layer (strides
  dividing the input) from its per-frequency (polyphase) matrices (Sedghi et al. 2019), as
  ``spectra.singular_values(kernel, spec, 'fft')``.
* :func:`circulant_sigma_max_numpy`: σ_max of the circulant embedding: an **upper bound** for a
  zero-padded layer (``spectra.symbol_grid_bound``), **exact** for a circular one.
* :func:`disjoint_windows` / :func:`block_singular_values`: layers in which no input pixel is
  read by two output pixels (1x1 kernels at any stride and zero padding, non-overlapping
  "patchify" convs with stride >= the dilated kernel): after a permutation the operator is
  block diagonal, one block per output pixel and group (the kernel reshaped to
  ``(taps * c_in/g, c_out/g)``, restricted to the taps that read real input), so its singular
  values are **exactly** those of the blocks (plus zeros).
* :func:`spectral_density_values_numpy`: Yi 2020's spectral-density **approximation** with the
  default grid and correction of ``spectra.spectral_density_singular_values`` (same values).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import spectra
from spectra import ConvSpec
from train.report._host import axis_geometry
from train.report._host import float64_kernel
from train.report._host import frobenius_norm_numpy

#: Most complex entries of per-frequency matrices held at once (they are computed in chunks of
#: frequency rows): bounds the memory of the circulant computations (16 bytes each).
FREQUENCY_CHUNK_ENTRIES = 4_000_000

# --------------------------------------------------------------------------------------------
# Circulant (per-frequency) computations.


def _frequency_chunks(kernel: np.ndarray, spec: ConvSpec):
    """Yields the per-frequency matrices of a circular spec (strides dividing) by row chunks.

    Each item: complex ``(g, rows, N2 // 2 + 1, c_out / g, (c_in / g) s1 s2)``, the matrices of
    ``spectra.frequency_matrices`` for a block of first-axis frequencies ``u`` (all of them, in
    order, over the items). Computed from the kernel's few taps (polyphase; an rfft along the
    second axis, a small DFT matrix along the first), never from the zero-embedded kernel.
    """
    kh, kw, cig, cout = kernel.shape
    g = spec.feature_group_count
    cog = cout // g
    (s1, s2), (d1, d2) = spec.strides, spec.kernel_dilation
    big1, big2 = (n // s for n, s in zip(spec.input_shape, spec.strides))
    keff1, keff2 = spec.dilated_kernel_size(kernel.shape)
    t1, t2 = -(-keff1 // s1), -(-keff2 // s2)
    e = np.zeros((t1 * s1, t2 * s2, cig, cout))
    e[:keff1:d1, :keff2:d2] = kernel
    e = e.reshape(t1, s1, t2, s2, cig, g, cog)
    e = np.fft.rfft(e, n=big2, axis=2)  # (t1, s1, N2h, s2, cig, g, cog)
    n2h = big2 // 2 + 1
    per_row = n2h * s1 * s2 * cig * cout
    step = max(1, FREQUENCY_CHUNK_ENTRIES // max(per_row, 1))
    for start in range(0, big1, step):
        u = np.arange(start, min(start + step, big1))
        dft = np.exp(-2j * np.pi * np.outer(u, np.arange(t1)) / big1)  # (rows, t1)
        m = np.tensordot(dft, e, axes=(1, 0))  # (rows, s1, N2h, s2, cig, g, cog)
        yield m.transpose(5, 0, 2, 6, 4, 1, 3).reshape(g, len(u), n2h, cog, cig * s1 * s2)


def _top_singular_values(m: np.ndarray) -> np.ndarray:
    """σ_max of each matrix of a stack ``(..., r, c)``: λ_max of the smaller Gram (eigvalsh)."""
    r, c = m.shape[-2:]
    if min(r, c) == 1:
        return np.sqrt(np.sum(np.abs(m) ** 2, axis=(-2, -1)))
    mh = np.conj(np.swapaxes(m, -1, -2))
    gram = m @ mh if r <= c else mh @ m
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[..., -1], 0.0))


def circulant_sigma_max_numpy(kernel, spec: ConvSpec) -> float:
    """σ_max of the circular layer containing ``spec``'s: ``spectra.symbol_grid_bound`` on the host.

    The max over the frequency grid of the circulant embedding (zero padding; see
    :func:`spectra.circulant_embedding`) of the per-frequency σ_max (λ_max of the Gram matrix of
    the smaller side, LAPACK ``eigvalsh``, float64).

    Returns:
      An **upper bound** on the layer's σ_max; **exact** for circular specs whose strides divide
      the input.
    """
    return circulant_top_numpy(kernel, spec, with_vector=False)[0]


def circulant_top_numpy(
    kernel, spec: ConvSpec, *, with_vector: bool = True
) -> tuple[float, np.ndarray | None]:
    """:func:`circulant_sigma_max_numpy` and the circulant's top right singular vector, restricted.

    The top of the circular layer containing ``spec``'s is a plane wave ``Re(w̄ e^{2πi⟨k, τ⟩})``
    over the polyphase components ``τ`` of its input grid, with ``w`` the top right singular
    vector of the maximising frequency ``k``'s matrix. Restricted to the layer's own input pixels
    (at offset ``lo`` of the grid) it is a good start vector for Lanczos on the zero-padded layer
    (not a singular vector of it: a start only).

    Returns:
      ``(upper bound, input-shaped (H, W, c_in) float64 vector or None)``.
    """
    kernel, kshape = float64_kernel(kernel, spec)
    emb = spectra.exact_circular_spec(spec, kshape)
    best, where = -1.0, None
    start = 0
    for m in _frequency_chunks(kernel, emb):
        tops = _top_singular_values(m)  # (g, rows, N2h)
        i = int(np.argmax(tops))
        if tops.flat[i] > best:
            gi, r, v = np.unravel_index(i, tops.shape)
            best, where = float(tops.flat[i]), (gi, start + r, v, m[gi, r, v])
        start += m.shape[1]
    if not with_vector or where is None:
        return best, None
    gi, u, v, mat = where
    w = np.linalg.svd(mat)[2][0].conj()  # Top right singular vector, (cig * s1 * s2,).
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
    x = np.zeros((n1, n2, cig * spec.feature_group_count))
    x[..., gi * cig : (gi + 1) * cig] = wave.real
    return best, x


def circular_singular_values_numpy(kernel, spec: ConvSpec) -> np.ndarray:
    """All singular values of a circular layer (strides dividing the input), sorted descending.

    Exact (Sedghi et al. 2019, polyphase for strides): the union with multiplicity of the
    per-frequency matrices' singular values (LAPACK SVD, float64), as
    ``spectra.singular_values(kernel, spec, 'fft')``.

    Returns:
      ``(spec.num_singular_values(kernel.shape),)``.

    Raises:
      ValueError: naming ``spec`` when it is not circular or its strides do not divide its input.
    """
    kernel, kshape = float64_kernel(kernel, spec)
    if not spec.is_circular or any(n % s for n, s in zip(spec.input_shape, spec.strides)):
        raise ValueError(
            f"spec={spec} must be circular with strides dividing input_shape for the exact "
            "per-frequency spectrum"
        )
    big2 = spec.input_shape[1] // spec.strides[1]
    mult = spectra.half_plane_multiplicity(big2)
    parts = []
    for m in _frequency_chunks(kernel, spec):
        sv = np.linalg.svd(m, compute_uv=False)  # (g, rows, N2h, r)
        parts.append(np.repeat(sv, mult, axis=2).ravel())
    values = -np.sort(-np.concatenate(parts))
    return values[: spec.num_singular_values(kshape)]


# --------------------------------------------------------------------------------------------
# Layers with disjoint windows: block diagonal.


def _axis_reads(n: int, m: int, lo: int, s: int, d: int, k: int) -> np.ndarray:
    """``(m, k)`` input positions read along one axis of a zero-padded layer (``-1``: a pad)."""
    pos = s * np.arange(m)[:, None] + d * np.arange(k)[None, :] - lo
    return np.where((pos >= 0) & (pos < n), pos, -1)


def disjoint_windows(spec: ConvSpec, kernel_shape: Sequence[int]) -> bool:
    """True when no input pixel is read by two different (output pixel, tap) pairs.

    Zero padding only (circular layers have their exact FFT method). Holds for 1x1 kernels at
    any stride and padding, and for strides at least the dilated kernel size ("patchify"); then
    :func:`block_singular_values` is exact. Decided by enumerating the reads along each axis (the
    2-D reads are the products of the per-axis ones).
    """
    if spec.is_circular:
        return False
    kshape = tuple(kernel_shape)
    for n, m, lo, s, d, k in axis_geometry(spec, kshape):
        reads = _axis_reads(n, m, lo, s, d, k)
        reads = reads[reads >= 0]
        if np.unique(reads).size != reads.size:
            return False
    return True


def block_singular_values(kernel, spec: ConvSpec) -> np.ndarray:
    """All singular values of a layer with :func:`disjoint_windows`, exactly, sorted descending.

    Each output pixel and group reads its own input pixels: the operator is, after permuting
    rows and columns, block diagonal with blocks ``K_g`` restricted to the taps that read real
    input (rows ``(tap, c)``, columns the group's output channels), plus zero columns for input
    pixels no output reads. So the singular values are those of the blocks, each block counted
    once per output pixel with the same valid taps, padded with zeros (LAPACK SVD, float64).

    Returns:
      ``(spec.num_singular_values(kernel.shape),)``.

    Raises:
      ValueError: naming ``spec`` when its windows overlap.
    """
    kernel, kshape = float64_kernel(kernel, spec)
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
            sv = np.linalg.svd(block, compute_uv=False).ravel()
            parts.append(np.repeat(sv, int(c1) * int(c2)))
    total = spec.num_singular_values(kshape)
    values = -np.sort(-np.concatenate(parts)) if parts else np.zeros(0)
    if values.size < total:
        values = np.concatenate([values, np.zeros(total - values.size)])
    return values[:total]


# --------------------------------------------------------------------------------------------
# Yi 2020's spectral-density approximation (the plots of Lanczos layers).


def _polyphase_kernel(kernel: np.ndarray, strides, dilation) -> np.ndarray:
    """``spectra``'s polyphase kernel: stride-1, undilated, input channels ``(c, r1, r2)``."""
    for axis, (s, d) in enumerate(zip(strides, dilation)):
        size = kernel.shape[axis]
        keff = (size - 1) * d + 1
        taps = -(-keff // s)
        shape = list(kernel.shape)
        shape[axis] = taps * s
        dilated = np.zeros(shape)
        index = [slice(None)] * 4
        index[axis] = slice(0, keff, d)
        dilated[tuple(index)] = kernel
        split = shape[:axis] + [taps, s] + shape[axis + 1 :]
        perm = (0, 2, 3, 1, 4) if axis == 0 else (0, 1, 3, 2, 4)
        out = dilated.reshape(split).transpose(perm)
        kernel = out.reshape(*out.shape[:2], out.shape[2] * out.shape[3], out.shape[4])
    return kernel


def _symbol_singular_values(kernel, spec: ConvSpec, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Singular values of the polyphase symbol on the grid ``w1 x w2``, sorted descending."""
    poly = _polyphase_kernel(kernel, spec.strides, spec.kernel_dilation)
    kh, kw, cig, cout = poly.shape
    g = spec.feature_group_count
    k = poly.reshape(kh, kw, cig, g, cout // g)
    e2 = np.exp(-1j * np.outer(w2, np.arange(kw)))  # (L2, kw)
    half = np.einsum("bq,pqcgo->pbgoc", e2, k)  # (kh, L2, g, cog, cig)
    per_row = max(half[0].size, 1)
    step = max(1, FREQUENCY_CHUNK_ENTRIES // per_row)
    parts = []
    for start in range(0, len(w1), step):
        e1 = np.exp(-1j * np.outer(w1[start : start + step], np.arange(kh)))  # (rows, kh)
        blocks = np.tensordot(e1, half, axes=(1, 0))  # (rows, L2, g, cog, cig)
        parts.append(_singular_values_by_gram(blocks).ravel())
    return -np.sort(-np.concatenate(parts))


def _singular_values_by_gram(m: np.ndarray) -> np.ndarray:
    """All singular values of a stack ``(..., r, c)`` from the eigenvalues of the smaller Gram.

    2-4x faster than an SVD at these sizes; absolute error ``~ sqrt(eps) σ_max`` on the smallest
    values (float64: ~1e-8 σ_max), far below what an approximation for a plot needs.
    """
    r, c = m.shape[-2:]
    mh = np.conj(np.swapaxes(m, -1, -2))
    gram = m @ mh if r <= c else mh @ m
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[..., ::-1], 0.0))


def _fit_count(values: np.ndarray, total: int, keep_largest: bool) -> np.ndarray:
    """As ``spectra``: quantile resampling (or largest kept) when too many, zeros when too few."""
    count = values.shape[0]
    if count > total and not keep_largest:
        pos = np.clip((np.arange(total) + 0.5) * count / total - 0.5, 0, count - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, count - 1)
        frac = pos - lo
        return values[lo] * (1 - frac) + values[hi] * frac
    if count >= total:
        return values[:total]
    return np.concatenate([values, np.zeros(total - count)])


def _bisect(fn, lo: float, hi: float, iterations: int = 64) -> float:
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if fn(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _correct(values: np.ndarray, target: float, correction: str) -> np.ndarray:
    """``spectra``'s energy corrections (``Σσ² = ||A||_F²``), on a sorted-descending array."""
    if correction == "none":
        return values
    top = values[0]
    if correction == "stretch":
        gaps = top - values
        lam = _bisect(lambda t: np.sum(np.maximum(top - t * gaps, 0.0) ** 2) - target, 0.0, 1024.0)
        return np.maximum(top - lam * gaps, 0.0)
    count = values.shape[0]
    if correction == "shift":
        weights = np.ones(count)
    else:
        weights = np.minimum(1.0, (np.arange(count) + 1) / max(spectra.TAPER_FRACTION * count, 1.0))

    def excess(c):
        return np.sum(np.maximum(values - c * weights, 0.0) ** 2) - target

    c = _bisect(excess, -float(np.sqrt(target)), float(np.max(values / weights)))
    return -np.sort(-np.maximum(values - c * weights, 0.0))


def spectral_density_cost(spec: ConvSpec, kernel_shape: Sequence[int]) -> float:
    """Rough flop count of :func:`spectral_density_values_numpy` (samples x Gram + eigvalsh)."""
    kshape = tuple(kernel_shape)
    if spec.is_circular:
        samples = np.prod([-(-n // s) for n, s in zip(spec.input_shape, spec.strides)])
    else:
        w1, w2 = spectra.grid_points(spec, kshape, spectra.GRIDS[spectra.DEFAULT_GRID])
        samples = w1.size * w2.size
    g = spec.feature_group_count
    rows = kshape[3] // g
    cols = kshape[2] * spec.strides[0] * spec.strides[1]
    small, large = sorted((rows, cols))
    return float(samples * g * 8 * small * small * (large + small))


def spectral_density_values_numpy(kernel, spec: ConvSpec) -> np.ndarray:
    """``spectra.spectral_density_singular_values(kernel, spec)`` (default grid and correction)
    on the host: Yi 2020's **approximation** of all singular values, sorted descending.

    For a ``'CIRCULAR'`` spec: the exact :func:`circular_singular_values_numpy` when the strides
    divide the input, else (as ``spectra.circulant_singular_values``) the polyphase symbol on the
    circular grid ``2πu / ceil(n / s)``, an approximation. Same values as ``spectra`` (tested).

    Returns:
      ``(spec.num_singular_values(kernel.shape),)``.
    """
    kernel, kshape = float64_kernel(kernel, spec)
    total = spec.num_singular_values(kshape)
    if spec.is_circular:
        if all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides)):
            return circular_singular_values_numpy(kernel, spec)
        circulant = spectra.GRIDS["circulant"]
        w1, w2 = (circulant(n, 0, (0, 0), s) for n, s in zip(spec.input_shape, spec.strides))
        return _fit_count(_symbol_singular_values(kernel, spec, w1, w2), total, True)
    grid = spectra.GRIDS[spectra.DEFAULT_GRID]
    w1, w2 = spectra.grid_points(spec, kshape, grid)
    values = _symbol_singular_values(kernel, spec, w1, w2)
    if grid.one_sided:
        values = 0.5 * (values[0::2] + values[1::2])
    values = _fit_count(values, total, grid.keep_largest)
    correction = spectra.DEFAULT_CORRECTION
    if correction != "none":
        values = _correct(values, frobenius_norm_numpy(kernel, spec) ** 2, correction)
    return values
