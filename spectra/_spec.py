"""`ConvSpec`: the static description of the linear operator of one conv layer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

PaddingLike = str | Sequence[Sequence[int]]

PADDING_MODES = ("CIRCULAR", "SAME", "VALID", "FULL")


Pads = tuple[tuple[int, int], tuple[int, int]]


def normalize_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a length-2 sequence of ints as a tuple of two positive ints.

    The form of ``strides``, ``kernel_dilation``, ``kernel_size`` and ``input_shape`` everywhere
    in ``spectra`` and its layers: ``2 -> (2, 2)``, ``[3, 1] -> (3, 1)``.

    Args:
      value: an int or a sequence of two ints.
      name: the argument's name, for the error message.

    Raises:
      ValueError: naming ``name`` when ``value`` is not an int or a pair of ints, or not
        positive.

    >>> normalize_pair(2, "strides"), normalize_pair([3, 1], "kernel_size")
    ((2, 2), (3, 1))
    """
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        pair = tuple(int(v) for v in value)
    except TypeError as e:
        raise ValueError(f"{name}={value!r} must be an int or a pair of ints") from e
    if len(pair) != 2 or any(v != w for v, w in zip(pair, value)):
        raise ValueError(f"{name}={value!r} must be an int or a pair of ints")
    if any(v < 1 for v in pair):
        raise ValueError(f"{name}={value!r} must be positive")
    return pair  # type: ignore[return-value]


def normalize_padding(padding: Any, modes: Sequence[str] = PADDING_MODES) -> str | Pads:
    """The canonical form of a 2-D conv padding: an upper-case mode or ``((lo, hi), (lo, hi))``.

    Accepts every form ``flax.nnx.Conv`` takes for a 2-D conv: a mode name (any case) among
    ``modes``, an int ``p`` (``((p, p), (p, p))``), a pair of ints ``(p, q)``
    (``((p, p), (q, q))``) or explicit zero padding ``((lo, hi), (lo, hi))`` of non-negative
    ints. The one padding normaliser of ``spectra`` (:class:`ConvSpec`) and ``train.layers``.

    Args:
      padding: the padding.
      modes: the mode names accepted (default :data:`PADDING_MODES`; a layer passes its own,
        e.g. with ``'REFLECT'``).

    Returns:
      The upper-case mode name, or the explicit pads as a tuple of two ``(lo, hi)`` tuples.

    Raises:
      ValueError: naming ``padding`` and the accepted forms.

    >>> normalize_padding("same"), normalize_padding(1), normalize_padding([[1, 0], (2, 2)])
    ('SAME', ((1, 1), (1, 1)), ((1, 0), (2, 2)))
    """
    expected = (
        f"expected one of {tuple(modes)}, an int, a pair of ints or explicit zero padding "
        "((lo, hi), (lo, hi)) of non-negative ints"
    )
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in modes:
            raise ValueError(f"padding={padding!r} is not supported; {expected}")
        return mode
    if isinstance(padding, (int, np.integer)):
        padding = ((padding, padding), (padding, padding))
    try:
        items = list(padding)
        if len(items) == 2 and all(isinstance(p, (int, np.integer)) for p in items):
            items = [(p, p) for p in items]
        pads = tuple(tuple(int(v) for v in pair) for pair in items)
    except TypeError as e:
        raise ValueError(f"padding={padding!r} is not supported; {expected}") from e
    if len(pads) != 2 or any(len(p) != 2 for p in pads) or any(v < 0 for p in pads for v in p):
        raise ValueError(f"padding={padding!r} is not supported; {expected}")
    return pads  # type: ignore[return-value]


def is_concrete(x) -> bool:
    """True when `x` holds values on the host side (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Static, hashable description of the linear operator of one 2-D conv layer.

    The operator maps an input of shape ``(H, W, c_in)`` to an output of shape
    ``(H_out, W_out, c_out)`` exactly as ``lax.conv_general_dilated`` (cross-correlation) does
    with an HWIO kernel ``(kh, kw, c_in // feature_group_count, c_out)``; the names are the ones
    ``flax.nnx.Conv`` uses.

    Attributes:
      input_shape: spatial input size ``(H, W)``.
      strides: ``(sh, sw)``; an int means the same stride on both axes.
      padding: ``'CIRCULAR'`` (wrap-around, as ``flax.nnx.Conv``: pads ``((k-1)//2, k//2)``
        with ``mode='wrap'`` then a VALID conv), ``'SAME'``, ``'VALID'``, ``'FULL'`` (zero pads of
        ``k_eff - 1`` on each side), or explicit zero padding ``((lo, hi), (lo, hi))`` (also as
        ``nnx.Conv``'s int ``p`` or pair ``(p, q)``); see :func:`normalize_padding`.
      kernel_dilation: ``(dh, dw)``; the effective kernel size is ``(k - 1) * d + 1``.
      feature_group_count: number of groups (``c_in`` for a depthwise conv).
      in_features: optional ``c_in``; when given, kernels are checked against it.
    """

    input_shape: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: PaddingLike = "SAME"
    kernel_dilation: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    in_features: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "input_shape", normalize_pair(self.input_shape, "input_shape"))
        object.__setattr__(self, "strides", normalize_pair(self.strides, "strides"))
        object.__setattr__(
            self, "kernel_dilation", normalize_pair(self.kernel_dilation, "kernel_dilation"))
        object.__setattr__(self, "padding", normalize_padding(self.padding))
        groups = self.feature_group_count
        if not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"feature_group_count={groups!r} must be a positive int")
        object.__setattr__(self, "feature_group_count", int(groups))
        if self.in_features is not None:
            if int(self.in_features) < 1 or self.in_features % groups:
                raise ValueError(
                    f"in_features={self.in_features!r} must be a positive multiple of "
                    f"feature_group_count={groups}"
                )
            object.__setattr__(self, "in_features", int(self.in_features))

    @property
    def is_circular(self) -> bool:
        return self.padding == "CIRCULAR"

    def dilated_kernel_size(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        """Effective spatial size ``(k - 1) * d + 1`` of a kernel of shape ``kernel_shape``."""
        return tuple(  # type: ignore[return-value]
            (k - 1) * d + 1 for k, d in zip(kernel_shape[:2], self.kernel_dilation)
        )

    def pads(self, kernel_shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Padding ``((lo, hi), (lo, hi))`` applied before a VALID conv.

        Zero padding for every mode except ``'CIRCULAR'``, where it is the wrap-around padding.
        """
        keff = self.dilated_kernel_size(kernel_shape)
        if self.is_circular:
            return tuple(((k - 1) // 2, k // 2) for k in keff)  # type: ignore[return-value]
        if self.padding == "FULL":
            return tuple((k - 1, k - 1) for k in keff)  # type: ignore[return-value]
        if isinstance(self.padding, str):
            return tuple(  # type: ignore[return-value]
                tuple(p) for p in lax.padtype_to_pads(
                    self.input_shape, keff, self.strides, self.padding)
            )
        return self.padding  # type: ignore[return-value]

    def output_shape(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        """Spatial output size ``(H_out, W_out)``."""
        keff = self.dilated_kernel_size(kernel_shape)
        return tuple(  # type: ignore[return-value]
            (n + lo + hi - k) // s + 1
            for n, (lo, hi), k, s in zip(
                self.input_shape, self.pads(kernel_shape), keff, self.strides)
        )

    def channels(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        """``(c_in, c_out)`` of the operator for an HWIO kernel of shape ``kernel_shape``."""
        return kernel_shape[2] * self.feature_group_count, kernel_shape[3]

    def in_dim(self, kernel_shape: Sequence[int]) -> int:
        return math.prod(self.input_shape) * self.channels(kernel_shape)[0]

    def out_dim(self, kernel_shape: Sequence[int]) -> int:
        return math.prod(self.output_shape(kernel_shape)) * self.channels(kernel_shape)[1]

    def num_singular_values(self, kernel_shape: Sequence[int]) -> int:
        """``min(in_dim, out_dim)``: the length of the full spectrum (with multiplicity)."""
        return min(self.in_dim(kernel_shape), self.out_dim(kernel_shape))

    def validate(self, kernel, *, batch_dims: int = 0) -> tuple[int, int, int, int]:
        """Checks an HWIO kernel against this spec; returns its (unbatched) shape.

        Raises:
          ValueError: naming ``kernel`` (wrong rank, channels not matching the spec or the group
            count, NaN/inf values when the kernel is concrete) or ``input_shape`` (smaller than
            the dilated kernel).
        """
        shape = tuple(np.shape(kernel))
        if len(shape) != 4 + batch_dims:
            raise ValueError(
                f"kernel must be 4-D HWIO (kh, kw, c_in // groups, c_out)"
                f"{' with ' + str(batch_dims) + ' leading batch dims' if batch_dims else ''}; "
                f"got shape {shape}"
            )
        kshape = shape[batch_dims:]
        kh, kw, cig, cout = kshape
        if min(kshape) < 1:
            raise ValueError(f"kernel has an empty dimension: shape {kshape}")
        groups = self.feature_group_count
        if cout % groups:
            raise ValueError(
                f"kernel has c_out={cout}, which feature_group_count={groups} does not divide"
            )
        if self.in_features is not None and cig * groups != self.in_features:
            raise ValueError(
                f"kernel has c_in // groups={cig}, but the spec says in_features="
                f"{self.in_features} with feature_group_count={groups} (expected "
                f"{self.in_features // groups})"
            )
        keff = self.dilated_kernel_size(kshape)
        padded = [n + lo + hi for n, (lo, hi) in zip(self.input_shape, self.pads(kshape))]
        if any(n < k for n, k in zip(padded, keff)):
            raise ValueError(
                f"input_shape={self.input_shape} padded by {self.pads(kshape)} is smaller than "
                f"the dilated kernel {keff} (kernel {kshape[:2]}, "
                f"kernel_dilation={self.kernel_dilation})"
            )
        if any(o < 1 for o in self.output_shape(kshape)):
            raise ValueError(
                f"input_shape={self.input_shape} with padding={self.padding} gives an empty output"
            )
        if is_concrete(kernel) and not np.all(np.isfinite(np.asarray(kernel))):
            raise ValueError("kernel contains NaN or inf values")
        return kshape  # type: ignore[return-value]
