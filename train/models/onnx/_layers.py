"""ONNX layer operators (conv, transposed conv, pooling, resize) for the registry of ``_ops``.

Images are NCHW as in ONNX. ``Conv`` computes ``lax.conv_general_dilated`` with dimension
numbers ``('NCHW', 'HWIO', 'NCHW')`` and the kernel exactly as ``params`` stores it (HWIO), so that
:func:`train.find_convs` reads each conv's :class:`spectra.ConvSpec` from the trace.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from train.models.onnx._ops import axis_of
from train.models.onnx._ops import ints
from train.models.onnx._ops import register


def _spatial_attr(node, key: str, default: int, n: int) -> list[int]:
    value = node.attr(key)
    value = [default] * n if value is None or len(value) == 0 else [int(v) for v in value]
    if len(value) != n:
        raise node.error(f"{key}={value} must have {n} entries (one per spatial axis)")
    return value


def explicit_pads(node, in_sizes, keff, strides) -> list[tuple[int, int]]:
    """``(lo, hi)`` per spatial axis from ``auto_pad`` / ``pads`` (ONNX conv and pool rules)."""
    n = len(in_sizes)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s in zip(in_sizes, keff, strides):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad != "NOTSET":
        raise node.error(f"auto_pad={auto_pad!r}; expected NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    pads = _spatial_attr(node, "pads", 0, 2 * n)
    return [(pads[i], pads[i + n]) for i in range(n)]


@register("Conv", numpy=False)
def _conv(node, xp, x, w, b=None):
    n = x.ndim - 2
    if n not in (1, 2):
        raise node.error(f"only 1-D and 2-D convs are supported; got a {n}-D conv")
    if node.kernel_layout == "HWIO":
        kernel = w
    else:
        kernel = jnp.transpose(w if n == 2 else w[:, :, None, :], (2, 3, 1, 0))
    ksize = _spatial_attr(node, "kernel_shape", 0, n)
    if list(kernel.shape[2 - n : 2]) != ksize and node.attr("kernel_shape") is not None:
        raise node.error(f"kernel_shape={ksize} does not match the weight's {kernel.shape}")
    strides = _spatial_attr(node, "strides", 1, n)
    dilations = _spatial_attr(node, "dilations", 1, n)
    keff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[2 - n : 2], dilations)]
    pads = explicit_pads(node, x.shape[2:], keff, strides)
    if n == 1:
        x = x[:, :, None, :]
        strides, dilations, pads = [1, *strides], [1, *dilations], [(0, 0), *pads]
    y = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        tuple(strides),
        tuple(pads),
        rhs_dilation=tuple(dilations),
        dimension_numbers=("NCHW", "HWIO", "NCHW"),
        feature_group_count=node.attr("group", 1),
    )
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return (y[:, :, 0, :] if n == 1 else y,)


@register("ConvTranspose", numpy=False)
def _conv_transpose(node, xp, x, w, b=None):
    n = x.ndim - 2
    if n != 2:
        raise node.error(f"only 2-D transposed convs are supported; got a {n}-D one")
    groups = node.attr("group", 1)
    c_in, c_out_g, kh, kw = w.shape
    strides = _spatial_attr(node, "strides", 1, n)
    dilations = _spatial_attr(node, "dilations", 1, n)
    out_pad = _spatial_attr(node, "output_padding", 0, n)
    keff = [(k - 1) * d + 1 for k, d in zip((kh, kw), dilations)]
    auto_pad = node.attr("auto_pad", "NOTSET")
    output_shape = node.attr("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [size * s for size, s in zip(x.shape[2:], strides)]
        output_shape = list(output_shape)[-n:]
        pads = []
        for size, k, s, op, out in zip(x.shape[2:], keff, strides, out_pad, output_shape):
            total = s * (size - 1) + op + k - out
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
    else:
        pads = explicit_pads(node, x.shape[2:], keff, strides)
    # A forward conv with input dilation and the flipped, transposed kernel.
    kernel = w.reshape(groups, c_in // groups, c_out_g, kh, kw)
    kernel = jnp.transpose(kernel, (3, 4, 1, 0, 2)).reshape(kh, kw, c_in // groups, -1)
    kernel = kernel[::-1, ::-1]
    padding = [(k - 1 - lo, k - 1 - hi + op) for k, (lo, hi), op in zip(keff, pads, out_pad)]
    y = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        (1, 1),
        padding,
        lhs_dilation=tuple(strides),
        rhs_dilation=tuple(dilations),
        dimension_numbers=("NCHW", "HWIO", "NCHW"),
        feature_group_count=groups,
    )
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return (y,)


def _pool_geometry(node, x):
    """Window, strides, dilations and ``(lo, hi, ceil_extra)`` per spatial axis."""
    n = x.ndim - 2
    ksize = _spatial_attr(node, "kernel_shape", 1, n)
    strides = _spatial_attr(node, "strides", 1, n)
    dilations = _spatial_attr(node, "dilations", 1, n)
    keff = [(k - 1) * d + 1 for k, d in zip(ksize, dilations)]
    pads = explicit_pads(node, x.shape[2:], keff, strides)
    ceil_mode = node.attr("ceil_mode", 0)
    geometry = []
    for size, k, s, (lo, hi) in zip(x.shape[2:], keff, strides, pads):
        span = size + lo + hi - k
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + lo:  # No window may start in the end padding.
            out -= 1
        geometry.append((lo, hi, max((out - 1) * s + k - (size + lo + hi), 0)))
    return ksize, strides, dilations, geometry


def _reduce_window(x, init, fn, ksize, strides, dilations, padding):
    return lax.reduce_window(
        x,
        init,
        fn,
        (1, 1, *ksize),
        (1, 1, *strides),
        ((0, 0), (0, 0), *padding),
        window_dilation=(1, 1, *dilations),
    )


@register("MaxPool", numpy=False)
def _max_pool(node, xp, x):
    if node.num_outputs > 1:
        raise node.error("the Indices output is not supported")
    ksize, strides, dilations, geometry = _pool_geometry(node, x)
    # NumPy scalars: a jnp init value is staged under jax.linearize, where reduce_window then
    # loses its max monoid and cannot be differentiated.
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = np.array(-np.inf, x.dtype)
    else:
        init = np.array(jnp.iinfo(x.dtype).min, x.dtype)
    padding = [(lo, hi + extra) for lo, hi, extra in geometry]
    if any(d > 1 for d in dilations):
        # JAX has no VJP for a max reduce_window with window dilation: the maximum over the
        # window's strided slices of the padded input is the same function, and differentiable.
        padded = lax.pad(x, init, [(0, 0, 0), (0, 0, 0), *[(lo, hi, 0) for lo, hi in padding]])
        out_sizes = [
            (size + lo + hi - ((k - 1) * d + 1)) // s + 1
            for size, (lo, hi), k, d, s in zip(x.shape[2:], padding, ksize, dilations, strides)
        ]
        out = None
        for offset in np.ndindex(*ksize):
            start = [o * d for o, d in zip(offset, dilations)]
            limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out_sizes, strides)]
            window = lax.slice(
                padded, (0, 0, *start), (*x.shape[:2], *limit), (1, 1, *strides)
            )
            out = window if out is None else jnp.maximum(out, window)
        return (out,)
    return (_reduce_window(x, init, lax.max, ksize, strides, dilations, padding),)


@register("AveragePool", numpy=False)
def _average_pool(node, xp, x):
    ksize, strides, dilations, geometry = _pool_geometry(node, x)
    padding = [(lo, hi + extra) for lo, hi, extra in geometry]
    # A NumPy init value (as for MaxPool): a jnp one is staged under jit, where reduce_window then
    # loses its add monoid and has no transpose rule (jit(vjp) and linearize fail).
    zero = np.array(0, x.dtype)
    total = _reduce_window(x, zero, lax.add, ksize, strides, dilations, padding)
    # The divisor counts the input and, with count_include_pad, the explicit pads (never the
    # extra end padding of ceil_mode), as onnxruntime and PyTorch do. It depends on shapes only:
    # computed at trace time, a constant of the program.
    include = node.attr("count_include_pad", 0)
    ones = np.ones(x.shape[2:], np.float64)
    if include:
        ones = np.pad(ones, [(lo, hi) for lo, hi, _ in geometry], constant_values=1.0)
        count_padding = [(0, extra) for _, _, extra in geometry]
    else:
        count_padding = padding
    with jax.ensure_compile_time_eval():
        count = _reduce_window(
            jnp.asarray(ones[None, None], jnp.float32),
            np.array(0, np.float32),
            lax.add,
            ksize,
            strides,
            dilations,
            count_padding,
        )
    count = np.asarray(count).astype(x.dtype)
    return ((total / count).astype(x.dtype),)


@register("LRN", numpy=False)
def _lrn(node, xp, x):
    """Local response normalisation across channels (AlexNet, GoogLeNet):
    ``x / (bias + alpha / size * Σ_window x²) ** beta``, the window ``size`` channels wide
    (``(size - 1) // 2`` before the channel, the rest after, clipped at the edges)."""
    size = node.attr("size")
    if size is None or size < 1:
        raise node.error(f"size={size!r} must be a positive int")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    lo = (size - 1) // 2
    window = (1, size) + (1,) * (x.ndim - 2)
    padding = ((0, 0), (lo, size - 1 - lo)) + ((0, 0),) * (x.ndim - 2)
    # A NumPy init value: see _average_pool.
    square_sum = lax.reduce_window(
        jnp.square(x), np.array(0, x.dtype), lax.add, window, (1,) * x.ndim, padding
    )
    scale = (np.asarray(bias, x.dtype) + np.asarray(alpha / size, x.dtype) * square_sum) ** beta
    return ((x / scale).astype(x.dtype),)


@register("GlobalAveragePool")
def _global_average_pool(node, xp, x):
    return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype),)


@register("GlobalMaxPool")
def _global_max_pool(node, xp, x):
    return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


# -------------------------------------------------------------------------------------- resize
_COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
)


def _source_coordinates(mode: str, n_in: int, n_out: int, scale: float) -> np.ndarray:
    """Input coordinate of every output position, in float32 as onnxruntime computes it."""
    f32 = np.float32
    x = np.arange(n_out, dtype=f32)
    scale = f32(scale)
    if mode == "half_pixel":
        return (x + f32(0.5)) / scale - f32(0.5)
    if mode == "half_pixel_symmetric":
        adjustment = f32(n_out) / (scale * f32(n_in))
        offset = f32(n_in) / f32(2) * (f32(1) - adjustment)
        return offset + (x + f32(0.5)) / scale - f32(0.5)
    if mode == "pytorch_half_pixel":
        return (x + f32(0.5)) / scale - f32(0.5) if n_out > 1 else np.zeros(n_out, f32)
    if mode == "align_corners":
        if n_out == 1:
            return np.zeros(1, f32)
        return x * f32(n_in - 1) / f32(n_out - 1)
    if mode == "asymmetric":
        return x / scale
    return (x + f32(0.5)) / scale  # tf_half_pixel_for_nn


def _nearest_index(coords: np.ndarray, nearest_mode: str, node) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        frac = coords - np.floor(coords)
        index = np.where(frac == 0.5, np.floor(coords), np.round(coords))
    elif nearest_mode == "round_prefer_ceil":
        index = np.floor(coords + 0.5)
    elif nearest_mode == "floor":
        index = np.floor(coords)
    elif nearest_mode == "ceil":
        index = np.ceil(coords)
    else:
        raise node.error(f"nearest_mode={nearest_mode!r} is not supported")
    return index.astype(np.int64)


def resize(node, x, scales, sizes, mode, coordinate_mode, nearest_mode, axes=None):
    """Nearest or linear resize of ``x`` (separable, one gather per resized axis)."""
    if mode not in ("nearest", "linear"):
        raise node.error(f"mode={mode!r}; only 'nearest' and 'linear' are supported")
    if coordinate_mode not in _COORDINATE_MODES:
        raise node.error(
            f"coordinate_transformation_mode={coordinate_mode!r}; expected one of "
            f"{_COORDINATE_MODES}"
        )
    if node.attr("antialias", 0):
        raise node.error("antialias=1 is not supported")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise node.error("only keep_aspect_ratio_policy='stretch' is supported")
    axes = list(range(x.ndim)) if axes is None else [axis_of(node, a, x.ndim) for a in axes]
    if sizes is not None and np.size(sizes):
        sizes = ints(sizes)
        pairs = [(a, size / x.shape[a], size) for a, size in zip(axes, sizes)]
    else:
        factors = [float(v) for v in np.asarray(scales, np.float32).reshape(-1)]
        if len(factors) != len(axes):
            raise node.error(f"scales={factors} must have {len(axes)} entries")
        pairs = [(a, f, int(math.floor(x.shape[a] * f))) for a, f in zip(axes, factors)]
    out = x
    for a, scale, n_out in pairs:
        n_in = x.shape[a]
        if n_out == n_in and scale == 1.0:
            continue
        coords = _source_coordinates(coordinate_mode, n_in, n_out, scale)
        if mode == "nearest":
            index = np.clip(_nearest_index(coords, nearest_mode, node), 0, n_in - 1)
            out = jnp.take(out, jnp.asarray(index, jnp.int32), axis=a)
            continue
        coords = np.clip(coords, 0, n_in - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        weight = (coords - lo).astype(np.float32)
        shape = [1] * x.ndim
        shape[a] = n_out
        weight = jnp.asarray(weight.reshape(shape), out.dtype)
        lo_values = jnp.take(out, jnp.asarray(lo, jnp.int32), axis=a)
        hi_values = jnp.take(out, jnp.asarray(hi, jnp.int32), axis=a)
        out = lo_values + (hi_values - lo_values) * weight
    return out


@register("Resize", static=lambda opset: (1,) if opset < 11 else (1, 2, 3), numpy=False)
def _resize(node, xp, x, *args):
    if node.opset < 11:  # Opset 10: (X, scales), asymmetric coordinates.
        scales, sizes, coordinate_mode = args[0], None, "asymmetric"
        nearest_mode = "floor"
    else:
        scales = args[1] if len(args) > 1 else None
        sizes = args[2] if len(args) > 2 else None
        coordinate_mode = node.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
    if coordinate_mode == "tf_crop_and_resize":
        raise node.error("coordinate_transformation_mode='tf_crop_and_resize' is not supported")
    mode = node.attr("mode", "nearest")
    return (resize(node, x, scales, sizes, mode, coordinate_mode, nearest_mode, node.attr("axes")),)


@register("Upsample", static=(1,), numpy=False)
def _upsample(node, xp, x, scales=None):
    if node.opset < 9:
        scales = np.asarray(node.attr("scales"), np.float32)
    mode = node.attr("mode", "nearest")
    mode = "linear" if mode in ("linear", "bilinear") else mode
    return (resize(node, x, scales, None, mode, "asymmetric", "floor"),)
