"""Softmax recognised in a jaxpr (:func:`softmax_patterns`), for the Lipschitz rules."""

from __future__ import annotations

from typing import Any

import numpy as np

from train._jaxpr import is_var


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
        while is_var(v) and v in producer and producer[v].primitive.name in names:
            v = producer[v].invars[0]
        return v

    def varies_along(v, axes, ndim) -> bool | None:
        """Whether ``v`` (broadcast to rank ``ndim``) may vary along ``axes``."""
        shape = tuple(getattr(getattr(v, "aval", None), "shape", np.shape(v)))
        while is_var(v) and v in producer:
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
        if eqn.primitive.name != "div" or not all(is_var(v) for v in eqn.invars):
            continue
        g, s = eqn.invars
        exp = producer.get(g)
        if exp is None or exp.primitive.name != "exp" or not is_var(exp.invars[0]):
            continue
        source, sub = exp.invars[0], producer.get(exp.invars[0])
        total = producer.get(through(s, ("broadcast_in_dim", "reshape")))
        if total is None or total.primitive.name != "reduce_sum" or total.invars[0] is not g:
            continue
        axes = tuple(total.params["axes"])
        ndim = len(g.aval.shape)
        if s.aval.shape != g.aval.shape and varies_along(s, axes, ndim) is not False:
            continue
        if sub is not None and sub.primitive.name == "sub" and is_var(sub.invars[0]):
            if varies_along(sub.invars[1], axes, ndim) is False:
                source = sub.invars[0]  # exp(a - c) / sum exp(a - c) = softmax(a).
        out[index] = source
    return out
