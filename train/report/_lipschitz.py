r"""Certified ℓ2 Lipschitz upper bound of a network by composition over its traced jaxpr.

:class:`Composer` (a :class:`train._jaxpr.Walker`) walks
``jax.make_jaxpr(apply)(params_leaves, x)`` and keeps, for every value that depends on the
input ``x``, an upper bound ``L`` on its Lipschitz constant with respect to ``x`` (values
that do not depend on ``x`` are evaluated concretely). Every rule is a proven inequality;
where none applies the value is *blocked* (``L = None``) with a note naming the operation,
and a blocked value that reaches an output makes the network bound ``None``:

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

The rules are tables (primitive name -> rule): :data:`RULES` merges the norm-1 structural
ops here with :data:`train.report._lipschitz_linear.RULES` (linear ops with constant
operands, sums, concatenations) and :data:`train.report._lipschitz_nonlinear.RULES`
(activations, pools, sorting, comparisons). The values and constants live in
:mod:`train.report._lipschitz_values`, the conv / window / gather norms in
:mod:`train.report._conv_bounds`, softmax recognition in :mod:`train.report._softmax` and the
concrete evaluation of input-independent equations in :mod:`train.report._evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from train._jaxpr import Frame
from train._jaxpr import Walker
from train._jaxpr import call_body as _jaxpr_call_body
from train._jaxpr import is_var
from train.report import _lipschitz_linear
from train.report import _lipschitz_nonlinear
from train.report._evaluate import _evaluate
from train.report._evaluate import _evaluate_numpy
from train.report._lipschitz_values import _BIJECTIVE
from train.report._lipschitz_values import _COMPARISONS
from train.report._lipschitz_values import _STRUCTURAL
from train.report._lipschitz_values import _UNIT
from train.report._lipschitz_values import HARD_SWISH_LIPSCHITZ
from train.report._lipschitz_values import SILU_LIPSCHITZ
from train.report._lipschitz_values import SOFTMAX_LIPSCHITZ
from train.report._lipschitz_values import SORTING_LIPSCHITZ
from train.report._lipschitz_values import ConvUse
from train.report._lipschitz_values import Dep
from train.report._lipschitz_values import _blocked
from train.report._softmax import softmax_patterns

__all__ = [
    "HARD_SWISH_LIPSCHITZ",
    "RULES",
    "SILU_LIPSCHITZ",
    "SOFTMAX_LIPSCHITZ",
    "SORTING_LIPSCHITZ",
    "Composer",
    "ConvUse",
    "Dep",
    "_evaluate",
    "_evaluate_numpy",
    "softmax_patterns",
]

#: Constant-operand equations through which a value is still the params leaf it reads.
_LEAF_PRESERVING = (
    "convert_element_type",
    "copy",
    "copy_p",
    "reshape",
    "transpose",
    "reduce_precision",
)


def _unit(comp: Composer, eqn, vals, shape, at):
    """Norm-1 maps of their first operand (reshape, transpose, slice, zero pad, ...)."""
    name = eqn.primitive.name
    d = vals[0]
    if not isinstance(d, Dep) or any(isinstance(v, Dep) for v in vals[1:]):
        return _blocked(shape, f"`{name}` with input-dependent indices or padding at {at}")
    red = d.red if name in _BIJECTIVE and math.prod(shape) == math.prod(d.shape) else None
    return comp.out(shape, comp.lip(d), red=red)


def _optimization_barrier(comp: Composer, eqn, vals, shape, at):
    return [comp.out(v.shape, comp.lip(v)) if isinstance(v, Dep) else v for v in vals]


def _unsupported(comp: Composer, eqn, vals, shape, at):
    note = (
        f"`{eqn.primitive.name}` of an input-dependent value is not supported (not "
        f"certifiable) at {at}"
    )
    if eqn.primitive.multiple_results:  # e.g. a scan or while loop: one per result.
        return [_blocked(o.aval.shape, note) for o in eqn.outvars]
    return _blocked(shape, note)


#: The composition's rule table: primitive name -> ``rule(composer, eqn, vals, shape, at)``,
#: applied to equations with an input-dependent operand (anything else: :func:`_unsupported`).
RULES: dict[str, Callable] = {
    **{name: _unit for name in _UNIT},
    "optimization_barrier": _optimization_barrier,
    **_lipschitz_linear.RULES,
    **_lipschitz_nonlinear.RULES,
}


def _call(comp: Composer, frame: Frame, eqn, vals: list, body: tuple) -> list:
    """A nested call (``jit``, ``custom_jvp``, ...): walks its body with the same values."""
    inner, inner_consts = body
    origins = frame.state
    inner_origins = {
        iv: origins[ov]
        for iv, ov in zip(inner.invars, eqn.invars)
        if is_var(ov) and ov in origins
    }
    name = eqn.primitive.name
    label = eqn.params.get("name", name)
    where = f"{name}[{label}] at {comp.eqn_label(frame, eqn)}"
    return comp.walk(inner, inner_consts, vals, inner_origins, where, parent=frame)


class Composer(Walker):
    """Walks a traced network; see the module docstring.

    Args:
      leaf_specs: ``ConvSpec`` or ``None`` per params leaf (:func:`train.find_convs`).
      leaf_norm: ``leaf_norm(leaf, scale)`` -> certified bound on the σ_max of the conv of
        ``leaf`` (``scale``: ``None`` or the ``(c_out,)`` per-channel scale folded into it), or
        ``None`` when not known yet (then the unfolded bound times ``max |scale|`` is used).
      const_cache: shared between composers over the same jaxpr (constants evaluated once).
    """

    def __init__(
        self,
        leaf_specs: list,
        leaf_norm: Callable[[int, Any], float | None],
        const_cache: dict | None = None,
    ):
        super().__init__(RULES, _unsupported, call=_call)
        self.leaf_specs = leaf_specs
        # (eqn, input objects) -> (inputs, outputs): input-independent values are evaluated once
        # for all passes over the same jaxpr (the inputs are kept alive so their ids stay valid).
        self.const_cache = {} if const_cache is None else const_cache
        self.leaf_norm = leaf_norm
        self.conv_uses: dict[int, ConvUse] = {}
        self.dense_uses: dict[int, np.ndarray] = {}
        self.struct_parents: dict[int, list[Dep]] = {}
        self.cache: dict[Any, float] = {}
        # var -> params leaf, in the frame whose equation a rule is looking at.
        self.origins: dict = {}
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
    def walk(self, jaxpr, consts, invals, origins, where, parent: Frame | None = None) -> list:
        """Walks ``jaxpr`` (``origins``: var -> params leaf); returns its outputs' values."""
        key = ("consts", id(jaxpr))
        if key not in self.const_cache:
            self.const_cache[key] = (jaxpr, consts, [np.asarray(c) for c in consts])
        constvals = self.const_cache[key][2]
        return Walker.run(  # Not Composer.run: the entry point.
            self,
            jaxpr, invals, consts=consts, constvals=constvals, where=where, parent=parent,
            state=origins,
        )

    def step(self, frame: Frame, eqn, vals: list) -> Any:
        """A softmax's ``div`` from its source; constants evaluated; nested calls walked;
        everything else through :meth:`rule`."""
        self.eqn_count += 1
        origins = frame.state
        key = ("softmax", id(frame.jaxpr))
        if key not in self.const_cache:
            self.const_cache[key] = (frame.jaxpr, softmax_patterns(frame.jaxpr))
        source = self.const_cache[key][1].get(frame.index)
        if source is not None and isinstance(self.read(frame, source), Dep):
            # The whole softmax, from its input: the intermediate exp / sum values are
            # blocked, and block the network only if something else uses them.
            d = self.read(frame, source)
            L = self.lip(d)
            return [
                self.out(
                    eqn.outvars[0].aval.shape,
                    None if L is None else SOFTMAX_LIPSCHITZ * L,
                    d.note,
                )
            ]
        if not any(isinstance(v, Dep) for v in vals):
            key = (id(eqn), tuple(id(v) for v in vals))
            if key not in self.const_cache:
                self.const_cache[key] = (vals, _evaluate(eqn, vals))
            if (
                eqn.primitive.name in _LEAF_PRESERVING
                and is_var(eqn.invars[0])
                and eqn.invars[0] in origins
            ):
                origins[eqn.outvars[0]] = origins[eqn.invars[0]]
            return self.const_cache[key][1]
        body = _jaxpr_call_body(eqn)
        if body is not None:
            return self.call_rule(self, frame, eqn, vals, body)
        self.origins = origins
        return self.rule(eqn, vals, self.eqn_label(frame, eqn))

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
        """``d``'s bound, its folded conv norm applied."""
        self.materialise(d)
        return d.L

    def out(self, shape, L, note=None, **kw) -> Dep:
        """A new :class:`Dep`."""
        return Dep(tuple(shape), L, note, **kw)

    # -------------------------------------------------------------------------------- rules
    def rule(self, eqn, vals, at) -> Any:
        """The table rule of an equation with an input-dependent operand (blocked values and
        non-float results first)."""
        name = eqn.primitive.name
        outvars = eqn.outvars
        shape = tuple(outvars[0].aval.shape)
        deps = [v for v in vals if isinstance(v, Dep)]
        for d in deps:
            if d.L is None and name != "select_n":
                return [_blocked(o.aval.shape, d.note) for o in outvars]
        out_dtype = outvars[0].aval.dtype
        if name not in _COMPARISONS and not jnp.issubdtype(out_dtype, jnp.floating):
            return [
                _blocked(o.aval.shape, f"`{name}` gives a non-float, input-dependent value at {at}")
                for o in outvars
            ]
        result = self.rules.get(name, self.default)(self, eqn, vals, shape, at)
        if name in _STRUCTURAL and isinstance(result, Dep):
            self.struct_parents[id(result)] = [v for v in vals if isinstance(v, Dep)]
        return result

    def chain_of(self, d: Dep) -> tuple:
        """``(base, ops)``: ``d`` is the elementwise scalar chain ``ops`` applied to ``base``."""
        return d.chain if d.chain is not None else (d, ())

    def extend(self, d: Dep, op) -> tuple | None:
        """The chain of ``op`` applied to ``d`` (``None`` when ``op`` is)."""
        if op is None:
            return None
        base, ops = self.chain_of(d)
        return (base, ops + (op,))

    def broadcast_lip(self, d: Dep, shape) -> float:
        """``L`` of ``d`` broadcast to ``shape`` (``sqrt`` of the replication factor)."""
        return self.lip(d) * math.sqrt(math.prod(shape) / max(math.prod(d.shape), 1))
