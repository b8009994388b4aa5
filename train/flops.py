"""Parameter and multiply-accumulate (MAC) counts of a model, read from its traced jaxpr.

:func:`count_flops` traces one forward pass with :func:`jax.make_jaxpr` and sums the
multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` it finds, nested
jaxprs included (``jit``, ``custom_jvp``/``custom_vjp``, ``checkpoint``, ``cond``, ``scan``).
Nothing is inferred from layer names or classes, so any model that lowers its linear maps to
these two primitives is covered (``nnx.Conv``, ``nnx.Linear``, ``nnx.Einsum``, the SVD and TT
layers of :mod:`train.layers`, plain ``jnp`` functions).

Convention (that of the FLOPs formulas of Yang et al. 2020, reference notes §3): the numbers
are **MACs** (one multiply + one add = 1; multiply by 2 for "FLOPs" in the
two-operations-per-MAC sense), **per example**, and **exact for the traced computation**:

* ``conv_general_dilated``: ``prod(output shape) * kh * kw * c_in / groups`` at batch 1, i.e.
  ``H_out W_out * c_out * kh kw c_in / groups``; every tap counts, including those that multiply
  zero padding (or the zeros inserted by ``lhs_dilation``); a dilated kernel has ``kh * kw``
  taps, not its dilated extent.
* ``dot_general``: ``prod(output shape) * prod(contracted sizes)`` (an ``nnx.Linear`` with ``in``
  inputs and ``out`` outputs: ``in * out``).
* Everything else is ignored: biases, BatchNorm, activations, pooling, reshapes, reductions,
  FFTs. A complex MAC counts as one. A linear map written with elementwise products (e.g. a
  depthwise conv as a sum of shifted slices times weights) is therefore not counted: the
  count is exact for the convs and matmuls only.
* ``cond``: the most expensive branch (an upper bound on what runs). ``scan``: its body times its
  length. ``while``: unsupported when its body holds a counted op (the trip count is not known
  from the trace): :class:`NotImplementedError` (``lax.fori_loop`` with Python-int bounds lowers
  to ``scan`` and is supported).

An ``nnx.Module`` is traced on a copy in evaluation mode (``model.eval()``: BatchNorm on its
running statistics, dropout off), with its state as traced arguments; the model itself is left
untouched. Operations that do not depend on the input (e.g. the reconstruction of a TT kernel
from its cores before one dense conv) are weight-only: at batch 1 they count once per example,
while in a batch of ``B`` they run once for all ``B``. :func:`flops_by_op` marks them
(``input_dependent=False``) and ``count_flops(..., include_weight_only=False)`` leaves them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
from flax import nnx

from train._jaxpr import Frame
from train._jaxpr import Walker
from train._jaxpr import split_closed
from train._jaxpr import sub_jaxprs
from train.models.resnet import count_params

__all__ = ["OpCount", "count_flops", "count_params", "flops_by_op"]

#: Primitives whose multiply-accumulates are counted.
COUNTED_PRIMITIVES = ("conv_general_dilated", "dot_general")


class OpCount(NamedTuple):
    """One counted operation of a traced forward pass.

    Attributes:
      primitive: ``'conv_general_dilated'`` or ``'dot_general'``.
      name: the JAX name stack of the equation (may be empty).
      lhs_shape: shape of the left operand (the input of a conv).
      rhs_shape: shape of the right operand (the kernel of a conv).
      out_shape: shape of the result.
      repeats: how many times it runs in one forward pass (product of enclosing ``scan``
        lengths; 1 otherwise).
      macs: multiply-accumulates of all its runs (``repeats`` times those of one run), exact.
      input_dependent: whether it depends on the traced input (``False``: weight-only, such as
        the reconstruction of a kernel from factors).
    """

    primitive: str
    name: str
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    repeats: int
    macs: int
    input_dependent: bool


def _conv_macs(eqn) -> int:
    """``prod(out) * (kernel taps * kernel input features)`` of one conv equation."""
    rhs_shape = tuple(eqn.invars[1].aval.shape)
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return math.prod(eqn.outvars[0].aval.shape) * per_output


def _dot_macs(eqn) -> int:
    """``prod(out) * prod(contracted sizes)`` of one dot_general equation."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted


def _count(counter: _Counter, frame: Frame, eqn, ins: list) -> list[bool]:
    """Records a conv / dot_general; its outputs depend on the input when an operand does."""
    name = eqn.primitive.name
    macs = _conv_macs(eqn) if name == "conv_general_dilated" else _dot_macs(eqn)
    counter.ops.append(OpCount(
        primitive=name,
        name=str(eqn.source_info.name_stack),
        lhs_shape=tuple(eqn.invars[0].aval.shape),
        rhs_shape=tuple(eqn.invars[1].aval.shape),
        out_shape=tuple(eqn.outvars[0].aval.shape),
        repeats=counter.repeats,
        macs=macs * counter.repeats,
        input_dependent=any(ins),
    ))
    return [any(ins)] * len(eqn.outvars)


def _scan(counter: _Counter, frame: Frame, eqn, ins: list) -> list[bool]:
    sub = split_closed(eqn.params["jaxpr"])
    num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    ins = list(ins)
    # A carry that becomes input dependent in one iteration is so in the next ones: iterate
    # the taint to a fixed point on a scratch counter, then record the ops once.
    while True:
        outs = _Counter(counter.repeats).call(frame, sub, eqn.invars, ins)
        carry = slice(num_consts, num_consts + num_carry)
        merged = [a or b for a, b in zip(ins[carry], outs[:num_carry])]
        if merged == ins[carry]:
            break
        ins[carry] = merged
    inner = _Counter(counter.repeats * int(eqn.params["length"]))
    outs = inner.call(frame, sub, eqn.invars, ins)
    counter.ops.extend(inner.ops)
    return outs


def _while(counter: _Counter, frame: Frame, eqn, ins: list) -> list[bool]:
    scratch = _Counter(1)
    for key in ("cond_jaxpr", "body_jaxpr"):
        jaxpr, consts = split_closed(eqn.params[key])
        scratch.call(frame, (jaxpr, consts), (), [False] * len(jaxpr.invars), mapped=0)
    if scratch.ops:
        raise NotImplementedError(
            "count_flops: a while_loop holds conv/dot_general ops but its trip count is not "
            "known from the trace; use lax.scan or lax.fori_loop with Python-int bounds"
        )
    return [any(ins)] * len(eqn.outvars)


def _cond(counter: _Counter, frame: Frame, eqn, ins: list) -> list[bool]:
    # The most expensive branch is recorded (an upper bound on what one call runs).
    best, best_macs = None, -1
    for branch in eqn.params["branches"]:
        scratch = _Counter(counter.repeats)
        scratch.call(frame, split_closed(branch), eqn.invars[1:], ins[1:])
        macs = sum(op.macs for op in scratch.ops)
        if macs > best_macs:
            best, best_macs = scratch, macs
    if best is not None:
        counter.ops.extend(best.ops)
    return [any(ins)] * len(eqn.outvars)


def _generic(counter: _Counter, frame: Frame, eqn, ins: list) -> list[bool]:
    """Any other primitive: walks the jaxprs it nests (``pjit``, ``custom_jvp``, ...)."""
    subs = sub_jaxprs(eqn)
    if not subs:
        return [any(ins)] * len(eqn.outvars)
    outs = [False] * len(eqn.outvars)
    for sub in subs:
        jaxpr = sub[0]
        if len(jaxpr.invars) == len(eqn.invars):
            sub_outs = counter.call(frame, sub, eqn.invars, ins)
        else:  # Unknown calling convention: every invar as dependent as the most.
            sub_outs = counter.call(frame, sub, (), [any(ins)] * len(jaxpr.invars), mapped=0)
        if len(sub_outs) == len(outs):
            outs = [a or b for a, b in zip(outs, sub_outs)]
        else:
            outs = [a or any(sub_outs) for a in outs]
    return outs


#: The MAC counter's rule table: environment values are "depends on the input" flags.
RULES = {
    "conv_general_dilated": _count,
    "dot_general": _count,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}


class _Counter(Walker):
    """Walks a jaxpr, tracking which variables depend on the input, and records the ops.

    Args:
      repeats: how many times the walked jaxpr runs per forward pass (enclosing ``scan``s).
    """

    def __init__(self, repeats: int = 1):
        super().__init__(RULES, _generic, missing=False, literal=lambda lit: False)
        self.repeats = repeats
        self.ops: list[OpCount] = []

    def run(self, jaxpr, invals, **kwargs) -> list:
        # Constants never depend on the input.
        return super().run(jaxpr, invals, **{**kwargs, "constvals": [False] * len(jaxpr.constvars)})

    def walk(self, jaxpr, inputs: set) -> None:
        """Records the ops of ``jaxpr``; ``inputs`` holds its input-dependent invars."""
        self.run(jaxpr, [v in inputs for v in jaxpr.invars])


def _first_example(example_input: Any) -> Any:
    def first(a):
        if getattr(a, "ndim", 0) < 1 or a.shape[0] < 1:
            raise ValueError(
                "example_input must be a batch with a leading example axis of size >= 1; got "
                f"shape {getattr(a, 'shape', None)}"
            )
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)
        return a[:1]

    return jax.tree.map(first, example_input)


def _trace(model_or_fn: nnx.Module | Callable[..., Any], example_input: Any):
    """``(jaxpr, indices of the input's invars)`` of one forward pass."""
    num_inputs = len(jax.tree.leaves(example_input))
    if isinstance(model_or_fn, nnx.Module):
        model = nnx.clone(model_or_fn)
        model.eval()
        graphdef, state = nnx.split(model)

        def forward(state, x):
            return nnx.merge(graphdef, state)(x)

        closed = jax.make_jaxpr(forward)(state, example_input)
    elif callable(model_or_fn):
        closed = jax.make_jaxpr(model_or_fn)(example_input)
    else:
        raise ValueError(
            f"model_or_fn={model_or_fn!r}: expected an nnx.Module or a callable of one input"
        )
    jaxpr = closed.jaxpr
    return jaxpr, set(jaxpr.invars[len(jaxpr.invars) - num_inputs:])


def flops_by_op(
    model_or_fn: nnx.Module | Callable[..., Any],
    example_input: Any,
    *,
    per_example: bool = True,
) -> list[OpCount]:
    """Every ``conv_general_dilated`` / ``dot_general`` of one forward pass, with its MACs.

    Args:
      model_or_fn: an ``nnx.Module`` (called as ``model(x)``, traced on a copy in eval mode) or
        a function of one argument.
      example_input: an input batch (array, ``jax.ShapeDtypeStruct`` or a pytree of them),
        leading axis = examples, e.g. ``(N, H, W, C)`` images. Only the shapes and dtypes
        matter; an abstract model from ``nnx.eval_shape`` works too (nothing is computed).
      per_example: trace ``example_input[:1]`` (MACs per example, the convention of the
        papers' FLOPs tables); ``False`` traces the whole batch (MACs of the batch).

    Returns:
      The counted operations in trace order (see :class:`OpCount`); the MACs are exact for the
      traced computation (conventions in the module docstring).

    Raises:
      ValueError: when ``example_input`` has no leading example axis (``per_example``) or
        ``model_or_fn`` is not callable.
      NotImplementedError: for a ``while_loop`` whose body holds counted ops.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> [(op.primitive, op.macs) for op in flops_by_op(layer, jnp.zeros((5, 8)))]
      [('dot_general', 32)]
    """
    if per_example:
        example_input = _first_example(example_input)
    jaxpr, inputs = _trace(model_or_fn, example_input)
    counter = _Counter()
    counter.walk(jaxpr, inputs)
    return counter.ops


def count_flops(
    model_or_fn: nnx.Module | Callable[..., Any],
    example_input: Any,
    *,
    per_example: bool = True,
    include_weight_only: bool = True,
) -> int:
    """Multiply-accumulates (MACs) of the convs and matmuls of one forward pass, per example.

    The sum of :func:`flops_by_op`: ``H_out W_out c_out kh kw c_in / groups`` per conv and
    ``prod(out) * prod(contracted)`` per ``dot_general``; elementwise ops, BatchNorm, pooling,
    biases are not counted (the convention of Yang et al. 2020's FLOPs formulas; MACs, not
    ``2 x``). For a plain conv net this is ``sum_l H_l W_l k_l^2 c_l n_l`` (reference notes §3).

    Args:
      model_or_fn: an ``nnx.Module`` (traced on a copy in eval mode) or a function of one
        argument.
      example_input: an input batch, e.g. ``(N, H, W, C)`` (see :func:`flops_by_op`).
      per_example: count for ``example_input[:1]`` (default) or for the whole batch.
      include_weight_only: count the ops that do not depend on the input (e.g. rebuilding a
        kernel from TT cores, once per forward pass); ``False`` leaves them out.

    Returns:
      The exact number of MACs of the traced computation (an ``int``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> count_flops(conv, jnp.zeros((2, 16, 16, 3))) == 16 * 16 * 8 * 3 * 3 * 3
      True
    """
    ops = flops_by_op(model_or_fn, example_input, per_example=per_example)
    return int(sum(op.macs for op in ops if include_weight_only or op.input_dependent))
