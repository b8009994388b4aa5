"""ONNX tensor-manipulation operators (shapes, indexing, padding) for the registry of ``_ops``."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from train.models.onnx._ops import axis_of
from train.models.onnx._ops import dtype_for
from train.models.onnx._ops import ints
from train.models.onnx._ops import is_jax
from train.models.onnx._ops import register


@register("Shape")
def _shape(node, xp, x):
    rank = len(x.shape)
    start = node.attr("start", 0)
    end = node.attr("end", rank)
    return (np.asarray(x.shape[slice(start, end)], np.int64),)


@register("Size")
def _size(node, xp, x):
    return (np.asarray(math.prod(x.shape), np.int64),)


def constant_value(node) -> np.ndarray:
    """The value of a ``Constant`` node (or a ``ConstantOfShape``'s ``value``)."""
    attrs = node.attrs
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in [("value_float", np.float32), ("value_int", np.int64)]:
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    for key, dtype in [("value_floats", np.float32), ("value_ints", np.int64)]:
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype)
    if "value_string" in attrs or "value_strings" in attrs:
        raise node.error("string constants are not supported")
    raise node.error(f"sparse or missing value ({sorted(attrs)}) is not supported")


@register("Constant")
def _constant(node, xp):
    return (constant_value(node),)


@register("ConstantOfShape", static=(0,))
def _constant_of_shape(node, xp, shape):
    value = node.attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
    return (np.full(tuple(ints(shape)), value.reshape(-1)[0], value.dtype),)


@register("Range", static=(0, 1, 2))
def _range(node, xp, start, limit, delta):
    return (np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype),)


@register("Reshape", static=(1,))
def _reshape(node, xp, x, shape):
    target = ints(shape)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return (x.reshape(target),)


@register("Flatten")
def _flatten(node, xp, x):
    axis = node.attr("axis", 1)
    axis = axis % x.ndim if axis != x.ndim else axis
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


@register("Transpose")
def _transpose(node, xp, x):
    perm = node.attr("perm")
    return (xp.transpose(x, None if perm is None else tuple(perm)),)


def _axes(node, x_rank: int, axes_input, attr_until: int):
    return (
        node.attr("axes")
        if node.opset < attr_until
        else (None if axes_input is None else ints(axes_input))
    )


@register("Squeeze", static=(1,))
def _squeeze(node, xp, x, axes=None):
    axes = _axes(node, x.ndim, axes, 13)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = tuple(axis_of(node, a, x.ndim) for a in axes)
    if any(x.shape[a] != 1 for a in axes):
        raise node.error(f"cannot squeeze axes {axes} of shape {x.shape}")
    return (xp.squeeze(x, axis=axes),)


@register("Unsqueeze", static=(1,))
def _unsqueeze(node, xp, x, axes=None):
    axes = _axes(node, x.ndim, axes, 13)
    rank = x.ndim + len(axes)
    out = x
    for a in sorted(axis_of(node, a, rank) for a in axes):
        out = xp.expand_dims(out, a)
    return (out,)


@register("Concat")
def _concat(node, xp, *xs):
    xs = [x for x in xs if x is not None]
    axis = axis_of(node, node.attr("axis"), xs[0].ndim)
    if is_jax(xp):
        dtype = xp.result_type(*xs)
        xs = [xp.asarray(x, dtype) for x in xs]
    return (xp.concatenate(xs, axis=axis),)


@register("Split", static=(1,))
def _split(node, xp, x, split=None):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    if node.opset < 13:
        split = node.attr("split")
    n = x.shape[axis]
    if split is None:
        parts = node.attr("num_outputs", node.num_outputs)
        size = -(-n // parts)
        sizes = [size] * (parts - 1) + [n - size * (parts - 1)]
    else:
        sizes = ints(split)
    if sum(sizes) != n or len(sizes) != node.num_outputs:
        raise node.error(
            f"split sizes {sizes} do not split dimension {n} into {node.num_outputs} outputs"
        )
    bounds = np.cumsum(sizes)[:-1].tolist()
    return tuple(xp.split(x, bounds, axis=axis))


@register("Slice", static=(1, 2, 3, 4))
def _slice(node, xp, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
        steps = None
    starts, ends = ints(starts), ints(ends)
    axes = list(range(len(starts))) if axes is None else ints(axes)
    steps = [1] * len(starts) if steps is None else ints(steps)
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            raise node.error("Slice steps must be non-zero")
        # Python slices clamp out-of-range bounds exactly as ONNX does.
        index[axis_of(node, a, x.ndim)] = slice(s, e, st)
    return (x[tuple(index)],)


def _normalise_indices(indices, n: int, xp):
    if isinstance(indices, np.ndarray):
        return np.where(indices < 0, indices + n, indices)
    return xp.where(indices < 0, indices + n, indices)


@register("Gather")
def _gather(node, xp, x, indices):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    indices = _normalise_indices(indices, x.shape[axis], xp)
    if is_jax(xp):
        return (xp.take(x, indices, axis=axis, mode="clip"),)
    return (np.take(x, indices, axis=axis),)


@register("GatherElements")
def _gather_elements(node, xp, x, indices):
    axis = axis_of(node, node.attr("axis", 0), x.ndim)
    indices = _normalise_indices(indices, x.shape[axis], xp)
    return (xp.take_along_axis(x, indices, axis=axis),)


@register("Expand", static=(1,))
def _expand(node, xp, x, shape):
    target = np.broadcast_shapes(tuple(x.shape), tuple(ints(shape)))
    return (xp.broadcast_to(x, target),)


@register("Tile", static=(1,))
def _tile(node, xp, x, repeats):
    return (xp.tile(x, tuple(ints(repeats))),)


@register("EyeLike")
def _eye_like(node, xp, x):
    dtype = node.attr("dtype")
    dtype = x.dtype if dtype is None else onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return (xp.eye(*x.shape, k=node.attr("k", 0), dtype=dtype_for(xp, dtype)),)


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@register("Pad", static=(1, 2, 3))
def _pad(node, xp, x, pads=None, value=None, axes=None):
    mode = node.attr("mode", "constant")
    if mode not in PAD_MODES:
        raise node.error(f"mode={mode!r}; expected one of {sorted(PAD_MODES)}")
    if node.opset < 11:
        pads, value = node.attr("pads"), node.attr("value", 0.0)
    pads = ints(pads)
    axes = list(range(x.ndim)) if axes is None else [axis_of(node, a, x.ndim) for a in ints(axes)]
    if len(pads) != 2 * len(axes):
        raise node.error(f"pads={pads} must have 2 * {len(axes)} entries")
    widths = [[0, 0] for _ in range(x.ndim)]
    for i, a in enumerate(axes):
        widths[a] = [pads[i], pads[i + len(axes)]]
    # Negative pads crop.
    crop = tuple(slice(-min(lo, 0), x.shape[a] + min(hi, 0)) for a, (lo, hi) in enumerate(widths))
    x = x[crop]
    widths = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
    if mode == "constant":
        fill = 0 if value is None or np.size(value) == 0 else np.asarray(value).reshape(-1)[0]
        return (xp.pad(x, widths, mode="constant", constant_values=np.asarray(fill, x.dtype)),)
    return (xp.pad(x, widths, mode=PAD_MODES[mode]),)


@register("NonZero")
def _nonzero(node, xp, x):
    if is_jax(xp):
        raise node.error(
            "NonZero of a value computed from the graph inputs has a data-dependent "
            "shape; only constant inputs are supported"
        )
    return (np.stack(np.nonzero(x)).astype(np.int64),)
