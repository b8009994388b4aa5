"""One walker over (nested) jaxprs with per-primitive rules in a table.

Every analysis of a traced model in :mod:`train` (conv discovery :func:`train.find_convs`, MAC
counting :func:`train.flops.count_flops`, the report's Lipschitz composition and its
linearised network) runs an *environment* (a value per jaxpr variable: an origin, a taint
flag, a concrete array or a Lipschitz bound) through the equations of a jaxpr. This module
holds what they share, as jax's own interpreters do (``ad.primitive_jvps``,
``batching.primitive_batchers``: a dict from primitive to rule):

* :func:`is_var`, :func:`split_closed`, :func:`sub_jaxprs`, :func:`call_body`: reading jaxprs,
  their literals and the jaxprs nested in an equation's params (``pjit``/``jit``,
  ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``/``remat``, ``closed_call``,
  ``cond`` branches, ``scan``/``while`` bodies);
* :func:`bind_eqn`: evaluates one equation on concrete values;
* :class:`Walker`: runs an environment through a jaxpr, looking each equation's rule up in a
  ``{primitive name: rule}`` dict, with a ``default`` rule for every other primitive and a
  ``call`` hook for the primitives that call a nested jaxpr one to one (:func:`call_body`).

Nothing here is a bound or an approximation: the walker only routes values; each rule table
states what its values mean.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jex

#: Params under which a nested-call primitive keeps the jaxpr it calls with its own operands
#: (``pjit``: ``jaxpr``; ``custom_jvp_call``/``closed_call``: ``call_jaxpr``;
#: ``custom_vjp_call``: ``call_jaxpr`` or ``fun_jaxpr``; ``checkpoint``: ``jaxpr``).
CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
#: Loops: their body runs per slice / per iteration, so it is never a one-to-one call of the
#: equation's operands (walking it on the stacked operands would be wrong).
LOOP_PRIMITIVES = frozenset({"scan", "while"})


def is_var(x: Any) -> bool:
    """Whether an equation operand is a variable (``False`` for a ``jax.extend.core.Literal``)."""
    return not isinstance(x, jex.Literal)


def split_closed(jaxpr_like: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` (its consts) or of an open ``Jaxpr`` (``()``)."""
    if isinstance(jaxpr_like, jex.ClosedJaxpr):
        return jaxpr_like.jaxpr, jaxpr_like.consts
    return jaxpr_like, ()


def is_jaxpr(x: Any) -> bool:
    """Whether ``x`` is a ``ClosedJaxpr`` or a ``Jaxpr``."""
    return isinstance(x, (jex.ClosedJaxpr, jex.Jaxpr))


def sub_jaxprs(eqn: Any) -> list[tuple[Any, Sequence[Any]]]:
    """Every jaxpr nested in ``eqn``'s params (``cond`` branches included), as ``(jaxpr,
    consts)``, in params order."""
    subs = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if is_jaxpr(item):
                subs.append(split_closed(item))
    return subs


def call_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` that ``eqn`` calls with its own operands, one to one, else ``None``.

    The first of the params :data:`CALL_PARAMS` holding a jaxpr with as many invars as ``eqn``
    has operands (``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``,
    ``closed_call``). Never a loop (:data:`LOOP_PRIMITIVES`): a ``scan`` body has one invar
    per operand but runs on slices, so treating it as a call would be unsound.
    """
    if eqn.primitive.name in LOOP_PRIMITIVES:
        return None
    for key in CALL_PARAMS:
        sub = eqn.params.get(key)
        if not is_jaxpr(sub):
            continue
        jaxpr, consts = split_closed(sub)
        if len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


def bind_eqn(eqn: Any, vals: Sequence[Any], params: Mapping[str, Any] | None = None) -> list:
    """Binds ``eqn``'s primitive on ``vals`` (with ``params``, default the equation's): the list
    of its results (one entry for a single-result primitive)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # (subfuns, params) in this jax.
        subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *vals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def eval_eqn(eqn: Any, vals: Sequence[Any]) -> list:
    """:func:`bind_eqn` at trace time (``jax.ensure_compile_time_eval``): concrete results."""
    with jax.ensure_compile_time_eval():
        return bind_eqn(eqn, vals)


@dataclasses.dataclass(eq=False)
class Frame:
    """One (possibly nested) jaxpr being walked.

    Attributes:
      jaxpr: the open jaxpr.
      consts: the values of its constvars (as traced, not as the environment holds them).
      env: variable -> environment value.
      where: a label for notes (``'the network'``, ``'pjit[f] at eqn 3 ...'``).
      parent: the frame whose equation called this one (``None`` at the top).
      alias: inner invar -> ``(outer frame, outer var)`` where the inner invar is the same
        value as the outer one (the operands of a one-to-one call, a loop's constants).
      state: per-frame data of the walker that owns it.
      index: the index of the equation being walked.
    """

    jaxpr: Any
    consts: Sequence[Any]
    env: dict
    where: str = "the program"
    parent: Frame | None = None
    alias: dict = dataclasses.field(default_factory=dict)
    state: Any = None
    index: int = -1

    @functools.cached_property
    def const_map(self) -> dict:
        """constvar -> its traced value."""
        return dict(zip(self.jaxpr.constvars, self.consts))

    @functools.cached_property
    def producers(self) -> dict:
        """var -> index of the equation that defines it."""
        return {v: i for i, eqn in enumerate(self.jaxpr.eqns) for v in eqn.outvars}

    @functools.cached_property
    def consumers(self) -> dict:
        """var -> the equations that read it, in order."""
        uses: dict = {}
        for eqn in self.jaxpr.eqns:
            for v in eqn.invars:
                if is_var(v):
                    uses.setdefault(v, []).append(eqn)
        return uses


#: ``rule(walker, frame, eqn, vals) -> outs``: the environment values of ``eqn``'s outvars (a
#: list, or one value for a single-result primitive) from those of its operands ``vals``.
Rule = Callable[["Walker", Frame, Any, list], Any]
#: ``call(walker, frame, eqn, vals, (jaxpr, consts)) -> outs`` for a one-to-one nested call.
CallRule = Callable[["Walker", Frame, Any, list, tuple], Any]


class Walker:
    """Runs an environment through a jaxpr: ``rules[name]`` (else ``default``) per equation.

    Args:
      rules: primitive name -> :data:`Rule`.
      default: the rule of every primitive not in ``rules``.
      call: the rule of an equation with a :func:`call_body` (nested ``jit``, ``custom_jvp``,
        ...) when its name is not in ``rules``; ``None``: such equations go to ``default``.
      missing: the value of a variable not in the environment.
      literal: ``literal(lit)`` -> the environment value of a literal operand (default: its
        value).

    Subclasses may override :meth:`step` to look at an equation before its rule.
    """

    def __init__(
        self,
        rules: Mapping[str, Rule],
        default: Rule,
        *,
        call: CallRule | None = None,
        missing: Any = None,
        literal: Callable[[Any], Any] | None = None,
    ):
        self.rules = rules
        self.default = default
        self.call_rule = call
        self.missing = missing
        self.literal = literal if literal is not None else (lambda lit: lit.val)

    def read(self, frame: Frame, v: Any) -> Any:
        """The environment value of an operand (:attr:`literal` of a literal)."""
        if not is_var(v):
            return self.literal(v)
        return frame.env.get(v, self.missing)

    def run(
        self,
        jaxpr: Any,
        invals: Sequence[Any],
        *,
        consts: Sequence[Any] = (),
        constvals: Sequence[Any] | None = None,
        where: str = "the program",
        parent: Frame | None = None,
        alias: dict | None = None,
        state: Any = None,
    ) -> list:
        """Walks ``jaxpr`` with ``invals`` on its invars and ``constvals`` (default ``consts``)
        on its constvars; returns the environment values of its outvars."""
        env = dict(zip(jaxpr.constvars, consts if constvals is None else constvals))
        env.update(zip(jaxpr.invars, invals))
        frame = Frame(jaxpr, consts, env, where, parent, alias or {}, state)
        for index, eqn in enumerate(jaxpr.eqns):
            frame.index = index
            vals = [self.read(frame, v) for v in eqn.invars]
            outs = self.step(frame, eqn, vals)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            env.update(zip(eqn.outvars, outs))
        return [self.read(frame, v) for v in jaxpr.outvars]

    def step(self, frame: Frame, eqn: Any, vals: list) -> Any:
        """The outputs of one equation: its table rule, else the call hook, else the default."""
        rule = self.rules.get(eqn.primitive.name)
        if rule is not None:
            return rule(self, frame, eqn, vals)
        if self.call_rule is not None:
            body = call_body(eqn)
            if body is not None:
                return self.call_rule(self, frame, eqn, vals, body)
        return self.default(self, frame, eqn, vals)

    def call(
        self,
        frame: Frame,
        sub: tuple[Any, Sequence[Any]],
        outer: Sequence[Any],
        invals: Sequence[Any],
        *,
        mapped: int | None = None,
        constvals: Sequence[Any] | None = None,
        where: str | None = None,
        state: Any = None,
    ) -> list:
        """Walks the nested ``sub = (jaxpr, consts)`` from ``frame``: ``invals`` on its invars,
        the first ``mapped`` (default all) of which are the outer operands ``outer`` (aliased)."""
        jaxpr, consts = sub
        n = len(jaxpr.invars) if mapped is None else mapped
        alias = {
            inner: (frame, o) for inner, o in zip(jaxpr.invars[:n], outer[:n]) if is_var(o)
        }
        return self.run(
            jaxpr,
            invals,
            consts=consts,
            constvals=constvals,
            where=frame.where if where is None else where,
            parent=frame,
            alias=alias,
            state=state,
        )

    def eqn_label(self, frame: Frame, eqn: Any) -> str:
        """``"eqn <i> (`<name>`) in <where>"``: where an equation is, for notes."""
        return f"eqn {frame.index} (`{eqn.primitive.name}`) in {frame.where}"
