"""Yi 2020's spectral-density approximation on the host (NumPy, float64, no XLA).

:func:`spectral_density_singular_values` gives the values of
``spectra.spectral_density_singular_values(kernel, spec)`` (default grid and correction; tested
equal): an **approximation** of all singular values, for the plots of layers too large for an
exact spectrum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectra._density import DEFAULT_CORRECTION
from spectra._density import DEFAULT_GRID
from spectra._density import GRIDS
from spectra._density import _correction_weights
from spectra._density import grid_points
from spectra._spec import ConvSpec
from spectra.numpy._fourier import fft_applies
from spectra.numpy._fourier import singular_values
from spectra.numpy._frequencies import FREQUENCY_CHUNK_ENTRIES
from spectra.numpy._operator import float64_kernel
from spectra.numpy._operator import frobenius_norm


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
    weights = _correction_weights(values.shape[0], correction)

    def excess(c):
        return np.sum(np.maximum(values - c * weights, 0.0) ** 2) - target

    c = _bisect(excess, -float(np.sqrt(target)), float(np.max(values / weights)))
    return -np.sort(-np.maximum(values - c * weights, 0.0))


def spectral_density_cost(spec: ConvSpec, kernel_shape: Sequence[int]) -> float:
    """Rough flop count of :func:`spectral_density_singular_values` (samples x Gram + eigvalsh)."""
    kshape = tuple(kernel_shape)
    if spec.is_circular:
        samples = np.prod([-(-n // s) for n, s in zip(spec.input_shape, spec.strides)])
    else:
        w1, w2 = grid_points(spec, kshape, GRIDS[DEFAULT_GRID])
        samples = w1.size * w2.size
    g = spec.feature_group_count
    rows = kshape[3] // g
    cols = kshape[2] * spec.strides[0] * spec.strides[1]
    small, large = sorted((rows, cols))
    return float(samples * g * 8 * small * small * (large + small))


def spectral_density_singular_values(kernel, spec: ConvSpec) -> np.ndarray:
    """``spectra.spectral_density_singular_values(kernel, spec)`` (default grid and correction)
    on the host: Yi 2020's **approximation** of all singular values, sorted descending.

    For a ``'CIRCULAR'`` spec: the exact ``singular_values(kernel, spec, 'fft')`` when the strides
    divide the input, else (as ``spectra.circulant_singular_values``) the polyphase symbol on the
    circular grid ``2πu / ceil(n / s)``, an approximation. Same values as ``spectra`` (tested).

    Returns:
      ``(spec.num_singular_values(kernel.shape),)``.
    """
    kernel, kshape = float64_kernel(kernel, spec)
    total = spec.num_singular_values(kshape)
    if spec.is_circular:
        if fft_applies(spec):
            return singular_values(kernel, spec, "fft")
        circulant = GRIDS["circulant"]
        w1, w2 = (circulant(n, 0, (0, 0), s) for n, s in zip(spec.input_shape, spec.strides))
        return _fit_count(_symbol_singular_values(kernel, spec, w1, w2), total, True)
    grid = GRIDS[DEFAULT_GRID]
    w1, w2 = grid_points(spec, kshape, grid)
    values = _symbol_singular_values(kernel, spec, w1, w2)
    if grid.one_sided:
        values = 0.5 * (values[0::2] + values[1::2])
    values = _fit_count(values, total, grid.keep_largest)
    correction = DEFAULT_CORRECTION
    if correction != "none":
        values = _correct(values, frobenius_norm(kernel, spec) ** 2, correction)
    return values
