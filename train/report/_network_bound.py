r"""A tighter sound ℓ2 Lipschitz upper bound: the midpoint (loop) transformation over the jaxpr.

Every recognised nonlinearity ``j`` of the traced network, applied to its input ``u_j``, is
written ``φ_j(u) = m_j u + r_j ψ_j(u)`` with ``ψ_j`` 1-Lipschitz:

* elementwise activations with slopes in ``[α, β]`` (``m = (α + β)/2``, ``r = (β - α)/2``):
  ReLU / ``max(u, c)`` / ``min(u, c)`` / clamp ``[0, 1]``; ``abs`` ``[-1, 1]``; ``logistic``
  ``[0, 1/4]``; ``tanh`` ``[0, 1]``; SiLU ``u·logistic(u)``: ``[1 - s, s]`` with
  ``s = SILU_LIPSCHITZ`` (its derivative ``d(u)`` satisfies ``d(u) + d(-u) = 1``, so
  ``inf d = 1 - sup d``);
* max pools (``m = 0``, ``r`` = their Lipschitz constant, as in the composition) and
  ``reduce_max`` (``m = 0``, ``r = 1``);
* MaxMin / GroupSort (``m = 0``, ``r = 1``, :data:`~train.report._lipschitz.SORTING_LIPSCHITZ`:
  per-group sorting is 1-Lipschitz by the rearrangement inequality): ``sort`` of one operand,
  and the ``concatenate`` / ``stack`` of exactly a ``reduce_max`` and a ``reduce_min`` of the
  same value ``u`` over the same axes (``k >= 2`` elements) as *one* node from ``u`` to the
  concatenation (two separate nodes would charge ``2`` instead of ``1``).

Replacing each ``φ_j(u_j)`` by ``m_j u_j + r_j e_j`` with a free input ``e_j`` (of ``φ_j``'s
output shape) makes every value of the network an affine function of ``(x, e_1, …, e_n)``
(:class:`LinearisedNetwork`; BatchNorm in eval mode, average pools, residual sums and
concatenations are affine). With ``e_j = ψ_j(u_j(x))`` it computes the network exactly, and
``||e_j(x) - e_j(y)|| <= ||u_j(x) - u_j(y)||``, so by the triangle inequality

    ``L(u_k) <= ||∂u_k/∂x|| + Σ_{j<k} ||∂u_k/∂e_j|| L(u_j)``

and the same for the output: a dynamic program over the norms of the linear maps between
consecutive nonlinearities (the LipLT bound of Fazlyab et al. 2023, here on any DAG: residual
identities and sums of branches are inside the linear maps). For ``x + W₂ relu(W₁ x)`` it gives
``||I + ½W₂W₁|| + ½||W₂|| ||W₁||``. Each norm is a **proven** bound (dense float64 Jacobian,
:func:`spectra._composite.dense_norm_upper`) or a **probabilistic** one (Lanczos with the
Kuczyński–Woźniakowski bound, :func:`spectra._composite.lanczos_norm_upper`; the failure
probabilities add up, union bound).

Where all the maps into one target ``u_k`` are dense, the sum is also bounded by one norm: with
``Δu_k = Σ_j A_j Δe_j`` (``e_0 = x``) and ``||Δe_j|| <= L(u_j) ||Δx||``, Cauchy–Schwarz over the
blocks gives ``||Δu_k|| <= ||[L(u_j) A_j / sqrt(p_j)]_j|| ||Δx||`` for any ``p_j > 0`` summing to
1 (:func:`spectra._composite.grouped_norm_upper`, proven); the smaller of the two is kept.

Anything else that depends on the input nonlinearly (products of two input-dependent values,
softmax, ``exp``, leaky ReLU selects, ...) makes this bound unavailable (``None`` with a note);
the composition bound (:mod:`train.report._lipschitz`) still applies.

Length: the linearised network (a :class:`train._jaxpr.Walker` with the rule table
:data:`RULES`), its replay, the dynamic program over its nonlinearities and the window/cut
scheduling for large nets share one graph structure (the ``ops`` list of
:class:`LinearisedNetwork` and its refs); the window/DP part is being reworked separately.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectra import _composite
from train._jaxpr import Frame
from train._jaxpr import Walker
from train._jaxpr import bind_eqn
from train._jaxpr import call_body
from train.report import _windows
from train.report._empirical import CPU_COMPILER_OPTIONS
from train.report._evaluate import _evaluate
from train.report._lipschitz import SILU_LIPSCHITZ
from train.report._lipschitz import SOFTMAX_LIPSCHITZ
from train.report._lipschitz import SORTING_LIPSCHITZ
from train.report._softmax import softmax_patterns

#: Total failure probability allowed to the probabilistic norms of one network (union bound).
DEFAULT_DELTA = 1e-6
#: Dense (proven) Jacobians up to this many float64 entries per source block (rows x cols).
MAX_DENSE_ENTRIES = 2**23
#: Above this many Lanczos steps (each one window evaluation and its transpose, all pairs of
#: a window batched), the bound is skipped (too slow): ``None`` resolves to
#: :data:`CPU_MAX_WORK` on CPU and :data:`ACCELERATOR_MAX_WORK` elsewhere. Measured on a shared
#: 2-core CPU: ResNet-20 @32² needs 1680 (28 norms x 60 steps): ~59 s, 3x the rest of its
#: report; YOLOv8n @320² would need 69180.
DEFAULT_MAX_WORK = None
CPU_MAX_WORK = 1000
ACCELERATOR_MAX_WORK = 20000
#: Linear primitives: affine in their input-dependent operands when the conditions of
#: :func:`_linear_ok` hold.
_LINEAR = frozenset(
    {
        "add",
        "add_any",
        "sub",
        "neg",
        "mul",
        "div",
        "reduce_sum",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "rev",
        "copy",
        "copy_p",
        "slice",
        "pad",
        "concatenate",
        "broadcast_in_dim",
        "convert_element_type",
        "reduce_precision",
        "select_n",
        "gather",
        "dynamic_slice",
        "dynamic_update_slice",
        "reduce_window_sum",
        "cumsum",
        "split",
        "stack",
        "conv_general_dilated",
        "dot_general",
    }
)
#: Elementwise activations: ``name -> (α, β)`` slope range on the input-dependent operand.
_SLOPES = {
    "max": (0.0, 1.0),
    "min": (0.0, 1.0),
    "clamp": (0.0, 1.0),
    "abs": (-1.0, 1.0),
    "logistic": (0.0, 0.25),
    "tanh": (0.0, 1.0),
}
SILU_SLOPES = (1.0 - SILU_LIPSCHITZ, SILU_LIPSCHITZ)
#: Softmax: its Jacobian ``diag(p) - p pᵀ`` is symmetric with eigenvalues in ``[0, 1/2]``
#: (``SOFTMAX_LIPSCHITZ``), so ``4 softmax(u) - u`` has a symmetric Jacobian of norm <= 1
#: everywhere: ``softmax = u/4 + ψ(u)/4`` with ``ψ`` 1-Lipschitz (mean value theorem).
SOFTMAX_SLOPES = (0.0, SOFTMAX_LIPSCHITZ)


class Unsupported(Exception):
    """The network has an operation the midpoint transformation does not handle."""


@dataclasses.dataclass
class Node:
    """A nonlinearity ``φ(u) = m u + r ψ(u)``: its kind, slopes, where it is."""

    kind: str
    m: float
    r: float
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    where: str


@dataclasses.dataclass(eq=False)
class _Blocked:
    """An input-dependent value no rule handles; an error only if the outputs need it."""

    note: str


@dataclasses.dataclass(eq=False)
class _Ref:
    """An input-dependent value of the program: its id, shape, and the sources it depends on."""

    id: int
    shape: tuple[int, ...]
    srcs: frozenset
    # ('logistic', base _Ref): a SiLU's sigmoid; ('reduce_max' | 'reduce_min', base _Ref,
    # axes, where): half of a MaxMin. Not emitted until a consumer needs it as a value.
    pending: tuple | None = None


class LinearisedNetwork(Walker):
    """The network's jaxpr with every nonlinearity ``j`` replaced by ``m_j u_j + r_j e_j``.

    A :class:`train._jaxpr.Walker` whose rule table is :data:`RULES` (the recognised
    nonlinearities; every other primitive: :func:`_linear`).

    Args:
      closed: ``jax.make_jaxpr(fn)(leaves, x)``.
      leaf_values: the params leaves.
      x_shape: the shape of ``x``.

    Raises:
      Unsupported: an input-dependent operation that is neither affine nor a recognised
        nonlinearity.
    """

    def __init__(self, closed, leaf_values, x_shape):
        super().__init__(RULES, _linear)
        self.nodes: list[Node] = []
        self.ops: list[tuple] = []
        self._next = 0
        self._const_cache: dict = {}
        self._materialised: dict[int, _Ref] = {}
        jaxpr = closed.jaxpr
        n = len(leaf_values)
        self.x_ref = self._new(tuple(x_shape), frozenset({0}))
        outs = self._walk(jaxpr, closed.consts, list(leaf_values) + [self.x_ref], "the network")
        self.out_refs = []
        for o in outs:
            if isinstance(o, _Blocked):
                raise Unsupported(o.note)
            if isinstance(o, _Ref):
                if o.pending is not None:
                    o = self._materialise(o)
                self.out_refs.append(o)
        del n
        self._prune()
        # The sources each target depends on (0: x, j + 1: e_j).
        self.node_in: list[_Ref] = [op[2] for op in self.ops if op[0] == "node"]
        self.out_srcs = frozenset().union(*[o.srcs for o in self.out_refs])

    def _prune(self) -> None:
        """Drops the operations the outputs do not need (e.g. the max a softmax subtracts),
        renumbers the nodes and recomputes the sources of every value."""
        needed = {o.id for o in self.out_refs}
        keep = []
        for op in reversed(self.ops):
            outs = [op[3]] if op[0] == "node" else op[3]
            if not any(o.id in needed for o in outs):
                continue
            keep.append(op)
            ins = [op[2]] if op[0] == "node" else [v for v in op[2] if isinstance(v, _Ref)]
            needed.update(v.id for v in ins)
        keep.reverse()
        nodes, ops = [], []
        self.x_ref.srcs = frozenset({0})
        for op in keep:
            if op[0] == "node":
                _, j, u, out = op
                node = self.nodes[j]
                k = len(nodes)
                nodes.append(node)
                out.srcs = frozenset({k + 1}) | (u.srcs if node.m != 0 else frozenset())
                ops.append(("node", k, u, out))
            else:
                _, eqn, vals, outs = op
                srcs = frozenset().union(*[v.srcs for v in vals if isinstance(v, _Ref)])
                for o in outs:
                    o.srcs = srcs
                ops.append(op)
        self.nodes, self.ops = nodes, ops

    # --------------------------------------------------------------------------- building
    def _new(self, shape, srcs, pending=None) -> _Ref:
        self._next += 1
        return _Ref(self._next, tuple(shape), srcs, pending)

    def _node(self, kind, slopes, u: _Ref, out_shape, where) -> _Ref:
        a, b = slopes
        j = len(self.nodes)
        m, r = (a + b) / 2, (b - a) / 2
        self.nodes.append(Node(kind, m, r, u.shape, tuple(out_shape), where))
        srcs = frozenset({j + 1}) | (u.srcs if m != 0 else frozenset())
        out = self._new(out_shape, srcs)
        self.ops.append(("node", j, u, out))
        return out

    def _materialise(self, ref: _Ref) -> _Ref:
        if ref.id not in self._materialised:
            kind, base = ref.pending[:2]
            if kind == "logistic":
                node = self._node("logistic", _SLOPES["logistic"], base, ref.shape, "sigmoid")
            else:
                node = self._node(kind, (-1.0, 1.0), base, ref.shape, ref.pending[3])
            self._materialised[ref.id] = node
        return self._materialised[ref.id]

    def _maxmin(self, name, vals, out_shape, at) -> _Ref | None:
        """The MaxMin node ``u -> concat(reduce_max(u, A), reduce_min(u, A))`` (``m = 0``,
        ``r = 1``) when ``vals`` are exactly such a pair (either order), else ``None``."""
        if name not in ("concatenate", "stack") or len(vals) != 2:
            return None
        a, b = vals
        if not (isinstance(a, _Ref) and isinstance(b, _Ref)):
            return None
        pa, pb = a.pending, b.pending
        if (
            pa is None
            or pb is None
            or {pa[0], pb[0]} != {"reduce_max", "reduce_min"}
            or pa[1] is not pb[1]
            or pa[2] != pb[2]
        ):
            return None
        return self._node("maxmin", (-SORTING_LIPSCHITZ, SORTING_LIPSCHITZ), pa[1], out_shape, at)

    def _walk(self, jaxpr, consts, invals, where, parent: Frame | None = None) -> list:
        constvals = [np.asarray(c) for c in consts]
        return self.run(
            jaxpr, invals, consts=consts, constvals=constvals, where=where, parent=parent
        )

    def step(self, frame: Frame, eqn, vals: list):
        """A softmax from its source, blocked values, MaxMin pairs, constants and nested calls
        first; every other equation with an input-dependent operand through :data:`RULES`."""
        name = eqn.primitive.name
        at = self.eqn_label(frame, eqn)
        key = ("softmax", id(frame.jaxpr))
        if key not in self._const_cache:
            self._const_cache[key] = (frame.jaxpr, softmax_patterns(frame.jaxpr))
        source = self._const_cache[key][1].get(frame.index)
        blocked = [v for v in vals if isinstance(v, _Blocked)]
        deps = [v for v in vals if isinstance(v, _Ref)]
        if source is not None and isinstance(self.read(frame, source), _Ref):
            u = self.read(frame, source)
            if u.pending is not None:
                u = self._materialise(u)
            return self._node("softmax", SOFTMAX_SLOPES, u, eqn.outvars[0].aval.shape, at)
        if blocked:
            return [_Blocked(blocked[0].note) for _ in eqn.outvars]
        if (maxmin := self._maxmin(name, vals, eqn.outvars[0].aval.shape, at)) is not None:
            return maxmin
        if not deps:
            key = (id(eqn), tuple(id(v) for v in vals))
            if key not in self._const_cache:
                self._const_cache[key] = (vals, _evaluate(eqn, vals))
            return self._const_cache[key][1]
        for i, d in enumerate(vals):
            if isinstance(d, _Ref) and d.pending is not None:
                if not (name == "mul" and _is_silu(vals)):
                    vals[i] = self._materialise(d)
        body = call_body(eqn)
        if body is not None:
            inner, inner_consts = body
            label = eqn.params.get("name", name)
            return self._walk(inner, inner_consts, vals, f"{name}[{label}] at {at}", frame)
        if not all(jnp.issubdtype(o.aval.dtype, jnp.floating) for o in eqn.outvars):
            return [
                _Blocked(f"`{name}` gives a non-float, input-dependent value at {at}")
                for _ in eqn.outvars
            ]
        try:
            return self.rules.get(name, self.default)(self, frame, eqn, vals, at)
        except Unsupported as exc:
            return [_Blocked(str(exc)) for _ in eqn.outvars]

    @staticmethod
    def _linear_ok(name, vals, at) -> None:
        dep = [isinstance(v, _Ref) for v in vals]
        ok = True
        if name in ("mul", "dot_general"):
            ok = sum(dep) == 1
        elif name == "div":
            ok = not dep[1]
        elif name == "conv_general_dilated":
            ok = not dep[1]
        elif name == "select_n":
            ok = not dep[0]
        elif name in ("gather", "dynamic_slice"):
            ok = not any(dep[1:])
        elif name == "dynamic_update_slice":
            ok = not any(dep[2:])
        if not ok:
            raise Unsupported(f"`{name}` is not affine in its input-dependent operands at {at}")

    # ---------------------------------------------------------------------------- replay
    def apply(self, x, es):
        """``(us, out)``: the nonlinearities' inputs and the flattened outputs (float64)."""
        env = {self.x_ref.id: x}
        us = _replay(self.ops, self.nodes, env, dict(enumerate(es)))
        out = jnp.concatenate([jnp.ravel(env[o.id]) for o in self.out_refs])
        return [us[j] for j in range(len(self.nodes))], out

    def cuts(self) -> list[int]:
        """Nodes ``c`` whose output ``v_c`` is the only input-dependent value the rest of the
        program reads (a residual block's last activation): ``[]`` if none."""
        last_use: dict[int, int] = {}
        define: dict[int, int] = {self.x_ref.id: -1}
        for p, op in enumerate(self.ops):
            ins = [op[2]] if op[0] == "node" else [v for v in op[2] if isinstance(v, _Ref)]
            for v in ins:
                last_use[v.id] = p
            outs = [op[3]] if op[0] == "node" else op[3]
            for o in outs:
                define[o.id] = p
        for o in self.out_refs:
            last_use[o.id] = len(self.ops)
        cuts = []
        for p, op in enumerate(self.ops):
            if op[0] != "node":
                continue
            live = [r for r, d in define.items() if d < p and last_use.get(r, -2) > p]
            if not live:
                cuts.append(op[1])
        return cuts


def _is_silu(vals) -> bool:
    a, b = vals
    return (
        isinstance(a, _Ref)
        and isinstance(b, _Ref)
        and (
            (b.pending is not None and b.pending[0] == "logistic" and b.pending[1] is a)
            or (a.pending is not None and a.pending[0] == "logistic" and a.pending[1] is b)
        )
    )


def _srcs(vals) -> frozenset:
    return frozenset().union(*[d.srcs for d in vals if isinstance(d, _Ref)])


def _mul(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    """SiLU ``u·logistic(u)`` as one node; a product with a constant is linear."""
    shape = tuple(eqn.outvars[0].aval.shape)
    if sum(isinstance(v, _Ref) for v in vals) == 2:
        if _is_silu(vals):
            a, b = vals
            base = a if (b.pending is not None and b.pending[1] is a) else b
            if base.shape == shape:
                return net._node("silu", SILU_SLOPES, base, shape, at)
        raise Unsupported(f"mul of two input-dependent values at {at}")
    return _linear(net, frame, eqn, vals, at)


def _logistic(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    """Deferred when only SiLU products read it (:func:`_mul`), else an activation."""
    shape = tuple(eqn.outvars[0].aval.shape)
    (u,) = vals
    consumers = frame.consumers.get(eqn.outvars[0], [])
    if (
        consumers
        and eqn.outvars[0] not in frame.jaxpr.outvars
        and all(c.primitive.name == "mul" and eqn.invars[0] in c.invars for c in consumers)
    ):
        return net._new(shape, _srcs(vals), pending=("logistic", u))
    return _activation(net, frame, eqn, vals, at)


def _activation(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    """An elementwise activation with slopes :data:`_SLOPES` on its input-dependent operand."""
    name = eqn.primitive.name
    shape = tuple(eqn.outvars[0].aval.shape)
    if name == "clamp":
        lo, u, hi = vals
        if isinstance(lo, _Ref) or isinstance(hi, _Ref):
            raise Unsupported(f"clamp with input-dependent limits at {at}")
    elif name in ("max", "min"):
        deps = [v for v in vals if isinstance(v, _Ref)]
        if len(deps) != 1:
            raise Unsupported(f"`{name}` of two input-dependent values at {at}")
        u = deps[0]
    else:
        u = vals[0]
    if u.shape != shape:
        raise Unsupported(f"`{name}` broadcasting its input-dependent operand at {at}")
    return net._node(name, _SLOPES[name], u, shape, at)


def _max_pool(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    p = eqn.params
    lip = _windows.max_pool_lipschitz(
        vals[0].shape,
        p["window_dimensions"],
        p["window_strides"],
        p["padding"],
        p["window_dilation"],
        p["base_dilation"],
    )
    return net._node("max_pool", (-lip, lip), vals[0], tuple(eqn.outvars[0].aval.shape), at)


def _reduce_extreme(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    name = eqn.primitive.name
    shape = tuple(eqn.outvars[0].aval.shape)
    (u,) = vals
    axes = tuple(int(a) for a in eqn.params["axes"])
    if math.prod(u.shape[a] for a in axes) >= 2:
        # Deferred: a MaxMin concatenation reads it as half of one node (_maxmin).
        return net._new(shape, _srcs(vals), pending=(name, u, axes, at))
    return net._node(name, (-1.0, 1.0), u, shape, at)


def _sort(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    if len(vals) != 1:
        raise Unsupported(f"`sort` of several operands (argsort) at {at}")
    shape = tuple(eqn.outvars[0].aval.shape)
    return [net._node("sort", (-SORTING_LIPSCHITZ, SORTING_LIPSCHITZ), vals[0], shape, at)]


def _linear(net: LinearisedNetwork, frame: Frame, eqn, vals: list, at: str):
    """Every other primitive: an affine op of :data:`_LINEAR` recorded for the replay."""
    name = eqn.primitive.name
    if name not in _LINEAR:
        raise Unsupported(f"`{name}` of an input-dependent value at {at}")
    net._linear_ok(name, vals, at)
    outs = [net._new(o.aval.shape, _srcs(vals)) for o in eqn.outvars]
    net.ops.append(("lin", eqn, vals, outs))
    return outs


#: The linearisation's rule table: ``rule(net, frame, eqn, vals, at)`` per recognised
#: nonlinearity (raising :class:`Unsupported` where it does not apply); anything else goes to
#: :func:`_linear`.
RULES = {
    "mul": _mul,
    "logistic": _logistic,
    **{name: _activation for name in _SLOPES if name != "logistic"},
    "reduce_window_max": _max_pool,
    "reduce_window_min": _max_pool,
    "reduce_max": _reduce_extreme,
    "reduce_min": _reduce_extreme,
    "sort": _sort,
}


def _cast(v):
    a = np.asarray(v)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a.astype(np.float64)
    return v


def _replay(ops, nodes, env, es, consts=None, stop_node=None) -> dict:
    """Runs ``ops`` (``env``: ref id -> value, updated; ``es``: node -> ``e``); ``consts``: the
    constant operands in order of appearance (``None``: those stored in the ops). Returns
    ``{node: u}``; stops at ``stop_node``'s input."""
    us = {}
    it = iter(consts) if consts is not None else None
    for op in ops:
        if op[0] == "node":
            _, j, u, out = op
            node = nodes[j]
            uval = env[u.id]
            us[j] = uval
            if j == stop_node:
                break
            env[out.id] = (node.m * uval if node.m != 0 else 0.0) + node.r * es[j]
            continue
        _, eqn, vals, outs = op
        name = eqn.primitive.name
        args = [
            env[v.id] if isinstance(v, _Ref) else (next(it) if it is not None else _cast(v))
            for v in vals
        ]
        if name in ("convert_element_type", "reduce_precision"):
            res = [args[0]]
        else:
            params = dict(eqn.params)
            if "preferred_element_type" in params:
                params["preferred_element_type"] = None
            res = bind_eqn(eqn, args, params)
        for o, r in zip(outs, res):
            env[o.id] = r
    return us


@dataclasses.dataclass
class _Window:
    """The program from a cut's output ``v_c`` (or ``x``) to the next cut's input (or the
    outputs): sources ``[v_c, e_j...]``, targets ``[u_k..., (out)]``."""

    ops: list
    in_ref: _Ref
    e_nodes: list[int]
    targets: list[int]  # node indices; -1: the network output
    consts: list
    stop: int | None

    def signature(self, net) -> tuple:
        rel: dict[int, int] = {self.in_ref.id: 0}

        def r(v):
            return rel.setdefault(v.id, len(rel))

        sig = []
        for op in self.ops:
            if op[0] == "node":
                node = net.nodes[op[1]]
                sig.append(("node", r(op[2]), r(op[3]), node.m, node.r, node.out_shape))
            else:
                _, eqn, vals, outs = op
                ins = tuple(
                    r(v) if isinstance(v, _Ref) else ("c", np.shape(v), str(np.asarray(v).dtype))
                    for v in vals
                )
                sig.append((eqn.primitive.name, repr(eqn.params), ins, tuple(r(o) for o in outs)))
        outs = tuple(r(o) for o in net.out_refs) if -1 in self.targets else ()
        return (tuple(sig), self.stop is not None, outs, self.in_ref.shape)


def _split_windows(net: LinearisedNetwork, cuts: list[int]) -> list[_Window]:
    positions = {op[1]: p for p, op in enumerate(net.ops) if op[0] == "node"}
    bounds = [(None, net.x_ref)] + [(c, net.ops[positions[c]][3]) for c in cuts]
    out = []
    for i, (c, in_ref) in enumerate(bounds):
        lo = 0 if c is None else positions[c] + 1
        nxt = cuts[i] if i < len(cuts) else None
        hi = positions[nxt] + 1 if nxt is not None else len(net.ops)
        ops = net.ops[lo:hi]
        inner = [op[1] for op in ops if op[0] == "node" and op[1] != nxt]
        targets = inner + ([nxt] if nxt is not None else [-1])
        consts = [
            _cast(v) for op in ops if op[0] == "lin" for v in op[2] if not isinstance(v, _Ref)
        ]
        out.append(_Window(ops, in_ref, inner, targets, consts, nxt))
    return out


def _sizes(shapes) -> list[int]:
    return [math.prod(s) for s in shapes]


def _window_functions(win: _Window, net: LinearisedNetwork):
    """``(cols, gram, S, t_sizes, s_sizes)`` for a window: ``cols(basis, consts)`` the window's
    Jacobian applied to a batch of source vectors, ``gram(v, row_mask, consts)`` =
    ``Tᵀ (mask * T v)``. Compiled once per window structure (the constants are arguments)."""
    nodes = net.nodes
    ops, in_ref, e_nodes, targets, stop = win.ops, win.in_ref, win.e_nodes, win.targets, win.stop
    out_refs = net.out_refs
    s_shapes = [in_ref.shape] + [nodes[j].out_shape for j in e_nodes]
    s_sizes = _sizes(s_shapes)
    s_off = np.concatenate([[0], np.cumsum(s_sizes)]).astype(int)
    t_sizes = [
        math.prod(nodes[k].in_shape) if k != -1 else sum(math.prod(o.shape) for o in out_refs)
        for k in targets
    ]
    S = int(s_off[-1])

    def f(s, consts):
        env = {in_ref.id: s[: s_sizes[0]].reshape(s_shapes[0])}
        es = {
            j: s[s_off[i + 1] : s_off[i + 2]].reshape(s_shapes[i + 1])
            for i, j in enumerate(e_nodes)
        }
        us = _replay(ops, nodes, env, es, consts, stop)
        parts = [jnp.ravel(us[k]) for k in targets if k != -1]
        if -1 in targets:
            parts += [jnp.ravel(env[o.id]) for o in out_refs]
        return jnp.concatenate(parts)

    def lin(ds, consts):
        zero = jnp.zeros(S, jnp.float64)
        return jax.jvp(lambda s: f(s, consts), (zero,), (ds,))[1]

    def gram(v, mask, consts):
        zero = jnp.zeros(S, jnp.float64)
        (back,) = jax.linear_transpose(lambda d: lin(d, consts), zero)(lin(v, consts) * mask)
        return back

    def lanczos_all(v0s, row_masks, col_masks, consts, steps):
        def one(v0, rm, cm):
            return _composite.lanczos_tridiagonal(
                lambda v: cm * gram(cm * v, rm, consts), v0 * cm, steps
            )

        return jax.vmap(one)(v0s, row_masks, col_masks)

    cols = jax.jit(jax.vmap(lin, in_axes=(0, None)))
    return cols, _compiled_cache(lanczos_all), S, t_sizes, s_sizes


def _compiled_cache(fn):
    """``fn`` jitted (``steps`` static), compiled with the lower bound's cheaper CPU options."""
    jitted = jax.jit(fn, static_argnums=(4,))
    compiled = {}

    def call(*args):
        key = (args[4],) + tuple((np.shape(a), str(np.asarray(a).dtype)) for a in args[:3])
        if key not in compiled:
            lowered = jitted.lower(*args)
            try:
                if jax.default_backend() == "cpu":
                    compiled[key] = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
                else:
                    compiled[key] = lowered.compile()
            except Exception:  # noqa: BLE001 - an XLA build without these options
                compiled[key] = lowered.compile()
        return compiled[key](*args[:4])

    return call


def _dense_columns(cols, consts, S, lo, n, chunk=256) -> np.ndarray:
    """``T[:, lo:lo + n]`` (float64) from the batched Jacobian-vector product ``cols``."""
    blocks = []
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        basis = np.zeros((chunk, S))
        basis[np.arange(len(idx)), lo + idx] = 1.0
        blocks.append(np.asarray(cols(jnp.asarray(basis), consts))[: len(idx)])
    return np.concatenate(blocks, axis=0).T


def _windowed_bound(
    net, cuts, *, delta, max_dense_entries, max_work, lanczos_steps, seed, grouped_norms=True
):
    """The dynamic program restarted at each cut ``c`` from ``L(v_c) <= (|m_c| + r_c) L(u_c)``:
    ``L(u_k) <= ||∂u_k/∂v_c|| L(v_c) + Σ_{c<j<k} ||∂u_k/∂e_j|| L(u_j)`` inside each window."""
    windows = _split_windows(net, cuts)
    plans = []
    cache: dict = {}
    n_lanczos = 0
    for win in windows:
        key = win.signature(net)
        if key not in cache:
            cache[key] = _window_functions(win, net)
        cols, lanczos, S, t_sizes, s_sizes = cache[key]
        t_srcs = [net.node_in[k].srcs if k != -1 else net.out_srcs for k in win.targets]
        in_id = 0 if win.stop is None and win is windows[0] else None
        pairs = []
        for ti in range(len(win.targets)):
            pairs.append((ti, 0))
            for si, j in enumerate(win.e_nodes):
                if j + 1 in t_srcs[ti]:
                    pairs.append((ti, si + 1))
        dense = S * sum(t_sizes) <= max_dense_entries
        if not dense:
            n_lanczos += len(pairs)
        plans.append((win, cols, lanczos, S, t_sizes, s_sizes, pairs, dense))
        del in_id
    if n_lanczos * lanczos_steps > max_work:
        raise _TooBig(
            f"{n_lanczos} norms need Lanczos ({n_lanczos * lanczos_steps} > max_work={max_work} "
            "network-window evaluations)"
        )
    delta_i = delta / max(n_lanczos, 1)
    lips: dict[int, float] = {}
    all_norms = []
    blocks = []
    l_in = 1.0
    for win, cols, lanczos, S, t_sizes, s_sizes, pairs, dense in plans:
        consts = [jnp.asarray(c) for c in win.consts]
        s_off = np.concatenate([[0], np.cumsum(s_sizes)]).astype(int)
        t_off = np.concatenate([[0], np.cumsum(t_sizes)]).astype(int)
        T = int(t_off[-1])
        norms = {}
        mats = {}
        if dense:
            for si in range(len(s_sizes)):
                mat = _dense_columns(cols, consts, S, int(s_off[si]), s_sizes[si])
                for ti, sj in pairs:
                    if sj == si:
                        mats[(ti, si)] = mat[t_off[ti] : t_off[ti + 1]]
                        norms[(ti, si)] = _composite.dense_norm_upper(mats[(ti, si)])
        else:
            rng = np.random.default_rng(seed + len(all_norms))
            v0s = np.zeros((len(pairs), S))
            rms = np.zeros((len(pairs), T))
            cms = np.zeros((len(pairs), S))
            for p, (ti, si) in enumerate(pairs):
                lo, hi = int(s_off[si]), int(s_off[si + 1])
                v0s[p, lo:hi] = rng.standard_normal(hi - lo)
                cms[p, lo:hi] = 1.0
                rms[p, t_off[ti] : t_off[ti + 1]] = 1.0
            alphas, betas = lanczos(v0s, rms, cms, consts, lanczos_steps)
            alphas, betas = np.asarray(alphas), np.asarray(betas)
            for p, (ti, si) in enumerate(pairs):
                norms[(ti, si)] = _composite.kw_upper_from_tridiagonal(
                    alphas[p], betas[p], s_sizes[si], delta=delta_i
                )
        all_norms += list(norms.values())
        for ti, k in enumerate(win.targets):
            terms = [(si, nb) for (tj, si), nb in norms.items() if tj == ti]
            total = 0.0
            for si, nb in terms:
                total += nb.upper * (l_in if si == 0 else lips[win.e_nodes[si - 1]])
            total *= 1 + 1e-12 * (len(terms) + 1)
            grouped = None
            if grouped_norms and len(terms) > 1 and all((ti, si) in mats for si, _ in terms):
                grouped = _composite.grouped_norm_upper(
                    [mats[(ti, si)] for si, _ in terms],
                    [l_in if si == 0 else lips[win.e_nodes[si - 1]] for si, _ in terms],
                )
                if grouped.upper * (1 + 1e-12) < total:
                    total = grouped.upper * (1 + 1e-12)
                else:
                    grouped = None
            lips[k] = total
            blocks.append(
                {
                    "target": "output" if k == -1 else f"input of {net.nodes[k].kind} #{k}",
                    "where": None if k == -1 else net.nodes[k].where,
                    "bound": total,
                    "rule": (
                        f"midpoint in a window, grouped (dense {grouped.upper:.4g}; the sum "
                        "of the terms is larger): "
                        if grouped is not None
                        else "midpoint in a window: "
                    )
                    + "||∂u/∂v_in|| L(v_in) + Σ ||∂u/∂e_j|| L(u_j) "
                    + f"(L(v_in) = {l_in:.4g}) over "
                    + ", ".join(
                        ("v_in" if si == 0 else f"e{win.e_nodes[si - 1]}")
                        + f" ({nb.method} {nb.upper:.4g})"
                        for si, nb in terms
                    ),
                    "kind": "probabilistic"
                    if any(nb.kind == "probabilistic" for _, nb in terms)
                    else "proven",
                }
            )
        if win.stop is not None:
            node = net.nodes[win.stop]
            l_in = (abs(node.m) + node.r) * lips[win.stop]
    return lips[-1], all_norms, blocks, len(windows)


class _TooBig(Exception):
    pass


@dataclasses.dataclass
class TightBound:
    """The result of :func:`midpoint_bound`."""

    upper: float | None
    kind: str | None
    delta: float
    note: str
    blocks: list[dict]
    num_nodes: int
    num_norms: int
    seconds: float


def midpoint_bound(
    closed,
    leaf_values,
    x_shape,
    *,
    delta: float = DEFAULT_DELTA,
    max_dense_entries: int = MAX_DENSE_ENTRIES,
    max_work: int | None = DEFAULT_MAX_WORK,
    lanczos_steps: int = 60,
    seed: int = 0,
    windows: bool | None = None,
    grouped_norms: bool = True,
) -> TightBound:
    """Sound ℓ2 Lipschitz upper bound of ``closed(leaves, x)`` w.r.t. ``x``: see the module.

    Args:
      closed: the traced network ``jax.make_jaxpr(fn)(leaves, x)``.
      leaf_values: its params leaves.
      x_shape: the input's shape (a batch of 1).
      delta: total failure probability of the probabilistic norms (split equally).
      max_dense_entries: source blocks whose Jacobian columns (all targets x the block's
        dimension) have at most this many entries are formed densely (proven norms).
      max_work: skip (``upper=None``) when the Lanczos norms would need more than this many
        network evaluations.
      lanczos_steps: Lanczos steps per probabilistic norm.
      seed: Lanczos start vectors.
      windows: restart the dynamic program at every cut (an activation that every later value
        goes through: fewer, smaller norms, a looser bound); ``None``: only when some source's
        Jacobian is too big to form densely.
      grouped_norms: where all the norms of a target are dense, also bound the target's
        ``||∂u_k/∂x Δx + Σ_j ∂u_k/∂e_j Δe_j||`` (``||Δe_j|| <= L(u_j) ||Δx||``) by one norm
        (:func:`spectra._composite.grouped_norm_upper`) and keep the smaller of it and the sum.

    Returns:
      :class:`TightBound` (``upper`` ``None`` with the reason in ``note`` when unavailable).
    """
    t0 = time.perf_counter()
    if max_work is None:
        max_work = CPU_MAX_WORK if jax.default_backend() == "cpu" else ACCELERATOR_MAX_WORK
    try:
        net = LinearisedNetwork(closed, leaf_values, x_shape)
    except Unsupported as exc:
        return TightBound(None, None, 0.0, f"midpoint bound unavailable: {exc}", [], 0, 0, 0.0)
    if not net.out_refs:
        return TightBound(
            0.0,
            "proven",
            0.0,
            "the outputs do not depend on the input",
            [],
            0,
            0,
            time.perf_counter() - t0,
        )
    nodes = net.nodes
    src_shapes = [tuple(x_shape)] + [n.out_shape for n in nodes]
    tgt_shapes = [n.in_shape for n in nodes]
    src_sizes = _sizes(src_shapes)
    tgt_sizes = _sizes(tgt_shapes) + [sum(math.prod(o.shape) for o in net.out_refs)]
    tgt_srcs = [u.srcs for u in net.node_in] + [net.out_srcs]
    s_off = np.concatenate([[0], np.cumsum(src_sizes)])
    t_off = np.concatenate([[0], np.cumsum(tgt_sizes)])
    S, T = int(s_off[-1]), int(t_off[-1])
    pairs = [(k, j) for k in range(len(tgt_sizes)) for j in sorted(tgt_srcs[k])]

    with jax.enable_x64(True):

        def flat(s):
            x = s[: src_sizes[0]].reshape(src_shapes[0])
            es = [
                s[s_off[j + 1] : s_off[j + 2]].reshape(src_shapes[j + 1]) for j in range(len(nodes))
            ]
            us, out = net.apply(x, es)
            return jnp.concatenate([jnp.ravel(u) for u in us] + [out])

        zero = jnp.zeros(S, jnp.float64)

        def lin(ds):
            return jax.jvp(flat, (zero,), (ds,))[1]

        dense_js = {j for j in range(len(src_sizes)) if T * src_sizes[j] <= max_dense_entries}
        if windows or (windows is None and len(dense_js) < len(src_sizes)):
            cuts = net.cuts()
            try:
                upper, all_norms, blocks, n_windows = _windowed_bound(
                    net,
                    cuts,
                    delta=delta,
                    max_dense_entries=max_dense_entries,
                    max_work=max_work,
                    lanczos_steps=lanczos_steps,
                    seed=seed,
                    grouped_norms=grouped_norms,
                )
            except _TooBig as exc:
                return TightBound(
                    None,
                    None,
                    0.0,
                    f"midpoint bound skipped: {exc}",
                    [],
                    len(nodes),
                    0,
                    time.perf_counter() - t0,
                )
            probabilistic = [nb for nb in all_norms if nb.kind == "probabilistic"]
            note = (
                f"midpoint (LipLT) dynamic program over {len(nodes)} nonlinearities in "
                f"{n_windows} windows between cuts, {len(all_norms)} norms of linear maps "
                f"({len(all_norms) - len(probabilistic)} dense proven, {len(probabilistic)} "
                f"Lanczos probabilistic)"
            )
            return TightBound(
                upper,
                "probabilistic" if probabilistic else "proven",
                float(sum(nb.delta for nb in probabilistic)),
                note,
                blocks,
                len(nodes),
                len(all_norms),
                time.perf_counter() - t0,
            )
        norms: dict[tuple[int, int], _composite.NormBound] = {}
        mats: dict[tuple[int, int], np.ndarray] = {}
        if dense_js:
            chunk = 256
            cols_fn = jax.jit(jax.vmap(lin))
            for j in sorted(dense_js):
                lo, n_j = int(s_off[j]), src_sizes[j]
                blocks = []
                for start in range(0, n_j, chunk):
                    idx = np.arange(start, min(start + chunk, n_j))
                    basis = np.zeros((chunk, S))
                    basis[np.arange(len(idx)), lo + idx] = 1.0
                    blocks.append(np.asarray(cols_fn(jnp.asarray(basis)))[: len(idx)])
                cols = np.concatenate(blocks, axis=0).T  # (T, n_j)
                for k, jj in pairs:
                    if jj == j:
                        mats[(k, j)] = cols[t_off[k] : t_off[k + 1]]
                        norms[(k, j)] = _composite.dense_norm_upper(mats[(k, j)])
    # The dynamic program.
    lips: list[float] = []
    blocks = []
    for k in range(len(tgt_sizes)):
        total = 0.0
        terms = []
        for j in sorted(tgt_srcs[k]):
            nb = norms[(k, j)]
            factor = 1.0 if j == 0 else lips[j - 1]
            total += nb.upper * factor
            terms.append((j, nb))
        total *= 1 + 1e-12 * (len(terms) + 1)
        grouped = None
        if grouped_norms and len(terms) > 1 and all((k, j) in mats for j, _ in terms):
            grouped = _composite.grouped_norm_upper(
                [mats[(k, j)] for j, _ in terms], [1.0 if j == 0 else lips[j - 1] for j, _ in terms]
            )
            grouped_total = grouped.upper * (1 + 1e-12)
            if grouped_total < total:
                total = grouped_total
            else:
                grouped = None
        lips.append(total)
        label = "output" if k == len(nodes) else f"input of {nodes[k].kind} #{k}"
        blocks.append(
            {
                "target": label,
                "where": None if k == len(nodes) else nodes[k].where,
                "bound": total,
                "rule": (
                    "midpoint, grouped: ||[∂u/∂x, ∂u/∂e_j L(u_j)]_j / sqrt(p_j)|| "
                    f"(dense {grouped.upper:.4g}; the sum of the terms is larger) over "
                    if grouped is not None
                    else "midpoint: ||∂u/∂x|| + Σ_j ||∂u/∂e_j|| L(u_j) over "
                )
                + ", ".join(
                    ("x" if j == 0 else f"e{j - 1}") + f" ({nb.method} {nb.upper:.4g})"
                    for j, nb in terms
                ),
                "kind": "probabilistic"
                if any(nb.kind == "probabilistic" for _, nb in terms)
                else "proven",
            }
        )
    probabilistic = [nb for nb in norms.values() if nb.kind == "probabilistic"]
    kind = "probabilistic" if probabilistic else "proven"
    total_delta = float(sum(nb.delta for nb in probabilistic))
    note = (
        f"midpoint (LipLT) dynamic program over {len(nodes)} nonlinearities, "
        f"{len(norms)} norms of linear maps ({len(norms) - len(probabilistic)} dense proven, "
        f"{len(probabilistic)} Lanczos probabilistic)"
    )
    return TightBound(
        lips[-1],
        kind,
        total_delta,
        note,
        blocks,
        len(nodes),
        len(norms),
        time.perf_counter() - t0,
    )


def network_upper_fields(
    closed, leaf_values, x_shape, naive: float | None, *, enabled: bool = True, **kwargs
) -> dict[str, Any]:
    """The ``network`` fields of the upper bound: the tightest of the composition (``naive``)
    and :func:`midpoint_bound`, with its kind, failure probability and per-block bounds.

    Returns:
      ``lipschitz_upper`` (the smaller sound bound, ``None`` if neither is available),
      ``lipschitz_upper_naive`` (the composition: product of the layer norms),
      ``lipschitz_upper_tight`` (the midpoint bound or ``None``), ``lipschitz_upper_tight_note``,
      ``lipschitz_upper_method`` (``'midpoint'`` or ``'composition'``),
      ``lipschitz_upper_kind`` (``'proven'`` or ``'probabilistic'``),
      ``lipschitz_upper_delta`` (failure probability of ``lipschitz_upper``; 0 when proven),
      ``lipschitz_upper_factor`` (naive / upper), ``blocks`` (each target's bound and rule),
      ``seconds``.
    """
    if enabled:
        try:
            tight = midpoint_bound(closed, leaf_values, x_shape, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never lose the composition bound
            tight = TightBound(None, None, 0.0, f"midpoint bound failed: {exc!r}", [], 0, 0, 0.0)
    else:
        tight = TightBound(None, None, 0.0, "midpoint bound not computed", [], 0, 0, 0.0)
    use_tight = tight.upper is not None and (naive is None or tight.upper < naive)
    upper = tight.upper if use_tight else naive
    return {
        "lipschitz_upper": upper,
        "lipschitz_upper_naive": naive,
        "lipschitz_upper_tight": tight.upper,
        "lipschitz_upper_tight_note": tight.note,
        "lipschitz_upper_method": "midpoint" if use_tight else "composition",
        "lipschitz_upper_kind": (tight.kind if use_tight else "proven")
        if upper is not None
        else None,
        "lipschitz_upper_delta": tight.delta if use_tight else 0.0,
        "lipschitz_upper_factor": (naive / upper) if (use_tight and naive is not None) else 1.0,
        "blocks": tight.blocks,
        "seconds": tight.seconds,
    }
