"""The conv operator on the host: ``A``, ``Aᵀ``, its matrix, its groups, and kernel-only numbers.

NumPy, float64 (float32 products on request), no XLA. Same convention as :func:`spectra.conv`
(``lax.conv_general_dilated``, HWIO kernels, HWC inputs, Flax's ``'CIRCULAR'`` wrap padding);
pads, output shape and channels come from :class:`spectra.ConvSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from spectra._fourier import group_taps
from spectra._spec import ConvSpec


def axis_geometry(spec: ConvSpec, kshape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per spatial axis ``(n, m, lo, s, d, k)``: input size, output size, leading pad, stride,
    dilation and kernel size of the layer ``spec`` with HWIO kernel shape ``kshape``."""
    return [
        (n, m, lo, s, d, k)
        for n, m, (lo, _), s, d, k in zip(
            spec.input_shape,
            spec.output_shape(kshape),
            spec.pads(kshape),
            spec.strides,
            spec.kernel_dilation,
            kshape[:2],
        )
    ]


def float64_kernel(kernel, spec: ConvSpec) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``(kernel as float64 NumPy, its HWIO shape)`` after ``spec.validate(kernel)``.

    A float64 NumPy kernel is returned as is (no copy: callers only read it)."""
    kernel = np.asarray(kernel)
    kshape = spec.validate(kernel)
    return kernel.astype(np.float64, copy=False), tuple(kshape)  # type: ignore[return-value]


def group_spec(spec: ConvSpec) -> ConvSpec:
    """The spec of one group of ``spec``'s layer: the same geometry with one group.

    A grouped conv's operator is block diagonal: group ``j`` maps input channels
    ``j cig .. (j+1) cig - 1`` to output channels ``j cog .. (j+1) cog - 1`` through the kernel
    slice ``kernel[..., j cog : (j+1) cog]`` (:func:`group_kernel`). Its singular values are the
    union of the groups', its σ_max the largest group σ_max (exact).
    """
    return dataclasses.replace(spec, feature_group_count=1, in_features=None)


def group_kernel(kernel: np.ndarray, spec: ConvSpec, j: int) -> np.ndarray:
    """The HWIO kernel ``(kh, kw, cig, cog)`` of group ``j`` (:func:`group_spec`)."""
    cog = kernel.shape[3] // spec.feature_group_count
    return kernel[..., j * cog : (j + 1) * cog]


def _batched(x, name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """``x`` as ``dtype``, checked to have shape ``(..., *shape)`` (ValueError naming ``name``)."""
    x = np.asarray(x, dtype)
    if x.ndim < 3 or x.shape[-3:] != shape:
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{name} must have shape (..., {dims}); got {x.shape}")
    return x


def _windows(spec: ConvSpec, kshape: Sequence[int]) -> list[tuple[slice, slice]]:
    """Per tap ``(p, q)`` (row-major), the slices of the padded input it reads."""
    (ho, wo), (s1, s2), (d1, d2) = spec.output_shape(kshape), spec.strides, spec.kernel_dilation
    return [
        (
            slice(d1 * p, d1 * p + s1 * (ho - 1) + 1, s1),
            slice(d2 * q, d2 * q + s2 * (wo - 1) + 1, s2),
        )
        for p in range(kshape[0])
        for q in range(kshape[1])
    ]


def _fold(xp: np.ndarray, axis: int, n: int, lo: int) -> np.ndarray:
    """Adjoint of the wrap pad along ``axis``: padded index ``i`` holds input ``(i - lo) mod n``."""
    size = xp.shape[axis]
    blocks = -(-size // n)
    widths = [(0, 0)] * xp.ndim
    widths[axis] = (0, blocks * n - size)
    xp = np.pad(xp, widths)
    shape = xp.shape[:axis] + (blocks, n) + xp.shape[axis + 1 :]
    folded = xp.reshape(shape).sum(axis=axis)
    return np.roll(folded, -lo, axis=axis)


class ConvOperator:
    """The operator ``A`` of one conv layer on the host, set up once for many products.

    The geometry (pads, the slices each tap reads, the grouped kernel) is computed and the kernel
    validated at construction, so :meth:`apply` / :meth:`adjoint` do only the arithmetic: an
    im2col (one strided slice of the padded input per tap) and one matmul per group; the adjoint
    scatters each tap's share back, then crops zero padding or folds circular padding (which
    may wrap several times round an input smaller than the kernel).

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.
      dtype: ``float64`` (default: the products are the float64 operator's to rounding) or
        ``float32`` (inputs, kernel and products in single precision: about twice as fast, each
        product within ~1e-7 relative of the float64 one; for iterations whose final numbers
        are recomputed in float64, as :func:`spectra.numpy.lanczos_spectral_norm` does).
    """

    def __init__(self, kernel, spec: ConvSpec, dtype=np.float64):
        kernel, kshape = float64_kernel(kernel, spec)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64; got {self.dtype}")
        self.spec = spec
        self.kernel_shape = kshape
        self.c_in, self.c_out = spec.channels(kshape)
        self.groups = g = spec.feature_group_count
        self.input_shape = (*spec.input_shape, self.c_in)
        self.output_shape = (*spec.output_shape(kshape), self.c_out)
        self.pads = tuple(tuple(p) for p in spec.pads(kshape))
        self.windows = _windows(spec, kshape)
        kh, kw, cig, cout = kshape
        taps = kh * kw
        k = kernel.reshape(taps, cig, g, cout // g).transpose(2, 0, 1, 3)
        self._kg = np.ascontiguousarray(k.reshape(g, taps * cig, cout // g), self.dtype)
        # One group: a view (2-D BLAS takes it transposed, no copy); several: a copy (NumPy's
        # stacked matmul runs ~10x slower on transposed slices).
        kgt = self._kg.transpose(0, 2, 1)
        self._kgt = kgt if g == 1 else np.ascontiguousarray(kgt)
        (lo1, hi1), (lo2, hi2) = self.pads
        n1, n2 = spec.input_shape
        self._padded = (n1 + lo1 + hi1, n2 + lo2 + hi2)

    @property
    def in_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.output_shape)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``A x``: ``(..., H, W, c_in)`` -> ``(..., H_out, W_out, c_out)``."""
        x = _batched(x, "x", self.input_shape, self.dtype)
        lead = x.shape[:-3]
        (lo1, hi1), (lo2, hi2) = self.pads
        if self.spec.is_circular:
            xp = np.pad(x, [(0, 0)] * len(lead) + [(lo1, hi1), (lo2, hi2), (0, 0)], mode="wrap")
        else:
            xp = np.zeros((*lead, *self._padded, self.c_in), self.dtype)
            xp[..., lo1 : lo1 + x.shape[-3], lo2 : lo2 + x.shape[-2], :] = x
        ho, wo, _ = self.output_shape
        rows = math.prod(lead) * ho * wo
        taps, g = len(self.windows), self.groups
        cols = np.empty((*lead, ho, wo, taps, self.c_in), self.dtype)
        for t, (a, b) in enumerate(self.windows):
            cols[..., t, :] = xp[..., a, b, :]
        if g == 1:
            y = cols.reshape(rows, taps * self.c_in) @ self._kg[0]
        else:
            cols = cols.reshape(rows, taps, g, self.c_in // g).transpose(2, 0, 1, 3)
            y = np.matmul(cols.reshape(g, rows, -1), self._kg).transpose(1, 0, 2)
        return y.reshape(*lead, *self.output_shape)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """``Aᵀ y``: ``(..., H_out, W_out, c_out)`` -> ``(..., H, W, c_in)``."""
        y = _batched(y, "y", self.output_shape, self.dtype)
        lead = y.shape[:-3]
        ho, wo, _ = self.output_shape
        rows = math.prod(lead) * ho * wo
        taps, g, c_in = len(self.windows), self.groups, self.c_in
        if g == 1:
            cols = y.reshape(rows, self.c_out) @ self._kgt[0]
        else:
            yg = y.reshape(rows, g, self.c_out // g).transpose(1, 0, 2)
            cols = np.matmul(yg, self._kgt)  # (g, rows, T cig)
            cols = cols.reshape(g, rows, taps, c_in // g).transpose(1, 2, 0, 3)
        cols = cols.reshape(*lead, ho, wo, taps, c_in)
        (lo1, _), (lo2, _) = self.pads
        n1, n2 = self.spec.input_shape
        xp = np.zeros((*lead, *self._padded, c_in), self.dtype)
        for t, (a, b) in enumerate(self.windows):
            xp[..., a, b, :] += cols[..., t, :]
        if self.spec.is_circular:
            xp = _fold(xp, xp.ndim - 3, n1, lo1)
            return _fold(xp, xp.ndim - 2, n2, lo2)
        return xp[..., lo1 : lo1 + n1, lo2 : lo2 + n2, :]

    def matrix(self) -> np.ndarray:
        """The dense matrix ``(out_dim, in_dim)``, flattened as :func:`spectra.dense_operator`."""
        eye = np.eye(self.in_dim).reshape(self.in_dim, *self.input_shape)
        return self.apply(eye).reshape(self.in_dim, -1).T

    def group_matrices(self) -> np.ndarray:
        """The per-group blocks ``(g, out_dim / g, in_dim / g)`` of the block-diagonal matrix.

        Rows of block ``j`` index ``(H_out, W_out, cog)`` of its output channels, columns
        ``(H, W, cig)`` of its input channels. Computed with one batched :meth:`apply` of
        ``in_dim / g`` inputs (each a basis vector repeated in every group).
        """
        g = self.groups
        h, w, c_in = self.input_shape
        cig = c_in // g
        n = h * w * cig
        eye = np.broadcast_to(np.eye(n).reshape(n, h, w, 1, cig), (n, h, w, g, cig))
        out = self.apply(eye.reshape(n, h, w, c_in))  # (n, ho, wo, c_out)
        ho, wo, c_out = self.output_shape
        out = out.reshape(n, ho * wo, g, c_out // g).transpose(2, 1, 3, 0)
        return out.reshape(g, ho * wo * (c_out // g), n)


def conv(kernel, x, spec: ConvSpec) -> np.ndarray:
    """Applies the layer (no bias) to ``x`` on the host, in float64 (:class:`ConvOperator`).

    The same operator as :func:`spectra.conv` (cross-correlation, ``lax`` conventions).

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      x: ``(..., H, W, c_in)`` with ``(H, W) = spec.input_shape`` (any leading batch dims).
      spec: the layer.

    Returns:
      ``(..., H_out, W_out, c_out)`` float64.

    Example:
      >>> import numpy as np
      >>> from spectra import ConvSpec
      >>> y = conv(np.ones((3, 3, 1, 1)), np.ones((4, 4, 1)), ConvSpec((4, 4)))
      >>> y[..., 0]
      array([[4., 6., 6., 4.],
             [6., 9., 9., 6.],
             [6., 9., 9., 6.],
             [4., 6., 6., 4.]])
    """
    return ConvOperator(kernel, spec).apply(x)


def conv_transpose(kernel, y, spec: ConvSpec) -> np.ndarray:
    """Applies the adjoint ``Aᵀ`` of :func:`conv` to ``y`` ``(..., H_out, W_out, c_out)``.

    Exact adjoint (``<A x, y> = <x, Aᵀ y>``): each tap's contribution is scattered back to the
    input pixels it read; zero padding is cropped, circular padding folded back (wrap-around).

    Returns:
      ``(..., H, W, c_in)`` float64.
    """
    return ConvOperator(kernel, spec).adjoint(y)


def dense_operator(kernel, spec: ConvSpec) -> np.ndarray:
    """The matrix of the layer ``(out_dim, in_dim)`` (float64), as :func:`spectra.dense_operator`.

    Rows index the output flattened ``(H_out, W_out, c_out)``, columns the input ``(H, W, c_in)``.
    Memory ``out_dim * in_dim``: for small layers (:meth:`ConvOperator.group_matrices` holds
    only the diagonal blocks of a grouped layer).
    """
    return ConvOperator(kernel, spec).matrix()


def tap_sum_bound(
    kernel, spec: ConvSpec, *, per_group: bool = False, floor=None
) -> float | np.ndarray:
    """``max_g Σ_pq ||K_g[p, q]||_2``: **upper bound** at any padding, stride and dilation.

    ``A = Σ_pq S_pq ⊗ K[p, q]`` with each ``S_pq`` a partial selection (each output pixel reads
    at most one input pixel through a tap, each input pixel is read at most once): norm <= 1
    (triangle inequality). Groups make ``A`` block diagonal. Exact for 1x1 kernels (with one
    output reading real input). ``spectra.tap_sum_bound`` also tries the polyphase kernel.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      per_group: return the ``(g,)`` bounds of the groups (each an upper bound on that group's
        σ_max) instead of their max.
      floor: optional ``(g,)`` (or scalar) values, e.g. another certified bound per group. A
        group whose tap sum is shown to exceed its floor (the tap norms' power-iteration
        Rayleigh quotients, each at most the tap's norm, already sum to more) gets the looser
        ``Σ_pq ||K_g[p, q]||_F`` instead of the SVDs of its taps: still an **upper bound**
        (``||.||_2 <= ||.||_F``), and above the floor, so never the smaller of the two.
    """
    kernel, _ = float64_kernel(kernel, spec)
    taps = group_taps(kernel, spec.feature_group_count)  # (g, kh, kw, cog, cig)
    g = taps.shape[0]
    taps = taps.reshape(g, -1, *taps.shape[3:])
    if floor is not None:
        floor = np.broadcast_to(np.asarray(floor, np.float64), (g,))
        above = _tap_norms_lower(taps).sum(axis=1) > floor * (1 + 1e-9)
    else:
        above = np.zeros(g, bool)
    sums = np.sqrt(np.sum(taps**2, axis=(-2, -1))).sum(axis=1)
    if not np.all(above):
        exact = np.linalg.norm(taps[~above], ord=2, axis=(-2, -1)).sum(axis=1)
        sums[~above] = exact
    return sums if per_group else float(sums.max())


#: Power steps of :func:`_tap_norms_lower` (products with ``KᵀK``).
TAP_POWER_STEPS = 6


def _tap_norms_lower(taps: np.ndarray) -> np.ndarray:
    """``(g, taps)`` lower bounds ``||K v|| / ||v||`` on the taps' spectral norms, ``v`` after a
    few power steps from a seeded random start (each at most the norm, up to rounding)."""
    v = np.random.default_rng(0).standard_normal((*taps.shape[:2], taps.shape[-1], 1))
    tt = np.swapaxes(taps, -1, -2)
    for _ in range(TAP_POWER_STEPS):
        v = tt @ (taps @ v)
        v = v / np.maximum(np.linalg.norm(v, axis=(-2, -1), keepdims=True), 1e-300)
    return np.linalg.norm(taps @ v, axis=(-2, -1))


def _circular_folded_kernel(kernel: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """A circular layer's kernel on its input grid: dilated tap ``d p`` at ``d p mod n``, summed.

    The undilated ``(min(k_eff, n), ...)`` kernel whose circular layer has the same operator up
    to a cyclic shift of the input (a permutation): taps that wrap round an input smaller than
    the dilated kernel land on the same pixel and add.
    """
    for axis, (n, d) in enumerate(zip(spec.input_shape, spec.kernel_dilation)):
        k = kernel.shape[axis]
        size = min((k - 1) * d + 1, n)
        shape = list(kernel.shape)
        shape[axis] = size
        out = np.zeros(shape)
        for p in range(k):
            src = [slice(None)] * 4
            dst = [slice(None)] * 4
            src[axis] = slice(p, p + 1)
            dst[axis] = slice((p * d) % n, (p * d) % n + 1)
            out[tuple(dst)] += kernel[tuple(src)]
        kernel = out
    return kernel


def frobenius_norm(kernel, spec: ConvSpec) -> float:
    """``||A||_F`` exactly, from the kernel (:func:`spectra.frobenius_norm_squared` on the host).

    Zero padding: each tap's ``||K[p, q]||_F^2`` times the number of output pixels at which it
    reads a real input pixel. Circular: every output reads through every tap; taps that wrap
    onto the same input pixel are summed first (:func:`_circular_folded_kernel`).
    """
    kernel, kshape = float64_kernel(kernel, spec)
    if spec.is_circular:
        folded = _circular_folded_kernel(kernel, spec)
        return float(math.sqrt(math.prod(spec.output_shape(kshape)) * np.sum(folded**2)))
    counts = []
    for n, m, lo, s, d, k in axis_geometry(spec, kshape):
        pos = s * np.arange(m)[:, None] + d * np.arange(k)[None, :] - lo
        counts.append(np.sum((pos >= 0) & (pos < n), axis=0).astype(np.float64))
    return float(math.sqrt(np.sum(np.sum(kernel**2, axis=(2, 3)) * np.outer(*counts))))
