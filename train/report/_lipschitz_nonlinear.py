r"""The nonlinear rules of the report's Lipschitz composition (:mod:`train.report._lipschitz`).

Activations with their proven constants (ReLU / clip / ``max``/``min`` with a constant: 1;
``abs``: 1; leaky ReLU ``select_n(x >= 0, a x, x)``: ``max(1, |a|)``; ``logistic``: 1/4;
``tanh``: 1; SiLU ``x·σ(x)``: :data:`~train.report._lipschitz_values.SILU_LIPSCHITZ`;
hard-swish: 3/2), max pools (``sqrt`` of the largest number of windows holding one pixel),
``sort`` and ``reduce_max``/``reduce_min`` (MaxMin / GroupSort, 1), and the comparisons that
leaky ReLU's select reads. :data:`RULES` is their table.
"""

from __future__ import annotations

import math

from train.report import _windows
from train.report._lipschitz_values import _HARD_SIGMOID_CHAINS
from train.report._lipschitz_values import HARD_SWISH_LIPSCHITZ
from train.report._lipschitz_values import SILU_LIPSCHITZ
from train.report._lipschitz_values import SORTING_LIPSCHITZ
from train.report._lipschitz_values import Dep
from train.report._lipschitz_values import _blocked
from train.report._lipschitz_values import _scalar


def _compare(comp, eqn, vals, shape, at):
    a, b = vals
    note = f"comparison `{eqn.primitive.name}` of an input-dependent value at {at}"
    if isinstance(a, Dep) and not isinstance(b, Dep) and _scalar(b) == 0.0:
        return Dep(shape, None, note, cmp=(a, eqn.primitive.name))
    if isinstance(b, Dep) and not isinstance(a, Dep) and _scalar(a) == 0.0:
        return Dep(shape, None, note, cmp=(b, "flipped"))
    return _blocked(shape, note)


def _reduce_extreme(comp, eqn, vals, shape, at):
    d = vals[0]
    axes = tuple(int(a) for a in eqn.params["axes"])
    size = math.prod(d.shape[a] for a in axes)
    kind = "max" if eqn.primitive.name == "reduce_max" else "min"
    return comp.out(shape, comp.lip(d), red=(d, kind, axes) if size >= 2 else None)


def _sort(comp, eqn, vals, shape, at):
    # Sorting each slice along one axis is 1-Lipschitz (SORTING_LIPSCHITZ); with
    # several operands the others are permuted by the keys' order: not certifiable.
    if len(vals) != 1:
        return [
            _blocked(o.aval.shape, f"`sort` of several operands (argsort) at {at}")
            for o in eqn.outvars
        ]
    return [comp.out(shape, SORTING_LIPSCHITZ * comp.lip(vals[0]))]


def _abs(comp, eqn, vals, shape, at):
    return comp.out(shape, comp.lip(vals[0]))


def _logistic(comp, eqn, vals, shape, at):
    d = vals[0]
    return comp.out(shape, comp.lip(d) / 4.0, chain=comp.extend(d, ("logistic", 0.0)))


def _tanh(comp, eqn, vals, shape, at):
    d = vals[0]
    return comp.out(shape, comp.lip(d), chain=comp.extend(d, ("tanh", 0.0)))


def _product(comp, a: Dep, b: Dep, shape, at):
    for x, g in ((a, b), (b, a)):
        base_x, ops_x = comp.chain_of(x)
        base_g, ops_g = comp.chain_of(g)
        if ops_x or base_x is not base_g or x.shape != shape or g.shape != shape:
            continue
        lx = comp.lip(base_x)
        if lx is None:
            return _blocked(shape, base_x.note)
        if ops_g == (("logistic", 0.0),):
            return comp.out(shape, SILU_LIPSCHITZ * lx)
        if ops_g in _HARD_SIGMOID_CHAINS:
            return comp.out(shape, HARD_SWISH_LIPSCHITZ * lx)
    return _blocked(
        shape,
        f"mul of two input-dependent values at {at} (e.g. "
        "squeeze-excitation gating or attention): not certifiable",
    )


def _minmax(comp, eqn, vals, shape, at):
    a, b = vals
    if isinstance(a, Dep) and isinstance(b, Dep):
        return comp.out(
            shape,
            math.sqrt(comp.broadcast_lip(a, shape) ** 2 + comp.broadcast_lip(b, shape) ** 2),
        )
    d, c = (a, b) if isinstance(a, Dep) else (b, a)
    if d.shape != shape:
        return comp.out(shape, comp.broadcast_lip(d, shape))
    s = _scalar(c)
    op = (eqn.primitive.name, s) if s is not None else None
    return comp.out(shape, comp.lip(d), chain=comp.extend(d, op) if op else None)


def _clamp(comp, eqn, vals, shape, at):
    lo, x, hi = vals
    if isinstance(lo, Dep) or isinstance(hi, Dep):
        return _blocked(shape, f"clamp with input-dependent limits at {at}")
    return comp.out(shape, comp.broadcast_lip(x, shape))


def _select_n(comp, eqn, vals, shape, at):
    pred, *cases = vals
    dep_cases = [c for c in cases if isinstance(c, Dep)]
    if any(c.L is None for c in dep_cases):
        return _blocked(shape, next(c.note for c in dep_cases if c.L is None))
    if not isinstance(pred, Dep):
        return comp.out(
            shape, math.sqrt(sum(comp.broadcast_lip(c, shape) ** 2 for c in dep_cases))
        )
    # Piecewise linear through 0 (leaky ReLU): select(x cmp 0, a x, b x) is continuous and
    # has slopes a, b, so its constant is max(|a|, |b|) L_x.
    if pred.cmp is not None and len(dep_cases) == len(cases):
        base = pred.cmp[0]
        slopes = []
        for c in cases:
            b, ops = comp.chain_of(c)
            if b is not base or c.shape != shape:
                break
            if ops == ():
                slopes.append(1.0)
            elif len(ops) == 1 and ops[0][0] == "mul":
                slopes.append(abs(ops[0][1]))
            else:
                break
        else:
            lx = comp.lip(base)
            if lx is not None:
                return comp.out(shape, max(slopes) * lx)
    return _blocked(
        shape,
        f"select with an input-dependent predicate at {at} (not "
        "recognised as a continuous piecewise-linear activation)",
    )


def _reduce_window_max(comp, eqn, vals, shape, at):
    d = vals[0]
    p = eqn.params
    lip = _windows.max_pool_lipschitz(
        d.shape,
        p["window_dimensions"],
        p["window_strides"],
        p["padding"],
        p["window_dilation"],
        p["base_dilation"],
    )
    return comp.out(shape, comp.lip(d) * lip)


#: Nonlinear rules: primitive name -> ``rule(composer, eqn, vals, shape, at)``.
RULES = {
    **{name: _compare for name in ("ge", "gt", "le", "lt")},
    "reduce_max": _reduce_extreme,
    "reduce_min": _reduce_extreme,
    "sort": _sort,
    "abs": _abs,
    "logistic": _logistic,
    "tanh": _tanh,
    "max": _minmax,
    "min": _minmax,
    "clamp": _clamp,
    "select_n": _select_n,
    "reduce_window_max": _reduce_window_max,
    "reduce_window_min": _reduce_window_max,
}
