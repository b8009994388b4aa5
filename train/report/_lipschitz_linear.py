r"""The linear rules of the report's Lipschitz composition (:mod:`train.report._lipschitz`).

Each rule maps the :class:`~train.report._lipschitz_values.Dep` values of an equation's
operands to that of its result, with a proven bound: conv (the layer's certified σ_max, a
following per-channel scale folded in), ``dot_general`` (exact SVD of the weight), sums over
axes (``sqrt(n)``), window sums (:func:`~train.report._conv_bounds.window_sum_bound`), gathers
with constant indices (``sqrt(max multiplicity)``), broadcasts (``sqrt(replication)``), sums
``L_a + L_b``, concatenations ``sqrt(Σ L_i²)`` (MaxMin: ``SORTING_LIPSCHITZ``), products and
quotients by constants (``max |c|``, ``1 / min |c|``). :data:`RULES` is their table.
"""

from __future__ import annotations

import math

import numpy as np

import spectra.numpy as snp
from spectra import ConvSpec
from train.report._conv_bounds import conv_eqn_bound
from train.report._conv_bounds import selection_counts
from train.report._conv_bounds import window_sum_bound
from train.report._lipschitz_nonlinear import _product
from train.report._lipschitz_values import SORTING_LIPSCHITZ
from train.report._lipschitz_values import ConvUse
from train.report._lipschitz_values import Dep
from train.report._lipschitz_values import _blocked
from train.report._lipschitz_values import _channel_vector
from train.report._lipschitz_values import _max_abs
from train.report._lipschitz_values import _origin
from train.report._lipschitz_values import _scalar


def _convert_element_type(comp, eqn, vals, shape, at):
    d = vals[0]
    return comp.out(shape, d.L, d.note, chain=d.chain, fold=d.fold, red=d.red)


def _broadcast_in_dim(comp, eqn, vals, shape, at):
    d = vals[0]
    if any(isinstance(v, Dep) for v in vals[1:]):
        return _blocked(shape, f"dynamic broadcast at {at}")
    factor = math.prod(shape) / max(math.prod(d.shape), 1)
    red = d.red if factor == 1 else None
    return comp.out(shape, comp.lip(d) * math.sqrt(factor), red=red)


def _concatenate(comp, eqn, vals, shape, at):
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
            total += (SORTING_LIPSCHITZ * comp.lip(d.red[0])) ** 2
        else:
            total += comp.lip(d) ** 2
    return comp.out(shape, math.sqrt(total))


def _split(comp, eqn, vals, shape, at):
    # Each output is a slice of the input along one axis: constant 1 each.
    d = vals[0]
    lip = comp.lip(d)
    return [comp.out(o.aval.shape, lip) for o in eqn.outvars]


def _binary_linear(comp, eqn, vals, shape, at, sign):
    a, b = vals
    if isinstance(a, Dep) and isinstance(b, Dep):
        return comp.out(shape, comp.broadcast_lip(a, shape) + comp.broadcast_lip(b, shape))
    d, c = (a, b) if isinstance(a, Dep) else (b, a)
    if d.shape != shape:
        return comp.out(shape, comp.broadcast_lip(d, shape))
    s = _scalar(c)
    if d is b and sign < 0:  # c - d
        return comp.out(shape, comp.lip(d), chain=comp.extend(d, ("mul", -1.0)))
    op = ("add", s * sign) if s is not None else None
    return Dep(shape, d.L, d.note, chain=comp.extend(d, op) if op else None, fold=d.fold)


def _add(comp, eqn, vals, shape, at):
    return _binary_linear(comp, eqn, vals, shape, at, 1.0)


def _sub(comp, eqn, vals, shape, at):
    return _binary_linear(comp, eqn, vals, shape, at, -1.0)


def _neg(comp, eqn, vals, shape, at):
    d = vals[0]
    return comp.out(shape, comp.lip(d), chain=comp.extend(d, ("mul", -1.0)))


def _mul(comp, eqn, vals, shape, at):
    a, b = vals
    if isinstance(a, Dep) and isinstance(b, Dep):
        return _product(comp, a, b, shape, at)
    d, c = (a, b) if isinstance(a, Dep) else (b, a)
    c = np.asarray(c)
    if d.shape != shape:
        return comp.out(shape, comp.broadcast_lip(d, shape) * _max_abs(c))
    s = _scalar(c)
    fold = _scaled_fold(comp, d, c, shape, np.multiply)
    return Dep(
        shape,
        d.L * _max_abs(c),
        chain=comp.extend(d, ("mul", s)) if s is not None else None,
        fold=fold,
    )


def _scaled_fold(comp, d: Dep, c, shape, combine) -> tuple | None:
    """``d``'s pending conv fold with its per-channel scale combined with the constant ``c``
    (``combine(scale, per_channel)``), or ``None`` after materialising ``d``'s fold when ``c``
    is not a per-channel vector on the folded axis (or ``d`` has no fold)."""
    if d.fold is not None and d.L is not None:
        leaf, l_in, scale, axis = d.fold
        per_channel = _channel_vector(c, len(shape), axis, scale.shape[0])
        if per_channel is not None:
            return (leaf, l_in, combine(scale, per_channel), axis)
    comp.materialise(d)
    return None


def _div(comp, eqn, vals, shape, at):
    a, b = vals
    if isinstance(b, Dep):
        return _blocked(shape, f"division by an input-dependent value at {at}")
    c = np.asarray(b, np.float64)
    if np.any(c == 0):
        return _blocked(shape, f"division by zero at {at}")
    if a.shape != shape:
        return comp.out(shape, comp.broadcast_lip(a, shape) / np.min(np.abs(c)))
    s = _scalar(c)
    fold = _scaled_fold(comp, a, c, shape, np.divide)
    return Dep(
        shape,
        a.L / float(np.min(np.abs(c))),
        chain=comp.extend(a, ("div", s)) if s is not None else None,
        fold=fold,
    )


def _reduce_sum(comp, eqn, vals, shape, at):
    d = vals[0]
    n = math.prod(d.shape) / max(math.prod(shape), 1)
    return comp.out(shape, comp.lip(d) * math.sqrt(n))


def _reduce_window_sum(comp, eqn, vals, shape, at):
    d = vals[0]
    return comp.out(shape, comp.lip(d) * _window_sum_norm(comp, eqn, d.shape))


def _gather(comp, eqn, vals, shape, at):
    d, idx = vals
    if isinstance(idx, Dep):
        return _blocked(shape, f"gather with input-dependent indices at {at}")
    counts = selection_counts(eqn, d.shape, idx)
    return comp.out(shape, comp.lip(d) * math.sqrt(max(counts, 0.0)))


def _dynamic_update_slice(comp, eqn, vals, shape, at):
    op, upd, *idx = vals
    if any(isinstance(i, Dep) for i in idx):
        return _blocked(shape, f"dynamic_update_slice with input-dependent indices at {at}")
    ls = [comp.broadcast_lip(v, v.shape) for v in (op, upd) if isinstance(v, Dep)]
    return comp.out(shape, math.sqrt(sum(x**2 for x in ls)))


def _dot_general(comp, eqn, vals, shape, at):
    a, b = vals
    if isinstance(a, Dep) and isinstance(b, Dep):
        return _blocked(
            shape,
            f"dot_general of two input-dependent values at {at} (e.g. attention): not certifiable",
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
    if key not in comp.cache:
        # Exact to rounding: rounded up by the SVD's allowance (spectra.numpy.matrix_rtol).
        top = float(np.max(np.linalg.svd(mat, compute_uv=False)[..., 0])) if mat.size else 0.0
        comp.cache[key] = snp.round_up(top, snp.matrix_rtol(*mat.shape[1:]))
    leaf = _origin(eqn.invars[1 if dep_first else 0], comp.origins)
    if leaf is not None and w.ndim == 2 and not w_batch:
        comp.dense_uses[leaf] = mat[0]
    return comp.out(shape, comp.lip(d) * comp.cache[key])


def _conv_general_dilated(comp, eqn, vals, shape, at):
    lhs, rhs = vals
    if isinstance(rhs, Dep):
        return _blocked(shape, f"conv with an input-dependent kernel at {at}")
    leaf = _origin(eqn.invars[1], comp.origins)
    spec = comp.leaf_specs[leaf] if leaf is not None else None
    l_in = None
    if spec is not None and spec.is_circular:
        source = _wrap_source(comp, lhs, eqn, spec)
        if source is not None:
            l_in = comp.lip(source)
        else:
            spec = None  # Fall back to the VALID conv applied to the padded input.
    if spec is not None:
        if l_in is None:
            l_in = comp.lip(lhs)
        comp.conv_uses.setdefault(leaf, ConvUse(leaf))
        raw = comp.leaf_norm(leaf, None)
        c_out = shape[eqn.params["dimension_numbers"].out_spec[1]]
        return Dep(
            shape,
            l_in * raw,
            fold=(leaf, l_in, np.ones(c_out), eqn.params["dimension_numbers"].out_spec[1]),
        )
    return comp.out(shape, comp.lip(lhs) * _conv_eqn_norm(comp, eqn, lhs.shape, rhs))


def _wrap_source(comp, lhs: Dep, eqn, spec: ConvSpec) -> Dep | None:
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
        for p in comp.struct_parents.get(id(v), []):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.shape == expected:
                found[id(p)] = p
            else:
                queue.append(p)
    return next(iter(found.values())) if len(found) == 1 else None


# ------------------------------------------------------------------------- linear norms


def _conv_eqn_norm(comp, eqn, lhs_shape, kernel) -> float:
    key = ("conv", id(eqn))
    if key not in comp.cache:
        comp.cache[key] = conv_eqn_bound(eqn.params, lhs_shape, np.asarray(kernel))
    return comp.cache[key]


def _window_sum_norm(comp, eqn, shape) -> float:
    key = ("window", id(eqn))
    if key not in comp.cache:
        comp.cache[key] = window_sum_bound(eqn.params, shape)
    return comp.cache[key]


#: Linear rules: primitive name -> ``rule(composer, eqn, vals, shape, at)``.
RULES = {
    "convert_element_type": _convert_element_type,
    "broadcast_in_dim": _broadcast_in_dim,
    "concatenate": _concatenate,
    "stack": _concatenate,
    "split": _split,
    "add": _add,
    "add_any": _add,
    "sub": _sub,
    "neg": _neg,
    "mul": _mul,
    "div": _div,
    "reduce_sum": _reduce_sum,
    "reduce_window_sum": _reduce_window_sum,
    "gather": _gather,
    "dynamic_update_slice": _dynamic_update_slice,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv_general_dilated,
}
