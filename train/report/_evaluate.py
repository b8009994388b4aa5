"""Concrete evaluation of the input-independent equations of a traced network.

:func:`_evaluate` computes one equation on concrete operands: with NumPy for the primitives of
:data:`_NUMPY_PRIMITIVES` / :data:`_NUMPY_STRUCTURAL` (checked against the equation's shape
and dtype), else with JAX (:func:`train._jaxpr.eval_eqn`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from train._jaxpr import eval_eqn


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
    out = eval_eqn(eqn, vals)
    return [np.asarray(o) if hasattr(o, "shape") else o for o in out]
