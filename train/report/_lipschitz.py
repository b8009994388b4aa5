r"""Certified ℓ2 Lipschitz upper bound of a network by composition over its traced jaxpr.

:class:`Composer` walks ``jax.make_jaxpr(apply)(params_leaves, x)`` and keeps, for every value
that depends on the input ``x``, an upper bound ``L`` on its Lipschitz constant with respect to
``x`` (values that do not depend on ``x`` are evaluated concretely). Every rule is a proven
inequality; where none applies the value is *blocked* (``L = None``) with a note naming the
operation, and a blocked value that reaches an output makes the network bound ``None``:

* linear ops with constant operands: conv (the layer's certified σ_max bound; a conv followed
  by per-channel scalings, as eval-mode BatchNorm, uses the bound of the folded kernel ``K·s``),
  ``dot_general`` (exact SVD of the weight), sums over axes (``sqrt(n)``), window sums (the
  exact norm of the single-channel window operator, or its Schur bound), gathers with constant
  indices (``sqrt(max multiplicity)``), broadcasts (``sqrt(replication)``);
* norm-1 maps: reshape, transpose, slice, zero pad, reverse, copies, dtype casts;
* ``a + b`` of two input-dependent values: ``L_a + L_b``; ``concatenate``, ``max(a, b)`` and
  ``select_n`` with a constant predicate: ``sqrt(Σ L_i^2)``; times a constant: ``max |c|``;
* activations: ReLU / clip / ``max``/``min`` with a constant (1), ``abs`` (1), leaky ReLU
  (``select_n(x >= 0, a x, x)``: ``max(1, |a|)``), ``logistic`` (1/4), ``tanh`` (1), SiLU
  ``x·σ(x)`` (:data:`SILU_LIPSCHITZ`), hard-swish ``x·relu6(x + 3)/6`` (3/2);
* max pools (:func:`~train.report._windows.max_pool_lipschitz`: ``sqrt`` of the largest
  number of windows that contain one pixel);
* MaxMin / GroupSort (:data:`SORTING_LIPSCHITZ`): ``sort`` along an axis (1), and the
  concatenation (or ``stack``) of ``reduce_max`` and ``reduce_min`` of the *same* value over
  the *same* axes of size ``k >= 2`` (1 with respect to that value, not ``sqrt(2)``);
* softmax over axes ``A`` (:func:`softmax_patterns`: ``exp(a - c) / sum_A exp(a - c)`` with
  ``c`` constant along ``A``, as ``jax.nn.softmax`` traces it): :data:`SOFTMAX_LIPSCHITZ`.

Blocked: products of two input-dependent values (squeeze-excitation gating, attention),
divisions by them, ``exp``/``log``/``sqrt``/``rsqrt`` of them (BatchNorm in training mode),
discontinuous ops, loops and anything not listed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

import spectra.numpy as snp
from spectra import ConvSpec
from train.report import _windows

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
#: concatenation and dtype casts, which have rules of their own (``_rule_concatenate``,
#: ``_rule_convert_element_type``).
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
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
#: Dense layers whose operator is densified to compute an on-the-fly conv norm.
_MAX_DENSE_DIM = 4096


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
    # ``reduce_<kind>(base, axes)`` (the MaxMin rule of :meth:`Composer._rule_concatenate`).
    red: tuple | None = None


def _blocked(shape, note) -> Dep:
    return Dep(tuple(shape), None, note)


def _is_var(x) -> bool:
    return not isinstance(x, jex.Literal)


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


class Composer:
    """Walks a traced network; see the module docstring.

    Args:
      leaf_specs: ``ConvSpec`` or ``None`` per params leaf (:func:`train.find_convs`).
      leaf_norm: ``leaf_norm(leaf, scale)`` -> certified bound on the σ_max of the conv of
        ``leaf`` (``scale``: ``None`` or the ``(c_out,)`` per-channel scale folded into it), or
        ``None`` when not known yet (then the unfolded bound times ``max |scale|`` is used).
    """

    def __init__(
        self,
        leaf_specs: list,
        leaf_norm: Callable[[int, Any], float | None],
        const_cache: dict | None = None,
    ):
        self.leaf_specs = leaf_specs
        # (eqn, input objects) -> (inputs, outputs): input-independent values are evaluated once
        # for all passes over the same jaxpr (the inputs are kept alive so their ids stay valid).
        self.const_cache = {} if const_cache is None else const_cache
        self.leaf_norm = leaf_norm
        self.conv_uses: dict[int, ConvUse] = {}
        self.dense_uses: dict[int, np.ndarray] = {}
        self.struct_parents: dict[int, list[Dep]] = {}
        self._cache: dict[Any, float] = {}
        self._origins_hint: dict = {}
        self.eqn_count = 0

    # ------------------------------------------------------------------------- entry point
    def run(self, closed, leaf_values: list, x_shape) -> tuple[float | None, str]:
        """``(L, note)`` of the traced function ``closed(leaves..., x)`` w.r.t. ``x``."""
        jaxpr = closed.jaxpr
        n = len(leaf_values)
        x = Dep(tuple(x_shape), 1.0)
        env_in = list(leaf_values) + [x]
        origins = {v: i for i, v in enumerate(jaxpr.invars[:n])}
        outs = self.walk(jaxpr, closed.consts, env_in, origins, "the network")
        deps = [o for o in outs if isinstance(o, Dep)]
        if not deps:
            return 0.0, "the outputs do not depend on the input"
        for d in deps:
            self.materialise(d)
            if d.L is None:
                return None, d.note or "not certifiable"
        if len(deps) == 1:
            return deps[0].L, "composition"
        return math.sqrt(
            sum(d.L**2 for d in deps)
        ), "composition (outputs stacked: root-sum-of-squares)"

    # ------------------------------------------------------------------------------ walking
    def walk(self, jaxpr, consts, invals, origins, where) -> list:
        key = ("consts", id(jaxpr))
        if key not in self.const_cache:
            self.const_cache[key] = (jaxpr, consts, [np.asarray(c) for c in consts])
        env: dict = dict(zip(jaxpr.constvars, self.const_cache[key][2]))
        env.update(zip(jaxpr.invars, invals))

        def read(v):
            return v.val if not _is_var(v) else env[v]

        key = ("softmax", id(jaxpr))
        if key not in self.const_cache:
            self.const_cache[key] = (jaxpr, softmax_patterns(jaxpr))
        softmaxes = self.const_cache[key][1]
        for index, eqn in enumerate(jaxpr.eqns):
            self.eqn_count += 1
            vals = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            at = f"eqn {index} (`{name}`) in {where}"
            source = softmaxes.get(index)
            if source is not None and isinstance(read(source), Dep):
                # The whole softmax, from its input: the intermediate exp / sum values are
                # blocked, and block the network only if something else uses them.
                d = read(source)
                L = self.lip(d)
                outs = [
                    self.out(
                        eqn.outvars[0].aval.shape,
                        None if L is None else SOFTMAX_LIPSCHITZ * L,
                        d.note,
                    )
                ]
            elif not any(isinstance(v, Dep) for v in vals):
                key = (id(eqn), tuple(id(v) for v in vals))
                if key not in self.const_cache:
                    self.const_cache[key] = (vals, _evaluate(eqn, vals))
                outs = self.const_cache[key][1]
                if (
                    name
                    in (
                        "convert_element_type",
                        "copy",
                        "copy_p",
                        "reshape",
                        "transpose",
                        "reduce_precision",
                    )
                    and _is_var(eqn.invars[0])
                    and eqn.invars[0] in origins
                ):
                    origins[eqn.outvars[0]] = origins[eqn.invars[0]]
            else:
                sub = _sub_jaxpr(eqn)
                if sub is not None:
                    inner, inner_consts = sub
                    inner_origins = {
                        iv: origins[ov]
                        for iv, ov in zip(inner.invars, eqn.invars)
                        if _is_var(ov) and ov in origins
                    }
                    label = eqn.params.get("name", name)
                    outs = self.walk(
                        inner, inner_consts, vals, inner_origins, f"{name}[{label}] at {at}"
                    )
                else:
                    self._origins_hint = origins
                    outs = self.rule(eqn, vals, origins, at)
            if not eqn.primitive.multiple_results and not isinstance(outs, (list, tuple)):
                outs = [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    # -------------------------------------------------------------------------- fold / chain
    def materialise(self, d: Dep) -> None:
        """Tightens ``d.L`` with the folded conv norm and forgets the fold."""
        if d.fold is None or d.L is None:
            d.fold = None
            return
        leaf, l_in, scale, _ = d.fold
        use = self.conv_uses.setdefault(leaf, ConvUse(leaf))
        if not np.all(scale == 1.0):
            use.scale = scale
            folded = self.leaf_norm(leaf, scale)
            if folded is not None:
                d.L = min(d.L, l_in * folded)
        d.fold = None

    def lip(self, d: Dep) -> float | None:
        self.materialise(d)
        return d.L

    def out(self, shape, L, note=None, **kw) -> Dep:
        return Dep(tuple(shape), L, note, **kw)

    # -------------------------------------------------------------------------------- rules
    def rule(self, eqn, vals, origins, at) -> Any:
        name = eqn.primitive.name
        outvars = eqn.outvars
        shape = tuple(outvars[0].aval.shape)
        deps = [v for v in vals if isinstance(v, Dep)]
        for d in deps:
            if d.L is None and name != "select_n":
                return [_blocked(o.aval.shape, d.note) for o in outvars]
        out_dtype = outvars[0].aval.dtype
        if name in _COMPARISONS:
            return self._compare(eqn, vals, shape, at)
        if not jnp.issubdtype(out_dtype, jnp.floating):
            return [
                _blocked(o.aval.shape, f"`{name}` gives a non-float, input-dependent value at {at}")
                for o in outvars
            ]
        handler = getattr(self, f"_rule_{name}", None)
        if handler is not None:
            result = handler(eqn, vals, shape, at)
        elif name in _UNIT:
            d = vals[0]
            if not isinstance(d, Dep) or any(isinstance(v, Dep) for v in vals[1:]):
                return _blocked(shape, f"`{name}` with input-dependent indices or padding at {at}")
            red = d.red if name in _BIJECTIVE and math.prod(shape) == math.prod(d.shape) else None
            result = self.out(shape, self.lip(d), red=red)
        elif name == "optimization_barrier":
            result = [self.out(v.shape, self.lip(v)) if isinstance(v, Dep) else v for v in vals]
            return result
        else:
            result = _blocked(
                shape,
                f"`{name}` of an input-dependent value is not supported (not certifiable) at {at}",
            )
        if name in _STRUCTURAL and isinstance(result, Dep):
            self.struct_parents[id(result)] = [v for v in vals if isinstance(v, Dep)]
        return result

    def _compare(self, eqn, vals, shape, at):
        a, b = vals
        note = f"comparison `{eqn.primitive.name}` of an input-dependent value at {at}"
        if isinstance(a, Dep) and not isinstance(b, Dep) and _scalar(b) == 0.0:
            return Dep(shape, None, note, cmp=(a, eqn.primitive.name))
        if isinstance(b, Dep) and not isinstance(a, Dep) and _scalar(a) == 0.0:
            return Dep(shape, None, note, cmp=(b, "flipped"))
        return _blocked(shape, note)

    def _chain_of(self, d: Dep) -> tuple:
        return d.chain if d.chain is not None else (d, ())

    def _extend(self, d: Dep, op) -> tuple | None:
        if op is None:
            return None
        base, ops = self._chain_of(d)
        return (base, ops + (op,))

    def _rule_convert_element_type(self, eqn, vals, shape, at):
        d = vals[0]
        return self.out(shape, d.L, d.note, chain=d.chain, fold=d.fold, red=d.red)

    def _rule_broadcast_in_dim(self, eqn, vals, shape, at):
        d = vals[0]
        if any(isinstance(v, Dep) for v in vals[1:]):
            return _blocked(shape, f"dynamic broadcast at {at}")
        factor = math.prod(shape) / max(math.prod(d.shape), 1)
        red = d.red if factor == 1 else None
        return self.out(shape, self.lip(d) * math.sqrt(factor), red=red)

    def _rule_concatenate(self, eqn, vals, shape, at):
        """``sqrt(Σ L_i²)``, except that a ``reduce_max`` and a ``reduce_min`` of one value
        ``u`` over the same axes (of ``k >= 2`` elements) count ``L_u`` together, once
        (:data:`SORTING_LIPSCHITZ`: MaxMin)."""
        deps = [d for d in vals if isinstance(d, Dep)]
        used: set[int] = set()
        total = 0.0
        for i, d in enumerate(deps):
            if i in used:
                continue
            used.add(i)
            partner = None
            if d.red is not None:
                base, kind, axes = d.red
                for k in range(i + 1, len(deps)):
                    e = deps[k]
                    if (
                        k not in used
                        and e.red is not None
                        and e.red[0] is base
                        and e.red[2] == axes
                        and {kind, e.red[1]} == {"max", "min"}
                    ):
                        partner = k
                        break
            if partner is not None:
                used.add(partner)
                total += (SORTING_LIPSCHITZ * self.lip(d.red[0])) ** 2
            else:
                total += self.lip(d) ** 2
        return self.out(shape, math.sqrt(total))

    _rule_stack = _rule_concatenate

    def _reduce_extreme(self, eqn, vals, shape, at):
        d = vals[0]
        axes = tuple(int(a) for a in eqn.params["axes"])
        size = math.prod(d.shape[a] for a in axes)
        kind = "max" if eqn.primitive.name == "reduce_max" else "min"
        return self.out(shape, self.lip(d), red=(d, kind, axes) if size >= 2 else None)

    _rule_reduce_max = _reduce_extreme
    _rule_reduce_min = _reduce_extreme

    def _rule_sort(self, eqn, vals, shape, at):
        # Sorting each slice along one axis is 1-Lipschitz (SORTING_LIPSCHITZ); with
        # several operands the others are permuted by the keys' order: not certifiable.
        if len(vals) != 1:
            return [
                _blocked(o.aval.shape, f"`sort` of several operands (argsort) at {at}")
                for o in eqn.outvars
            ]
        return [self.out(shape, SORTING_LIPSCHITZ * self.lip(vals[0]))]

    def _rule_split(self, eqn, vals, shape, at):
        # Each output is a slice of the input along one axis: constant 1 each.
        d = vals[0]
        lip = self.lip(d)
        return [self.out(o.aval.shape, lip) for o in eqn.outvars]

    def _binary_linear(self, eqn, vals, shape, at, sign):
        a, b = vals
        if isinstance(a, Dep) and isinstance(b, Dep):
            return self.out(shape, self._broadcast_lip(a, shape) + self._broadcast_lip(b, shape))
        d, c = (a, b) if isinstance(a, Dep) else (b, a)
        if d.shape != shape:
            return self.out(shape, self._broadcast_lip(d, shape))
        s = _scalar(c)
        if d is b and sign < 0:  # c - d
            return self.out(shape, self.lip(d), chain=self._extend(d, ("mul", -1.0)))
        op = ("add", s * sign) if s is not None else None
        return Dep(shape, d.L, d.note, chain=self._extend(d, op) if op else None, fold=d.fold)

    def _broadcast_lip(self, d: Dep, shape) -> float:
        return self.lip(d) * math.sqrt(math.prod(shape) / max(math.prod(d.shape), 1))

    def _rule_add(self, eqn, vals, shape, at):
        return self._binary_linear(eqn, vals, shape, at, 1.0)

    _rule_add_any = _rule_add

    def _rule_sub(self, eqn, vals, shape, at):
        return self._binary_linear(eqn, vals, shape, at, -1.0)

    def _rule_neg(self, eqn, vals, shape, at):
        d = vals[0]
        return self.out(shape, self.lip(d), chain=self._extend(d, ("mul", -1.0)))

    def _rule_abs(self, eqn, vals, shape, at):
        return self.out(shape, self.lip(vals[0]))

    def _rule_logistic(self, eqn, vals, shape, at):
        d = vals[0]
        return self.out(shape, self.lip(d) / 4.0, chain=self._extend(d, ("logistic", 0.0)))

    def _rule_tanh(self, eqn, vals, shape, at):
        d = vals[0]
        return self.out(shape, self.lip(d), chain=self._extend(d, ("tanh", 0.0)))

    def _rule_mul(self, eqn, vals, shape, at):
        a, b = vals
        if isinstance(a, Dep) and isinstance(b, Dep):
            return self._product(a, b, shape, at)
        d, c = (a, b) if isinstance(a, Dep) else (b, a)
        c = np.asarray(c)
        if d.shape != shape:
            return self.out(shape, self._broadcast_lip(d, shape) * _max_abs(c))
        s = _scalar(c)
        fold = None
        if d.fold is not None and d.L is not None:
            leaf, l_in, scale, axis = d.fold
            per_channel = _channel_vector(c, len(shape), axis, scale.shape[0])
            if per_channel is not None:
                fold = (leaf, l_in, scale * per_channel, axis)
        if fold is None:
            self.materialise(d)
        return Dep(
            shape,
            d.L * _max_abs(c),
            chain=self._extend(d, ("mul", s)) if s is not None else None,
            fold=fold,
        )

    def _rule_div(self, eqn, vals, shape, at):
        a, b = vals
        if isinstance(b, Dep):
            return _blocked(shape, f"division by an input-dependent value at {at}")
        c = np.asarray(b, np.float64)
        if np.any(c == 0):
            return _blocked(shape, f"division by zero at {at}")
        if a.shape != shape:
            return self.out(shape, self._broadcast_lip(a, shape) / np.min(np.abs(c)))
        s = _scalar(c)
        fold = None
        if a.fold is not None and a.L is not None:
            leaf, l_in, scale, axis = a.fold
            per_channel = _channel_vector(c, len(shape), axis, scale.shape[0])
            if per_channel is not None:
                fold = (leaf, l_in, scale / per_channel, axis)
        if fold is None:
            self.materialise(a)
        return Dep(
            shape,
            a.L / float(np.min(np.abs(c))),
            chain=self._extend(a, ("div", s)) if s is not None else None,
            fold=fold,
        )

    def _product(self, a: Dep, b: Dep, shape, at):
        for x, g in ((a, b), (b, a)):
            base_x, ops_x = self._chain_of(x)
            base_g, ops_g = self._chain_of(g)
            if ops_x or base_x is not base_g or x.shape != shape or g.shape != shape:
                continue
            lx = self.lip(base_x)
            if lx is None:
                return _blocked(shape, base_x.note)
            if ops_g == (("logistic", 0.0),):
                return self.out(shape, SILU_LIPSCHITZ * lx)
            if ops_g in _HARD_SIGMOID_CHAINS:
                return self.out(shape, HARD_SWISH_LIPSCHITZ * lx)
        return _blocked(
            shape,
            f"mul of two input-dependent values at {at} (e.g. "
            "squeeze-excitation gating or attention): not certifiable",
        )

    def _minmax(self, eqn, vals, shape, at):
        a, b = vals
        if isinstance(a, Dep) and isinstance(b, Dep):
            return self.out(
                shape,
                math.sqrt(self._broadcast_lip(a, shape) ** 2 + self._broadcast_lip(b, shape) ** 2),
            )
        d, c = (a, b) if isinstance(a, Dep) else (b, a)
        if d.shape != shape:
            return self.out(shape, self._broadcast_lip(d, shape))
        s = _scalar(c)
        op = (eqn.primitive.name, s) if s is not None else None
        return self.out(shape, self.lip(d), chain=self._extend(d, op) if op else None)

    _rule_max = _minmax
    _rule_min = _minmax

    def _rule_clamp(self, eqn, vals, shape, at):
        lo, x, hi = vals
        if isinstance(lo, Dep) or isinstance(hi, Dep):
            return _blocked(shape, f"clamp with input-dependent limits at {at}")
        return self.out(shape, self._broadcast_lip(x, shape))

    def _rule_select_n(self, eqn, vals, shape, at):
        pred, *cases = vals
        dep_cases = [c for c in cases if isinstance(c, Dep)]
        if any(c.L is None for c in dep_cases):
            return _blocked(shape, next(c.note for c in dep_cases if c.L is None))
        if not isinstance(pred, Dep):
            return self.out(
                shape, math.sqrt(sum(self._broadcast_lip(c, shape) ** 2 for c in dep_cases))
            )
        # Piecewise linear through 0 (leaky ReLU): select(x cmp 0, a x, b x) is continuous and
        # has slopes a, b, so its constant is max(|a|, |b|) L_x.
        if pred.cmp is not None and len(dep_cases) == len(cases):
            base = pred.cmp[0]
            slopes = []
            for c in cases:
                b, ops = self._chain_of(c)
                if b is not base or c.shape != shape:
                    break
                if ops == ():
                    slopes.append(1.0)
                elif len(ops) == 1 and ops[0][0] == "mul":
                    slopes.append(abs(ops[0][1]))
                else:
                    break
            else:
                lx = self.lip(base)
                if lx is not None:
                    return self.out(shape, max(slopes) * lx)
        return _blocked(
            shape,
            f"select with an input-dependent predicate at {at} (not "
            "recognised as a continuous piecewise-linear activation)",
        )

    def _rule_reduce_sum(self, eqn, vals, shape, at):
        d = vals[0]
        n = math.prod(d.shape) / max(math.prod(shape), 1)
        return self.out(shape, self.lip(d) * math.sqrt(n))

    def _rule_reduce_window_max(self, eqn, vals, shape, at):
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
        return self.out(shape, self.lip(d) * lip)

    _rule_reduce_window_min = _rule_reduce_window_max

    def _rule_reduce_window_sum(self, eqn, vals, shape, at):
        d = vals[0]
        return self.out(shape, self.lip(d) * self._window_sum_norm(eqn, d.shape))

    def _rule_gather(self, eqn, vals, shape, at):
        d, idx = vals
        if isinstance(idx, Dep):
            return _blocked(shape, f"gather with input-dependent indices at {at}")
        counts = _selection_counts(eqn, d.shape, idx)
        return self.out(shape, self.lip(d) * math.sqrt(max(counts, 0.0)))

    def _rule_dynamic_update_slice(self, eqn, vals, shape, at):
        op, upd, *idx = vals
        if any(isinstance(i, Dep) for i in idx):
            return _blocked(shape, f"dynamic_update_slice with input-dependent indices at {at}")
        ls = [self._broadcast_lip(v, v.shape) for v in (op, upd) if isinstance(v, Dep)]
        return self.out(shape, math.sqrt(sum(x**2 for x in ls)))

    def _rule_dot_general(self, eqn, vals, shape, at):
        a, b = vals
        if isinstance(a, Dep) and isinstance(b, Dep):
            return _blocked(
                shape,
                f"dot_general of two input-dependent values at {at} (e.g. "
                "attention): not certifiable",
            )
        dep_first = isinstance(a, Dep)
        d, w = (a, b) if dep_first else (b, a)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w_contract, w_batch = (rc, rb) if dep_first else (lc, lb)
        w = np.asarray(w, np.float64)
        free = [i for i in range(w.ndim) if i not in w_contract and i not in w_batch]
        mat = w.transpose(list(w_batch) + list(w_contract) + free)
        nb = math.prod(w.shape[i] for i in w_batch)
        mat = mat.reshape(nb, math.prod(w.shape[i] for i in w_contract), -1)
        key = ("dot", id(eqn))
        if key not in self._cache:
            self._cache[key] = (
                float(np.max(np.linalg.svd(mat, compute_uv=False)[..., 0])) if mat.size else 0.0
            )
        leaf = _origin(eqn.invars[1 if dep_first else 0], self._origins_hint)
        if leaf is not None and w.ndim == 2 and not w_batch:
            self.dense_uses[leaf] = mat[0]
        return self.out(shape, self.lip(d) * self._cache[key])

    def _rule_conv_general_dilated(self, eqn, vals, shape, at):
        lhs, rhs = vals
        if isinstance(rhs, Dep):
            return _blocked(shape, f"conv with an input-dependent kernel at {at}")
        leaf = _origin(eqn.invars[1], self._origins_hint)
        spec = self.leaf_specs[leaf] if leaf is not None else None
        l_in = None
        if spec is not None and spec.is_circular:
            source = self._wrap_source(lhs, eqn, spec)
            if source is not None:
                l_in = self.lip(source)
            else:
                spec = None  # Fall back to the VALID conv applied to the padded input.
        if spec is not None:
            if l_in is None:
                l_in = self.lip(lhs)
            self.conv_uses.setdefault(leaf, ConvUse(leaf))
            raw = self.leaf_norm(leaf, None)
            c_out = shape[eqn.params["dimension_numbers"].out_spec[1]]
            return Dep(
                shape,
                l_in * raw,
                fold=(leaf, l_in, np.ones(c_out), eqn.params["dimension_numbers"].out_spec[1]),
            )
        return self.out(shape, self.lip(lhs) * self._conv_eqn_norm(eqn, lhs.shape, rhs))

    def _wrap_source(self, lhs: Dep, eqn, spec: ConvSpec) -> Dep | None:
        """The unique input-dependent value of the pre-pad shape that ``lhs`` is built from by
        slices and concatenations (Flax's wrap-around pad); ``find_convs`` checked that
        ``lhs`` is the wrap pad of such a value."""
        lhs_spec = eqn.params["dimension_numbers"].lhs_spec
        expected = list(lhs.shape)
        expected[lhs_spec[2]], expected[lhs_spec[3]] = spec.input_shape
        expected = tuple(expected)
        seen, queue, found = {id(lhs)}, [lhs], {}
        while queue and len(seen) < 64:
            v = queue.pop(0)
            for p in self.struct_parents.get(id(v), []):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.shape == expected:
                    found[id(p)] = p
                else:
                    queue.append(p)
        return next(iter(found.values())) if len(found) == 1 else None

    # ------------------------------------------------------------------------- linear norms
    def _conv_eqn_norm(self, eqn, lhs_shape, kernel) -> float:
        key = ("conv", id(eqn))
        if key not in self._cache:
            self._cache[key] = conv_eqn_bound(eqn.params, lhs_shape, np.asarray(kernel))
        return self._cache[key]

    def _window_sum_norm(self, eqn, shape) -> float:
        key = ("window", id(eqn))
        if key not in self._cache:
            self._cache[key] = window_sum_bound(eqn.params, shape)
        return self._cache[key]


def _origin(var, origins):
    return origins.get(var) if _is_var(var) else None


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


def softmax_patterns(jaxpr) -> dict[int, Any]:
    """``{eqn index: source var}``: the ``div`` equations of ``jaxpr`` that end a softmax.

    A softmax over axes ``A`` of ``a`` is recognised as ``div(g, s)`` with ``g = exp(a)`` or
    ``g = exp(sub(a, c))``, ``c`` constant along ``A`` (size 1 there, possibly after
    ``broadcast_in_dim`` / ``stop_gradient``: how ``jax.nn.softmax`` subtracts the max) and
    ``s`` the
    ``reduce_sum`` over ``A`` of that same ``g`` (broadcast back). Then ``div(g, s) =
    softmax_A(a)`` whatever ``c`` is, so its Lipschitz constant is
    :data:`SOFTMAX_LIPSCHITZ` times that of ``a``.
    """
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[v] = eqn

    def through(v, names):
        """Follows ``v`` back through single-operand ops named in ``names``."""
        while _is_var(v) and v in producer and producer[v].primitive.name in names:
            v = producer[v].invars[0]
        return v

    def varies_along(v, axes, ndim) -> bool | None:
        """Whether ``v`` (broadcast to rank ``ndim``) may vary along ``axes``."""
        shape = tuple(getattr(getattr(v, "aval", None), "shape", np.shape(v)))
        while _is_var(v) and v in producer:
            eqn = producer[v]
            if eqn.primitive.name == "broadcast_in_dim":
                dims = eqn.params["broadcast_dimensions"]
                operand = tuple(eqn.invars[0].aval.shape)
                live = {d for d, n in zip(dims, operand) if n != 1}
                return bool(live & set(axes))
            if eqn.primitive.name not in ("stop_gradient", "convert_element_type"):
                break
            v = eqn.invars[0]
        if len(shape) != ndim:
            return None
        return any(shape[a] != 1 for a in axes)

    out = {}
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "div" or not all(_is_var(v) for v in eqn.invars):
            continue
        g, s = eqn.invars
        exp = producer.get(g)
        if exp is None or exp.primitive.name != "exp" or not _is_var(exp.invars[0]):
            continue
        source, sub = exp.invars[0], producer.get(exp.invars[0])
        total = producer.get(through(s, ("broadcast_in_dim", "reshape")))
        if total is None or total.primitive.name != "reduce_sum" or total.invars[0] is not g:
            continue
        axes = tuple(total.params["axes"])
        ndim = len(g.aval.shape)
        if s.aval.shape != g.aval.shape and varies_along(s, axes, ndim) is not False:
            continue
        if sub is not None and sub.primitive.name == "sub" and _is_var(sub.invars[0]):
            if varies_along(sub.invars[1], axes, ndim) is False:
                source = sub.invars[0]  # exp(a - c) / sum exp(a - c) = softmax(a).
        out[index] = source
    return out


def _broadcast_in_dim(x, shape, broadcast_dimensions, **_):
    expanded = [1] * len(shape)
    for axis, dim in zip(broadcast_dimensions, np.shape(x)):
        expanded[axis] = dim
    return np.broadcast_to(np.reshape(x, expanded), shape)


#: NumPy forms of the primitives that compute constants in common networks (BatchNorm's
#: ``gamma * rsqrt(var + eps)``, reshapes, shape arithmetic of exported graphs). Evaluating them
#: with ``jax`` compiles one tiny XLA program per primitive and shape: measured ~1.3 s of a
#: ResNet-20 report and ~3.7 s of a YOLOv8n one on a 2-core CPU. Results are checked against
#: the equation's shape and dtype; anything else goes to JAX.
_NUMPY_PRIMITIVES: dict[str, Callable] = {
    "add": lambda x, y: np.add(x, y),
    "sub": lambda x, y: np.subtract(x, y),
    "mul": lambda x, y: np.multiply(x, y),
    "div": lambda x, y: np.divide(x, y) if np.result_type(x, y).kind in "fc" else None,
    "max": lambda x, y: np.maximum(x, y),
    "min": lambda x, y: np.minimum(x, y),
    "neg": lambda x: np.negative(x),
    "sqrt": lambda x: np.sqrt(x),
    "rsqrt": lambda x: 1 / np.sqrt(x),
    "exp": lambda x: np.exp(x),
    "log": lambda x: np.log(x),
    "abs": lambda x: np.abs(x),
    "lt": lambda x, y: np.less(x, y),
    "le": lambda x, y: np.less_equal(x, y),
    "gt": lambda x, y: np.greater(x, y),
    "ge": lambda x, y: np.greater_equal(x, y),
    "eq": lambda x, y: np.equal(x, y),
    "ne": lambda x, y: np.not_equal(x, y),
}
_NUMPY_STRUCTURAL: dict[str, Callable] = {
    "reshape": lambda x, new_sizes, dimensions=None, **_: (
        np.reshape(x, new_sizes) if dimensions is None else None
    ),
    "broadcast_in_dim": _broadcast_in_dim,
    "convert_element_type": lambda x, new_dtype, **_: np.asarray(x).astype(new_dtype),
    "transpose": lambda x, permutation, **_: np.transpose(x, permutation),
    "squeeze": lambda x, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "integer_pow": lambda x, y, **_: np.power(x, y),
}


def _evaluate_numpy(eqn, vals) -> list | None:
    """:func:`_evaluate` with NumPy for the primitives above; ``None`` when not applicable."""
    name = eqn.primitive.name
    if eqn.primitive.multiple_results or len(eqn.outvars) != 1:
        return None
    if not all(isinstance(v, (np.ndarray, np.generic, int, float, bool)) for v in vals):
        return None
    aval = eqn.outvars[0].aval
    try:
        with np.errstate(all="ignore"):
            if name in _NUMPY_PRIMITIVES:
                out = _NUMPY_PRIMITIVES[name](*vals)
            elif name == "concatenate":
                out = np.concatenate(vals, axis=eqn.params["dimension"])
            elif name in _NUMPY_STRUCTURAL and len(vals) == 1:
                out = _NUMPY_STRUCTURAL[name](vals[0], **eqn.params)
            else:
                return None
    except (TypeError, ValueError):
        return None
    if out is None or np.shape(out) != tuple(aval.shape):
        return None
    return [np.asarray(out).astype(aval.dtype, copy=False)]


def _evaluate(eqn, vals) -> list:
    out = _evaluate_numpy(eqn, vals)
    if out is not None:
        return out
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(bind_params, tuple):
        subfuns, bind_params = bind_params
    with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*subfuns, *vals, **bind_params)
    if not eqn.primitive.multiple_results:
        out = [out]
    return [np.asarray(o) if hasattr(o, "shape") else o for o in out]


def _sub_jaxpr(eqn):
    for key in _CALLS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jex.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jex.Jaxpr):
            jaxpr, consts = sub, ()
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


def _selection_counts(eqn, operand_shape, idx) -> float:
    """Largest number of outputs that read one operand element (gather with constant indices)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):
        bind_params = bind_params[1]
    dtype = eqn.invars[0].aval.dtype

    def f(op):
        return eqn.primitive.bind(op, jnp.asarray(idx), **bind_params)

    zeros = jnp.zeros(operand_shape, dtype)
    out, vjp = jax.vjp(f, zeros)
    (counts,) = vjp(jnp.ones(out.shape, dtype))
    return float(jnp.max(counts)) if counts.size else 0.0


def conv_eqn_bound(params: dict, lhs_shape, kernel: np.ndarray) -> float:
    """Certified bound on the norm of a ``conv_general_dilated`` with a constant kernel.

    2-D forward convs: exact (dense SVD) when small, else the smallest of the certified bounds
    of :mod:`spectra` on the spec read from the equation; otherwise (transposed convs, other
    ranks) the Schur bound ``sqrt(max row abs-sum * max column abs-sum)``, valid for any conv.
    """
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec = dn.lhs_spec, dn.rhs_spec
    groups = int(params["feature_group_count"])
    schur = _conv_schur(kernel.transpose(list(rhs_spec[2:]) + [rhs_spec[1], rhs_spec[0]]), groups)
    if (
        len(lhs_spec) != 4
        or any(d != 1 for d in params["lhs_dilation"])
        or params.get("batch_group_count", 1) != 1
        or any(p < 0 for pair in params["padding"] for p in pair)
    ):
        return schur
    hwio = kernel.transpose(rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0])
    spec = ConvSpec(
        input_shape=(lhs_shape[lhs_spec[2]], lhs_shape[lhs_spec[3]]),
        strides=tuple(params["window_strides"]),
        padding=tuple(tuple(int(v) for v in p) for p in params["padding"]),
        kernel_dilation=tuple(params["rhs_dilation"]),
        feature_group_count=groups,
    )
    # On the host in float64 (spectra.numpy): no program compiled per equation.
    hwio = np.asarray(hwio, np.float64)
    if max(spec.in_dim(hwio.shape), spec.out_dim(hwio.shape)) <= _MAX_DENSE_DIM:
        return float(np.linalg.norm(snp.dense_operator(hwio, spec), 2))
    values = [
        schur,
        snp.symbol_grid_bound(hwio, spec),
        snp.tap_sum_bound(hwio, spec),
    ]
    return min(values)


def _conv_schur(kernel: np.ndarray, groups: int) -> float:
    """``sqrt(max_o Σ|K[..., :, o]| * max_c Σ|K[..., c, o in group]|)`` for a ``(..., I, O)``
    kernel with ``groups`` groups: each output reads each tap at most once, each input is read
    by each (tap, output channel) at most once."""
    k = np.abs(np.asarray(kernel, np.float64))
    rows = k.reshape(-1, k.shape[-1]).sum(axis=0).max()
    cig, cout = k.shape[-2:]
    per_group = k.reshape(-1, cig, groups, cout // groups).sum(axis=(0, 3))
    return float(math.sqrt(rows * per_group.max()))


def window_sum_bound(params: dict, shape) -> float:
    """Norm of a ``reduce_window_sum``: exact (the single-channel window operator, dense SVD)
    when at most two axes are windowed and it is small, else the Schur bound."""
    win, strides, pads = params["window_dimensions"], params["window_strides"], params["padding"]
    count = _windows.max_window_count(
        shape, win, strides, pads, params["window_dilation"], params["base_dilation"]
    )
    schur = _windows.sum_pool_schur_bound(win, count)
    axes = [
        i
        for i, (k, s, p) in enumerate(zip(win, strides, pads))
        if k != 1 or s != 1 or tuple(p) != (0, 0)
    ]
    if (
        len(axes) > 2
        or any(d != 1 for d in params["window_dilation"])
        or any(d != 1 for d in params["base_dilation"])
        or any(v < 0 for p in pads for v in p)
    ):
        return schur
    axes = (axes + [a for a in range(len(shape)) if a not in axes])[:2]
    size = tuple(int(shape[a]) for a in axes)
    if size[0] * size[1] > _MAX_DENSE_DIM:
        return schur
    spec = ConvSpec(
        input_shape=size,
        strides=tuple(int(strides[a]) for a in axes),
        padding=tuple(tuple(int(v) for v in pads[a]) for a in axes),
    )
    kernel = np.ones((int(win[axes[0]]), int(win[axes[1]]), 1, 1))
    exact = float(np.linalg.norm(snp.dense_operator(kernel, spec), 2))
    return min(schur, exact * (1 + 1e-6))
