"""ONNX operators as JAX functions: the registry ``op_type -> Op``.

Every operator is a function ``fn(node, xp, *inputs) -> tuple of outputs`` where ``node`` is the
:class:`NodeInfo` (attributes, opset, name, number of outputs), ``xp`` is ``numpy`` (constant
folding at import) or ``jax.numpy`` (the traced model) and ``inputs`` are arrays, ``None`` for a
missing optional input. Inputs listed in ``Op.static`` are always NumPy arrays: they fix shapes
(a ``Reshape`` target, ``Slice`` bounds, ``Resize`` scales) and must be known at import.
Layers (conv, pooling, resize) live in :mod:`train.models.onnx._layers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax import lax


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What an operator implementation sees of its node."""

    op_type: str
    name: str
    opset: int
    attrs: dict[str, Any]
    num_outputs: int
    #: For ``Conv``: ``'HWIO'`` when input 1 is the kernel as stored in ``params`` (HWIO, with
    #: ``H = 1`` for a 1-D conv), ``'ONNX'`` when it is the ONNX ``(O, I, *k)`` tensor.
    kernel_layout: str = "ONNX"

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def error(self, message: str) -> ValueError:
        return ValueError(
            f"ONNX node {self.name!r} ({self.op_type}, opset {self.opset}): {message}"
        )


@dataclasses.dataclass(frozen=True)
class Op:
    """One supported operator.

    Attributes:
      fn: ``fn(node, xp, *inputs) -> tuple`` of outputs.
      static: indices of the inputs that must be constant at import, as a function of the opset.
      numpy: whether ``fn`` runs with ``xp=numpy`` (else constant folding runs it in JAX).
    """

    fn: Callable[..., tuple]
    static: Callable[[int], tuple[int, ...]]
    numpy: bool = True


OPS: dict[str, Op] = {}


def register(*op_types: str, static: Any = (), numpy: bool = True):
    """Registers ``fn`` for ``op_types``; ``static`` is a tuple or ``opset -> tuple``."""
    static_fn = static if callable(static) else (lambda opset, s=tuple(static): s)

    def wrap(fn):
        for op_type in op_types:
            OPS[op_type] = Op(fn, static_fn, numpy)
        return fn

    return wrap


def is_jax(xp) -> bool:
    return xp is jnp


def dtype_for(xp, dtype) -> np.dtype:
    """``dtype`` as ``xp`` stores it (JAX without x64 keeps 64-bit types as 32-bit ones)."""
    return jax.dtypes.canonicalize_dtype(dtype) if is_jax(xp) else np.dtype(dtype)


def ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


def axis_of(node: NodeInfo, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise node.error(f"axis={axis} is out of range for rank {rank}")
    return axis % rank


# -------------------------------------------------------------------------------- elementwise
def _unary(fn_np, fn_jnp=None):
    def fn(node, xp, x):
        return ((fn_jnp or fn_np)(x) if is_jax(xp) else fn_np(x),)

    return fn


def _sigmoid_np(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


for _name, _np_fn, _jnp_fn in [
    ("Relu", lambda x: np.maximum(x, np.zeros((), x.dtype)), jax.nn.relu),
    ("Sigmoid", _sigmoid_np, jax.nn.sigmoid),
    ("Tanh", np.tanh, jnp.tanh),
    ("Sqrt", np.sqrt, jnp.sqrt),
    ("Exp", np.exp, jnp.exp),
    ("Log", np.log, jnp.log),
    ("Neg", np.negative, jnp.negative),
    ("Abs", np.abs, jnp.abs),
    ("Floor", np.floor, jnp.floor),
    ("Ceil", np.ceil, jnp.ceil),
    ("Reciprocal", np.reciprocal, jnp.reciprocal),
    ("Not", np.logical_not, jnp.logical_not),
    ("Sign", np.sign, jnp.sign),
    ("Softplus", lambda x: np.logaddexp(x, 0).astype(x.dtype), jax.nn.softplus),
]:
    register(_name)(_unary(_np_fn, _jnp_fn))


@register("Identity")
def _identity(node, xp, x):
    return (x,)


@register("Dropout")
def _dropout(node, xp, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(np.asarray(training_mode)):
        raise node.error("training_mode=True is not supported (inference only)")
    if node.attr("is_test", 1) == 0 and node.opset < 7:
        raise node.error("is_test=0 is not supported (inference only)")
    return (x, xp.ones(x.shape, bool))[: node.num_outputs]


@register("Erf", numpy=False)
def _erf(node, xp, x):
    return (jax.scipy.special.erf(x),)


@register("Gelu", numpy=False)
def _gelu(node, xp, x):
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.error(f"approximate={approximate!r}; expected 'none' or 'tanh'")
    return (jax.nn.gelu(x, approximate=approximate == "tanh"),)


@register("LeakyRelu")
def _leaky_relu(node, xp, x):
    alpha = node.attr("alpha", 0.01)
    return (xp.where(x >= 0, x, (x * alpha).astype(x.dtype)),)


@register("PRelu")
def _prelu(node, xp, x, slope):
    return (xp.where(x >= 0, x, x * slope),)


@register("Elu")
def _elu(node, xp, x):
    alpha = node.attr("alpha", 1.0)
    return (xp.where(x > 0, x, (alpha * (xp.exp(xp.minimum(x, 0)) - 1)).astype(x.dtype)),)


@register("HardSigmoid")
def _hard_sigmoid(node, xp, x):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return (xp.clip(x * alpha + beta, 0, 1).astype(x.dtype),)


@register("HardSwish")
def _hard_swish(node, xp, x):
    return ((x * xp.clip(x / 6 + 0.5, 0, 1)).astype(x.dtype),)


def _int_div(xp, a, b):
    """C-style integer division (truncation toward zero), as ONNX Div on integers."""
    q = a // b
    return xp.where((a % b != 0) & ((a < 0) != (b < 0)), q + 1, q)


def _binary(fn):
    def op(node, xp, a, b):
        return (fn(xp, a, b),)

    return op


register("Add")(_binary(lambda xp, a, b: a + b))
register("Sub")(_binary(lambda xp, a, b: a - b))
register("Mul")(_binary(lambda xp, a, b: a * b))
register("Div")(
    _binary(lambda xp, a, b: _int_div(xp, a, b) if np.issubdtype(a.dtype, np.integer) else a / b)
)
register("Equal")(_binary(lambda xp, a, b: a == b))
register("Less")(_binary(lambda xp, a, b: a < b))
register("LessOrEqual")(_binary(lambda xp, a, b: a <= b))
register("Greater")(_binary(lambda xp, a, b: a > b))
register("GreaterOrEqual")(_binary(lambda xp, a, b: a >= b))
register("And")(_binary(lambda xp, a, b: xp.logical_and(a, b)))
register("Or")(_binary(lambda xp, a, b: xp.logical_or(a, b)))


@register("Pow")
def _pow(node, xp, a, b):
    return (xp.power(a, b.astype(a.dtype)).astype(a.dtype),)


@register("Mod")
def _mod(node, xp, a, b):
    return ((xp.fmod(a, b) if node.attr("fmod", 0) else xp.mod(a, b)),)


def _variadic(fn_name):
    def op(node, xp, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = getattr(xp, fn_name)(out, x)
        return (out,)

    return op


register("Max")(_variadic("maximum"))
register("Min")(_variadic("minimum"))
register("Sum")(_variadic("add"))


@register("Mean")
def _mean(node, xp, *xs):
    return ((_variadic("add")(node, xp, *xs)[0] / len(xs)).astype(xs[0].dtype),)


@register("Where")
def _where(node, xp, cond, a, b):
    return (xp.where(cond, a, b),)


@register("Clip", static=lambda opset: ())
def _clip(node, xp, x, lo=None, hi=None):
    if node.opset < 11:
        lo, hi = node.attr("min", -np.inf), node.attr("max", np.inf)
    out = x
    if lo is not None:
        out = xp.maximum(out, xp.asarray(lo, dtype=x.dtype))
    if hi is not None:
        out = xp.minimum(out, xp.asarray(hi, dtype=x.dtype))
    return (out,)


@register("Cast")
def _cast(node, xp, x):
    return (x.astype(dtype_for(xp, onnx.helper.tensor_dtype_to_np_dtype(node.attr("to")))),)


@register("CastLike")
def _cast_like(node, xp, x, like):
    return (x.astype(like.dtype),)


# ------------------------------------------------------------------------------ normalisation
def _softmax_axis(node, xp, x, fn):
    axis = node.attr("axis", -1 if node.opset >= 13 else 1)
    axis = axis_of(node, axis, x.ndim)
    if node.opset >= 13:
        return (fn(x, axis=axis),)
    shape = x.shape  # opset < 13: softmax of the input coerced to 2-D at `axis`.
    flat = x.reshape(math.prod(shape[:axis]), -1)
    return (fn(flat, axis=1).reshape(shape),)


@register("Softmax", numpy=False)
def _softmax(node, xp, x):
    return _softmax_axis(node, xp, x, jax.nn.softmax)


@register("LogSoftmax", numpy=False)
def _log_softmax(node, xp, x):
    return _softmax_axis(node, xp, x, jax.nn.log_softmax)


@register("BatchNormalization")
def _batch_norm(node, xp, x, scale, bias, mean, var, *rest):
    if node.attr("training_mode", 0) or node.num_outputs > 1:
        raise node.error("training mode (running statistics as outputs) is not supported")
    eps = node.attr("epsilon", 1e-5)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale / xp.sqrt(var + np.asarray(eps, var.dtype))
    out = (x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape)
    return (out.astype(x.dtype),)


@register("InstanceNormalization")
def _instance_norm(node, xp, x, scale, bias):
    eps = node.attr("epsilon", 1e-5)
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - mean) / xp.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return (out.astype(x.dtype),)


@register("LayerNormalization")
def _layer_norm(node, xp, x, scale, bias=None):
    if node.num_outputs > 1:
        raise node.error("the Mean / InvStdDev outputs are not supported")
    axis = axis_of(node, node.attr("axis", -1), x.ndim)
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / xp.sqrt(var + node.attr("epsilon", 1e-5)) * scale
    if bias is not None:
        out = out + bias
    return (out.astype(x.dtype),)


# ---------------------------------------------------------------------------------- linear
@register("Gemm")
def _gemm(node, xp, a, b, c=None):
    if node.attr("transA", 0):
        a = a.T
    if node.attr("transB", 0):
        b = b.T
    out = node.attr("alpha", 1.0) * (a @ b)
    if c is not None:
        out = out + node.attr("beta", 1.0) * c
    return (out.astype(a.dtype),)


@register("MatMul")
def _matmul(node, xp, a, b):
    return (xp.matmul(a, b),)


# ------------------------------------------------------------------------------- reductions
def _reduce_axes(node, x, axes_input, input_from: int):
    if node.opset >= input_from:
        axes = None if axes_input is None else ints(axes_input)
    else:
        axes = node.attr("axes")
    if axes is None or len(axes) == 0:
        if node.attr("noop_with_empty_axes", 0) and node.opset >= input_from:
            return ()
        return tuple(range(x.ndim))
    return tuple(sorted(axis_of(node, int(a), x.ndim) for a in axes))


def _reduction(method: str, input_from: int):
    def op(node, xp, x, axes=None):
        axes = _reduce_axes(node, x, axes, input_from)
        if not axes:
            return (x,)
        keep = bool(node.attr("keepdims", 1))
        return (getattr(xp, method)(x, axis=axes, keepdims=keep).astype(x.dtype),)

    return op


register("ReduceMean", static=(1,))(_reduction("mean", 18))
register("ReduceMax", static=(1,))(_reduction("max", 18))
register("ReduceMin", static=(1,))(_reduction("min", 18))
register("ReduceProd", static=(1,))(_reduction("prod", 18))
register("ReduceSum", static=(1,))(_reduction("sum", 13))


def _arg_reduce(method: str):
    def op(node, xp, x):
        axis = axis_of(node, node.attr("axis", 0), x.ndim)
        if node.attr("select_last_index", 0):
            flipped = xp.flip(x, axis)
            out = x.shape[axis] - 1 - getattr(xp, method)(flipped, axis=axis)
        else:
            out = getattr(xp, method)(x, axis=axis)
        if node.attr("keepdims", 1):
            out = xp.expand_dims(out, axis)
        return (out.astype(dtype_for(xp, np.int64)),)

    return op


register("ArgMax")(_arg_reduce("argmax"))
register("ArgMin")(_arg_reduce("argmin"))


@register("TopK", static=(1,), numpy=False)
def _topk(node, xp, x, k):
    k = ints(k)[0]
    axis = axis_of(node, node.attr("axis", -1), x.ndim)
    if not node.attr("largest", 1) or not node.attr("sorted", 1):
        raise node.error("only largest=1, sorted=1 is supported")
    moved = jnp.moveaxis(x, axis, -1)
    values, indices = lax.top_k(moved, k)
    return (
        jnp.moveaxis(values, -1, axis),
        jnp.moveaxis(indices, -1, axis).astype(dtype_for(xp, np.int64)),
    )
