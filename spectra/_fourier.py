r"""Per-frequency matrices of a circular conv (Sedghi et al. 2019), with stride, dilation, groups.

For circular padding the operator is block-diagonalised by the 2-D DFT. With strides
``(s1, s2)`` dividing the input ``(n1, n2)``, split the input into its ``s1 * s2`` polyphase
components ``x_r[t] = x[s t + r]``; the layer becomes a sum of circular convs on the
``N = n / s`` grid, so at each frequency of that grid it acts as one
``c_out x (c_in * s1 * s2)`` matrix (Senderovich et al. 2022). Groups make every matrix block
diagonal; the blocks are kept separate. A real kernel gives ``A(-w) = conj(A(w))``, so only the
``rfft`` half plane is computed and each frequency carries a multiplicity of 1 or 2.

The singular values of the layer are *exactly* the union, with multiplicity, of the singular
values of these matrices. The matrices used here are the DFT of the (dilated, zero-embedded)
kernel, i.e. the conjugate of the operator's symbol; singular values and clipping are unaffected.
A dilated kernel larger than the input wraps around it (Flax's wrap pad repeats the input): its
taps are folded modulo the input size first (:func:`embed_kernel`), which is the same as
sampling the kernel's symbol on the input's frequency grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spectra._spec import ConvSpec


class FrequencyMatrices(NamedTuple):
    """The per-frequency matrices of a circular conv over the ``rfft`` half plane.

    Attributes:
      matrices: complex ``(groups, N1, N2 // 2 + 1, c_out // groups, (c_in // groups) * s1 * s2)``
        with ``N = input_shape / strides``.
      multiplicity: int NumPy array ``(N2 // 2 + 1,)``: how many frequencies of the full plane
        each column of the half plane stands for (1 or 2). Static.
    """

    matrices: jax.Array
    multiplicity: np.ndarray


def check_fft_applicable(spec: ConvSpec) -> None:
    """Raises ``ValueError`` unless the exact FFT method applies to ``spec``."""
    if not spec.is_circular:
        raise ValueError(
            f"padding={spec.padding!r}: the exact FFT method needs padding='CIRCULAR'; use "
            "method='dense' or 'lanczos' for exact zero-padded results"
        )
    for n, s in zip(spec.input_shape, spec.strides):
        if n % s:
            raise ValueError(
                f"strides={spec.strides} must divide input_shape={spec.input_shape} for the "
                "exact circular spectrum"
            )


def _grid(spec: ConvSpec) -> tuple[int, int]:
    return tuple(n // s for n, s in zip(spec.input_shape, spec.strides))  # type: ignore


def half_plane_multiplicity(n2: int) -> np.ndarray:
    """Multiplicity of each ``rfft`` column of an ``n2``-point axis in the full plane."""
    m = np.full(n2 // 2 + 1, 2, dtype=np.int64)
    m[0] = 1
    if n2 % 2 == 0:
        m[-1] = 1
    return m


def fold_counts(size: int, dilation: int, n: int) -> np.ndarray:
    """How many of the ``size`` taps of one axis land on each position ``p * dilation mod n``.

    ``(n,)`` ints: all 0 or 1 when the dilated kernel fits in ``n`` (``(size - 1) * dilation <
    n``); larger where a kernel wider than the circular input wraps onto itself.
    """
    return np.bincount((np.arange(size) * dilation) % n, minlength=n)


def embed_kernel(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    """The circulant kernel ``(n1, n2, c_in // g, c_out)`` of a (dilated) HWIO kernel.

    Tap ``(p, q)`` lands at ``(p d1 mod n1, q d2 mod n2)``, and taps landing on the same position
    add up: a circular conv wraps its input around as many times as needed (Flax's ``'CIRCULAR'``
    is ``jnp.pad(mode='wrap')``, which repeats the input when the pad exceeds it), so a dilated
    kernel larger than the input acts as its taps folded modulo the input size. When the dilated
    kernel fits (``k_eff <= n``) this is a zero embedding with the taps at ``p * d``.
    """
    n1, n2 = spec.input_shape
    d1, d2 = spec.kernel_dilation
    keff1, keff2 = spec.dilated_kernel_size(kernel.shape)
    # Dilate, zero-pad to whole multiples of n, then sum the wraps.
    m1, m2 = -(-keff1 // n1), -(-keff2 // n2)
    config = [(0, m1 * n1 - keff1, d1 - 1), (0, m2 * n2 - keff2, d2 - 1), (0, 0, 0), (0, 0, 0)]
    e = lax.pad(kernel, jnp.zeros((), kernel.dtype), config)
    if m1 == 1 and m2 == 1:
        return e
    return e.reshape(m1, n1, m2, n2, *kernel.shape[2:]).sum(axis=(0, 2))


def frequency_matrices(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> FrequencyMatrices:
    """The per-frequency matrices whose singular values are exactly the layer's.

    Args:
      kernel: real HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: a ``'CIRCULAR'`` spec whose strides divide its input shape.

    Returns:
      :class:`FrequencyMatrices`.
    """
    kernel = jnp.asarray(kernel)
    spec.validate(kernel)
    check_fft_applicable(spec)
    return FrequencyMatrices(
        _frequency_matrices(kernel, spec), half_plane_multiplicity(_grid(spec)[1]))


@functools.partial(jax.jit, static_argnums=1)
def _frequency_matrices(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    kshape = kernel.shape
    g = spec.feature_group_count
    _, _, cig, cout = kshape
    cog = cout // g
    (s1, s2), (big1, big2) = spec.strides, _grid(spec)
    e = embed_kernel(kernel, spec).reshape(big1, s1, big2, s2, cig, g, cog)
    e_hat = jnp.fft.rfft2(e, axes=(0, 2))  # (N1, s1, N2h, s2, cig, g, cog)
    return e_hat.transpose(5, 0, 2, 6, 4, 1, 3).reshape(
        g, big1, big2 // 2 + 1, cog, cig * s1 * s2
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def kernel_from_frequency_matrices(
    matrices: jax.typing.ArrayLike, spec: ConvSpec, kernel_shape: tuple[int, int, int, int]
) -> jax.Array:
    """Inverse of :func:`frequency_matrices`, restricted to the kernel's support.

    Inverse ``rfft2`` of (possibly modified) per-frequency matrices, giving a circulant kernel
    ``e`` (:func:`embed_kernel`), then the taps at the kernel's (dilated) support are kept: the
    orthogonal projection onto kernels of shape ``kernel_shape``. Exact inverse when
    ``matrices`` came from a kernel of that shape.

    When the dilated kernel is larger than the circular input, several taps fold onto one
    circulant position (:func:`fold_counts`) and the map ``kernel -> e`` is not injective. The
    result is then its pseudo-inverse: each tap gets ``e[p d mod n] / count`` (the
    minimum-norm kernel whose fold is the projection of ``e`` onto the foldable circulant
    kernels). Its layer equals the one ``matrices`` describe whenever they came from a kernel of
    that shape (exact), though the taps may differ from that kernel's.
    """
    matrices = jnp.asarray(matrices)
    kh, kw, cig, cout = kernel_shape
    g = spec.feature_group_count
    cog = cout // g
    (s1, s2), (big1, big2) = spec.strides, _grid(spec)
    m = matrices.reshape(g, big1, big2 // 2 + 1, cog, cig, s1, s2).transpose(1, 5, 2, 6, 4, 0, 3)
    e = jnp.fft.irfft2(m, s=(big1, big2), axes=(0, 2))
    n1, n2 = big1 * s1, big2 * s2
    e = e.reshape(n1, n2, cig, cout)
    d1, d2 = spec.kernel_dilation
    if (kh - 1) * d1 < n1 and (kw - 1) * d2 < n2:
        return e[: (kh - 1) * d1 + 1 : d1, : (kw - 1) * d2 + 1 : d2]
    rows, cols = (np.arange(kh) * d1) % n1, (np.arange(kw) * d2) % n2
    counts = np.outer(fold_counts(kh, d1, n1)[rows], fold_counts(kw, d2, n2)[cols])
    taps = e[rows][:, cols]
    return taps / jnp.asarray(counts, taps.dtype)[:, :, None, None]


def expand_multiplicity(values: jax.Array, multiplicity: np.ndarray, total: int) -> jax.Array:
    """Repeats per-frequency values ``(..., N2h, r)`` by the half-plane multiplicity, flattened."""
    counts = np.broadcast_to(multiplicity[:, None], values.shape[-2:])
    counts = np.broadcast_to(counts, values.shape).ravel()
    # Same result as ``jnp.repeat(..., total_repeat_length=total)``, but with the index computed
    # on the host: jnp.repeat's cumsum of constant counts is constant-folded by XLA, which takes
    # seconds to compile for large layers.
    index = np.repeat(np.arange(counts.size), counts)
    if index.size >= total:
        index = index[:total]
    else:
        index = np.pad(index, (0, total - index.size), mode="edge")
    return values.ravel()[index]


def sort_descending(values: jax.Array) -> jax.Array:
    return -jnp.sort(-values)


def circulant_embedding(spec: ConvSpec, kernel_shape) -> ConvSpec:
    """The circular layer whose operator contains ``spec``'s operator as a submatrix.

    With zero pads ``(lo, hi)`` and stride ``s`` per axis, place the input on a circular grid of
    size ``N = ceil((n + max(lo, hi)) / s) * s`` (:func:`_embedding_size`: every read of the
    zero-padded conv outside the input lands on a zero of the grid, a real pixel is read only as
    itself): its outputs are rows ``0..H_out-1`` of the strided circulant, and its inputs are
    columns of it. Hence (exact statement) ``σ_max(zero-padded) <= σ_max(circulant)``: any
    circulant spectral-norm value or bound is an **upper bound** for the zero-padded layer, at
    any stride, dilation and group count, and any input size (taps that wrap round a small grid
    wrap only onto zeros). (The cyclic shift of Flax's ``'CIRCULAR'`` convention is a permutation
    and changes no singular value.)

    For a circular ``spec`` whose strides divide its input this returns ``spec`` itself (equal
    operators). Where a circular stride does not divide the input, that axis gets stride 1:
    the strided layer's outputs are a subset of the stride-1 layer's rows, so again
    ``σ_max(spec) <= σ_max(result)``. The result always has strides dividing its input (the
    exact per-frequency methods apply).
    """
    if spec.is_circular:
        strides = tuple(s if n % s == 0 else 1 for n, s in zip(spec.input_shape, spec.strides))
        return spec if strides == spec.strides else dataclasses.replace(spec, strides=strides)
    size = tuple(
        _embedding_size(n, lo, hi, s, m)
        for n, (lo, hi), s, m in zip(
            spec.input_shape, spec.pads(kernel_shape), spec.strides, spec.output_shape(kernel_shape)
        )
    )
    return dataclasses.replace(spec, input_shape=size, padding="CIRCULAR")


def _embedding_size(n: int, lo: int, hi: int, s: int, m: int) -> int:
    """The circulant grid of one axis (input ``n``, pads ``lo, hi``, stride ``s``, output ``m``).

    The zero-padded layer reads positions ``[-lo, n + hi - 1]``; on a grid of ``N >= n +
    max(lo, hi)`` pixels (input at ``0..n-1``) every read outside the input lands on a zero
    (``N + p >= n`` for ``p >= -lo``, ``p < N`` for ``p <= n + hi - 1``), and a real pixel ``q``
    is read only as itself (``q ± N`` is outside the read range). Two reads ``N`` apart are both
    pads: the taps may wrap round a small grid, but only onto zeros. So with ``m <= N / s``
    (every output its own row) the layer is the submatrix of the circular layer's rows
    ``0..m-1`` and its input's columns: ``N = ceil((n + max(lo, hi)) / s) s``, fewer
    frequencies than ``n + lo + hi`` (e.g. ``n + 1`` instead of ``n + 2`` for a 3x3 'SAME'
    conv). Else (pads wider than the kernel on both sides, negative pads) ``ceil((n + lo + hi)
    / s) s``, in which no read wraps.
    """
    if min(lo, hi) >= 0:
        small = -(-(n + max(lo, hi)) // s) * s
        if m <= small // s:
            return small
    return -(-(n + lo + hi) // s) * s


# ---------------------------------------------------------------------------------------------
# The polyphase form and the symbol: the one implementation of each, used by ``_bounds`` (certified
# bounds) and ``_density`` (the spectral-density approximation).


def polyphase_axis(
    kernel: jax.Array, axis: int, dilation: int, stride: int, *, drop_empty_phases: bool = False
) -> jax.Array:
    """Polyphase reduction of an HWIO kernel along spatial ``axis`` (0 or 1).

    The kernel dilated along ``axis`` (taps at ``p * dilation``), zero-padded to a multiple of
    ``stride``, split into its ``stride`` phases ``r``: tap ``a`` of phase ``r`` is the dilated
    tap ``stride * a + r``. Along that axis, the strided, dilated conv is the stride-1,
    undilated conv of this kernel applied to the polyphase components of its input (an exact
    re-indexing; Senderovich et al. 2022). With ``stride = 1`` it is the dilated kernel.

    Args:
      kernel: HWIO ``(kh, kw, c, c_out)``.
      axis: 0 (H) or 1 (W).
      dilation: the dilation along ``axis``.
      stride: the stride along ``axis``.
      drop_empty_phases: drop the phases that hold no tap (their columns of the symbol are 0).

    Returns:
      ``(.., ceil(k_eff / stride), .., c * num_phases, c_out)`` with the phase index fastest in
      the channel axis; ``num_phases`` is ``stride`` unless empty phases are dropped.
    """
    size = kernel.shape[axis]
    keff = (size - 1) * dilation + 1
    taps = -(-keff // stride)
    config = [(0, 0, 0)] * 4
    config[axis] = (0, taps * stride - keff, dilation - 1)
    dilated = lax.pad(kernel, jnp.zeros((), kernel.dtype), config)
    shape = list(dilated.shape)
    split = shape[:axis] + [taps, stride] + shape[axis + 1:]
    dilated = dilated.reshape(split)
    if drop_empty_phases:
        phases = np.array(sorted({(p * dilation) % stride for p in range(size)}))
        if phases.size < stride:
            dilated = jnp.take(dilated, phases, axis=axis + 1)
    # (.., taps, phase, .., c, o) -> (.., taps, .., c, phase, o)
    perm = (0, 2, 3, 1, 4) if axis == 0 else (0, 1, 3, 2, 4)
    out = dilated.transpose(perm)
    return out.reshape(*out.shape[:2], out.shape[2] * out.shape[3], out.shape[4])


def polyphase_kernel(
    kernel: jax.Array, strides: tuple[int, int], dilation: tuple[int, int]
) -> jax.Array:
    """The stride-1, undilated kernel of a strided, dilated layer's polyphase form.

    :func:`polyphase_axis` on both axes, keeping every phase:
    ``(ceil(k_eff1 / s1), ceil(k_eff2 / s2), (c_in // g) s1 s2, c_out)`` with input channels
    ordered ``(c, r1, r2)`` inside each group. Its symbol is the ``c_out x (c_in s1 s2)`` symbol
    of the strided operator (exact relabelling).
    """
    for axis in (0, 1):
        kernel = polyphase_axis(kernel, axis, dilation[axis], strides[axis])
    return kernel


def group_taps(kernel: jax.Array, groups: int) -> jax.Array:
    """HWIO ``(kh, kw, cig, c_out)`` -> per-group tap matrices ``(groups, kh, kw, cog, cig)``."""
    kh, kw, cig, cout = kernel.shape
    return kernel.reshape(kh, kw, cig, groups, cout // groups).transpose(3, 0, 1, 4, 2)


def symbol(
    kernel: jax.Array, omegas: jax.Array, dilation: tuple[int, int], groups: int
) -> jax.Array:
    r"""The symbol ``F(ω) = Σ_pq T_pq e^{-i (p d1 ω1 + q d2 ω2)}`` per group, at any frequencies.

    Args:
      kernel: HWIO ``(kh, kw, c_in // groups, c_out)``.
      omegas: ``(..., 2)`` angles in radians.
      dilation: ``(d1, d2)``.
      groups: the group count.

    Returns:
      complex ``(..., groups, c_out // groups, c_in // groups)`` (exact; direct sum over taps at
      ``Precision.HIGHEST``). On the DFT grid it equals :func:`symbol_on_grid` of
      :func:`group_taps` (tested).
    """
    kh, kw, cig, cout = kernel.shape
    dtype = jnp.result_type(kernel.dtype, jnp.complex64)
    real = jnp.finfo(dtype).dtype
    omegas = omegas.astype(real)
    taps1 = jnp.arange(kh, dtype=real) * dilation[0]
    taps2 = jnp.arange(kw, dtype=real) * dilation[1]
    e1 = jnp.exp(-1j * omegas[..., 0:1] * taps1).astype(dtype)  # (..., kh)
    e2 = jnp.exp(-1j * omegas[..., 1:2] * taps2).astype(dtype)  # (..., kw)
    k = kernel.astype(dtype).reshape(kh, kw, cig, groups, cout // groups)
    return jnp.einsum(
        "...p,...q,pqcgo->...goc", e1, e2, k, precision=lax.Precision.HIGHEST
    )


def symbol_on_grid(taps: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The undilated symbol at ``ω = 2π (u / M1, v / M2)`` on the rfft half grid, by FFT.

    Args:
      taps: per-group taps ``(g, kh, kw, cog, cig)`` (:func:`group_taps`).
      grid: ``(M1, M2)``, each at least the number of taps on its axis.

    Returns:
      complex ``(g, M1, M2 // 2 + 1, cog, cig)``: :func:`symbol` (dilation 1) at those points.
      A size-1 grid axis (single tap) needs no transform; skipping it also avoids an XLA CPU FFT
      layout check failure on degenerate shapes.
    """
    m1, m2 = grid
    if m2 > 1:
        out = jnp.fft.rfft(taps, n=m2, axis=2)
    else:
        out = taps.astype(jnp.result_type(taps.dtype, jnp.complex64))
    if m1 > 1:
        out = jnp.fft.fft(out, n=m1, axis=1)
    return out
