"""Values and constants of the report's Lipschitz composition (:mod:`train.report._lipschitz`).

:class:`Dep` is the composer's value for anything that depends on the network input: a shape,
a certified Lipschitz bound ``L`` (``None``: blocked, with a note) and what the rules need to
recognise patterns (scalar chains for SiLU / hard-swish, a conv followed by per-channel scales
for BatchNorm folding, comparisons for leaky ReLU, ``reduce_max``/``reduce_min`` for MaxMin).
The constants are proven Lipschitz constants, each with its inequality.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train._jaxpr import is_var

#: ``sup_x |d/dx (x σ(x))|`` = 1.09984 (at x ≈ 2.3994), rounded up.
SILU_LIPSCHITZ = 1.0999
#: ``sup_x |d/dx (x relu6(x + 3) / 6)|`` = 3/2 (at x -> 3).
HARD_SWISH_LIPSCHITZ = 1.5
#: ℓ2 Lipschitz constant of softmax (over any axes, batched): its Jacobian ``diag(p) - p pᵀ``
#: is positive semi-definite with ``vᵀ J v = Var_p(v) <= (max v - min v)² / 4 <= 1/2`` for a
#: unit ``v`` (Popoviciu's inequality), and block diagonal over the other axes.
SOFTMAX_LIPSCHITZ = 0.5
#: MaxMin / GroupSort: sorting ``s: R^k -> R^k`` is 1-Lipschitz in ℓ2. For ``x, y``,
#: ``||s(x) - s(y)||² = ||x||² + ||y||² - 2 <s(x), s(y)>`` and ``<s(x), s(y)> >= <x, y>`` by the
#: rearrangement inequality (similarly ordered sequences have the largest sum of products), so
#: ``||s(x) - s(y)|| <= ||x - y||``; sorting every slice along an axis (``sort``, GroupSort)
#: too, the squared differences adding over slices. For ``k >= 2``, ``(max, min)`` of a group
#: is a sub-vector of ``s`` (its last and first entries), so the concatenation of
#: ``reduce_max(u, A)`` and ``reduce_min(u, A)`` (each entry kept once) is 1-Lipschitz in ``u``
#: (MaxMin, ``k = 2``). With ``k = 1`` (``max = min = u``) it costs ``sqrt(2)``, and a max and a
#: min of different values or over different axes are no sorting: both keep ``sqrt(Σ L_i²)``.
SORTING_LIPSCHITZ = 1.0
#: The chain of scalar ops of ``jax.nn.hard_sigmoid``: ``relu6(x + 3) / 6``.
_HARD_SIGMOID_CHAINS = (
    (("add", 3.0), ("max", 0.0), ("min", 6.0), ("div", 6.0)),
    (("add", 3.0), ("max", 0.0), ("min", 6.0), ("mul", 1.0 / 6.0)),
)
_STRUCTURAL = frozenset(
    {
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "copy",
        "copy_p",
        "rev",
        "reduce_precision",
        "slice",
        "pad",
        "concatenate",
        "convert_element_type",
    }
)
#: Ops with Lipschitz constant 1 on their input-dependent operand: the structural ones except
#: concatenation and dtype casts, which have rules of their own (``concatenate``,
#: ``convert_element_type`` in :data:`train.report._lipschitz_linear.RULES`).
_UNIT = (_STRUCTURAL - {"concatenate", "convert_element_type"}) | {
    "dynamic_slice",
    "real",
    "reduce_max",
    "reduce_min",
}
#: Norm-preserving bijective re-indexings through which a ``reduce_max``/``reduce_min`` result
#: keeps its identity for the MaxMin rule (each of its elements still appears exactly once).
_BIJECTIVE = _STRUCTURAL - {"slice", "pad", "concatenate", "convert_element_type"}
_COMPARISONS = frozenset({"ge", "gt", "le", "lt"})

@dataclasses.dataclass(eq=False)
class Dep:
    """An input-dependent value: its shape, a Lipschitz bound ``L`` (``None``: blocked)."""

    shape: tuple[int, ...]
    L: float | None
    note: str | None = None
    # (base Dep, ((op, scalar), ...)): this value is an elementwise scalar chain of base.
    chain: tuple | None = None
    # (leaf, L_in, scale (C,), channel axis): value = diag(scale) conv_leaf(u) + const.
    fold: tuple | None = None
    # (base Dep, comparison, constant): a predicate ``base <cmp> constant``.
    cmp: tuple | None = None
    # (base Dep, "max" | "min", axes): this value is a bijective re-indexing of
    # ``reduce_<kind>(base, axes)`` (the MaxMin rule of ``concatenate``).
    red: tuple | None = None


def _blocked(shape, note) -> Dep:
    return Dep(tuple(shape), None, note)


def _scalar(c) -> float | None:
    c = np.asarray(c)
    if c.size == 1 and np.issubdtype(c.dtype, np.number):
        return float(c.reshape(()))
    return None


def _max_abs(c) -> float:
    c = np.asarray(c, np.float64)
    return float(np.max(np.abs(c))) if c.size else 0.0


@dataclasses.dataclass
class ConvUse:
    """A conv whose kernel is a params leaf, as the composer saw it (for the layer table)."""

    leaf: int
    scale: np.ndarray | None = None


def _origin(var, origins):
    return origins.get(var) if is_var(var) else None


def _channel_vector(c, ndim, axis, channels) -> np.ndarray | None:
    """``c`` as a per-channel ``(channels,)`` vector when it only varies along ``axis``."""
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return np.full(channels, float(c.reshape(())))
    if c.ndim != ndim or c.shape[axis] != channels:
        return None
    if any(n != 1 for i, n in enumerate(c.shape) if i != axis):
        return None
    return c.reshape(channels)
