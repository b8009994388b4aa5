"""Lipschitz constants of windowed reductions (max / sum pooling) and of selections."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def axis_window_counts(
    size: int,
    window: int,
    stride: int,
    pads: tuple[int, int],
    window_dilation: int = 1,
    base_dilation: int = 1,
) -> np.ndarray:
    """For one axis: how many windows of a ``reduce_window`` contain each input index.

    Input index ``i`` sits at ``i * base_dilation`` of the dilated input, padded by ``pads``;
    window ``j`` reads positions ``j * stride + t * window_dilation - lo``, ``t < window``.

    Returns:
      ``(size,)`` int counts (exact, by enumeration).
    """
    lo, hi = pads
    dilated = (size - 1) * base_dilation + 1 if size > 0 else 0
    span = (window - 1) * window_dilation + 1
    num_out = max((dilated + lo + hi - span) // stride + 1, 0)
    pos = stride * np.arange(num_out)[:, None] + window_dilation * np.arange(window)[None, :] - lo
    pos = pos.ravel()
    hits = pos[(pos >= 0) & (pos < dilated) & (pos % base_dilation == 0)] // base_dilation
    return np.bincount(hits, minlength=size)


def max_window_count(
    shape: Sequence[int],
    window_dimensions: Sequence[int],
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    window_dilation: Sequence[int] | None = None,
    base_dilation: Sequence[int] | None = None,
) -> int:
    """The largest number of windows of a ``reduce_window`` that contain one input element.

    The count factorises over axes, so the max is the product of the per-axis maxima.
    """
    ndim = len(shape)
    window_dilation = window_dilation or (1,) * ndim
    base_dilation = base_dilation or (1,) * ndim
    total = 1
    for n, k, s, p, wd, bd in zip(
        shape, window_dimensions, window_strides, padding, window_dilation, base_dilation
    ):
        counts = axis_window_counts(int(n), int(k), int(s), tuple(p), int(wd), int(bd))
        total *= int(counts.max()) if counts.size else 0
    return total


def max_pool_lipschitz(*args, **kwargs) -> float:
    r"""ℓ2 Lipschitz constant of a max (or min) pool: ``sqrt(m)``, exact.

    ``m`` = :func:`max_window_count`. Upper bound: ``|max_W a - max_W b| <= max_{i∈W} |a_i - b_i|``
    so ``Σ_W (Δ_W)^2 <= Σ_W Σ_{i∈W} Δ_i^2 <= m ||Δ||^2``. Attained: raising one element in ``m``
    windows (from a constant input) by ``t`` raises each of those ``m`` outputs by ``t``. So
    a max pool with overlapping windows (3x3, stride 1: ``m = 9``) has constant 3, not 1.
    """
    return math.sqrt(max_window_count(*args, **kwargs))


def sum_pool_schur_bound(window_dimensions: Sequence[int], count: int) -> float:
    """Schur bound ``sqrt(row_sum * col_sum)`` for a window sum: ``sqrt(|W| * m)`` (certified)."""
    return math.sqrt(math.prod(int(k) for k in window_dimensions) * count)
