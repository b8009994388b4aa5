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


def embed_kernel(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    """Zero-embeds a (dilated) HWIO kernel into ``(n1, n2, c_in // g, c_out)`` (taps at p * d)."""
    kh, kw = kernel.shape[:2]
    n1, n2 = spec.input_shape
    d1, d2 = spec.kernel_dilation
    keff1, keff2 = spec.dilated_kernel_size(kernel.shape)
    config = [(0, n1 - keff1, d1 - 1), (0, n2 - keff2, d2 - 1), (0, 0, 0), (0, 0, 0)]
    return lax.pad(kernel, jnp.zeros((), kernel.dtype), config)


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

    Inverse ``rfft2`` of (possibly modified) per-frequency matrices, then the taps at the
    kernel's (dilated) support are kept: the orthogonal projection onto kernels of shape
    ``kernel_shape``. Exact inverse when ``matrices`` came from a kernel of that shape.
    """
    matrices = jnp.asarray(matrices)
    kh, kw, cig, cout = kernel_shape
    g = spec.feature_group_count
    cog = cout // g
    (s1, s2), (big1, big2) = spec.strides, _grid(spec)
    m = matrices.reshape(g, big1, big2 // 2 + 1, cog, cig, s1, s2).transpose(1, 5, 2, 6, 4, 0, 3)
    e = jnp.fft.irfft2(m, s=(big1, big2), axes=(0, 2))
    e = e.reshape(big1 * s1, big2 * s2, cig, cout)
    d1, d2 = spec.kernel_dilation
    return e[: (kh - 1) * d1 + 1 : d1, : (kw - 1) * d2 + 1 : d2]


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
    """The circular layer whose operator contains ``spec``'s zero-padded operator as a submatrix.

    With zero pads ``(lo, hi)`` and stride ``s`` per axis, place the input at offset ``lo`` of a
    circular grid of size ``N = ceil((n + lo + hi) / s) * s``: every read of the zero-padded
    conv stays inside the grid without wrapping, its outputs are rows ``0..H_out-1`` of the
    strided circulant, and its inputs are columns of it. Hence (exact statement)
    ``σ_max(zero-padded) <= σ_max(circulant)``: any circulant spectral-norm value or bound is an
    **upper bound** for the zero-padded layer, at any stride, dilation and group count. (The
    cyclic shift of Flax's ``'CIRCULAR'`` convention is a permutation and changes no singular
    value.) For a circular ``spec`` this returns ``spec`` itself.
    """
    if spec.is_circular:
        return spec
    pads = spec.pads(kernel_shape)
    size = tuple(
        -(-(n + lo + hi) // s) * s for n, (lo, hi), s in zip(spec.input_shape, pads, spec.strides)
    )
    return dataclasses.replace(spec, input_shape=size, padding="CIRCULAR")
