"""Find the conv operators of a model by tracing it: a pytree of :class:`spectra.ConvSpec`.

:func:`find_convs` traces ``apply_fn(params, *example_args)`` with :func:`jax.make_jaxpr`, walks
the jaxpr (nested ``jit``, ``custom_jvp``/``custom_vjp``, ``checkpoint``, ``cond``, ``scan`` and
``while`` bodies included) and, for every ``conv_general_dilated`` whose kernel is a params leaf
(possibly through reshapes that keep its shape, dtype casts, copies or transposes), reads the
operator that the layer applies: input size, strides, padding, kernel dilation and groups.
Nothing is inferred from layer names or attributes, so any model (Flax NNX, Linen, plain
functions) that calls ``lax.conv_general_dilated`` is covered.

Flax's ``padding='CIRCULAR'`` is a wrap-around ``jnp.pad`` followed by a VALID conv; it is
recognised by re-evaluating, on a probe array, the traced computation between a candidate
tensor and the conv's input and checking that it equals ``jnp.pad(probe, mode='wrap')`` with
the pads ``((k_eff - 1) // 2, k_eff // 2)`` of :meth:`spectra.ConvSpec.pads`: the check is exact,
not a pattern match on primitive names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax import lax

from spectra import ConvSpec
from train._jaxpr import Frame
from train._jaxpr import Walker
from train._jaxpr import bind_eqn
from train._jaxpr import is_jaxpr
from train._jaxpr import is_var
from train._jaxpr import split_closed
from train._jaxpr import sub_jaxprs

#: Primitives through which a params leaf is still "the kernel" (same values, same layout).
_VALUE_PRESERVING = frozenset(
    {"convert_element_type", "copy", "copy_p", "reduce_precision", "device_put"}
)
#: Most variables looked at when searching for the tensor that a wrap-around pad came from.
_MAX_WRAP_SEARCH = 64


def _propagate(origin, transform):
    """The origin of a value computed from one of ``origin`` by a layout ``transform``."""
    if origin is None:
        return None
    leaf, axes = origin
    return (leaf, transform(axes))


def _value_preserving(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    if len(eqn.invars) != 1:
        return _generic(disc, frame, eqn, vals)
    return [_propagate(vals[0], lambda axes: axes)]


def _reshape(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    same = tuple(eqn.invars[0].aval.shape) == tuple(eqn.outvars[0].aval.shape)
    return [_propagate(vals[0], lambda axes: axes if same else None)]


def _transpose(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    perm = eqn.params["permutation"]
    return [
        _propagate(vals[0], lambda axes: None if axes is None else tuple(axes[i] for i in perm))
    ]


def _conv(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    disc.record_conv(frame, eqn, vals)
    return [None]


def _sub(disc: _Discovery, frame: Frame, sub, outer_vars, vals: list, mapped: int) -> list:
    """Walks ``sub`` whose first ``mapped`` invars are exactly ``outer_vars[:mapped]``."""
    if is_jaxpr(sub):
        sub = split_closed(sub)
    invals = list(vals[:mapped]) + [None] * (len(sub[0].invars) - mapped)
    return disc.call(frame, sub, outer_vars, invals, mapped=mapped)


def _scan(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    # Loop bodies: only the constants are the same value at every iteration.
    _sub(disc, frame, eqn.params["jaxpr"], eqn.invars, vals, eqn.params["num_consts"])
    return [None] * len(eqn.outvars)


def _while(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    _sub(disc, frame, eqn.params["cond_jaxpr"], eqn.invars, vals, cn)
    _sub(disc, frame, eqn.params["body_jaxpr"], eqn.invars[cn:], vals[cn:], bn)
    return [None] * len(eqn.outvars)


def _cond(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    operands, results = eqn.invars[1:], []
    for branch in eqn.params["branches"]:
        results.append(_sub(disc, frame, branch, operands, vals[1:], len(operands)))
    outs = []
    for i in range(len(eqn.outvars)):
        first = results[0][i] if results else None
        outs.append(first if first is not None and all(r[i] == first for r in results) else None)
    return outs


def _generic(disc: _Discovery, frame: Frame, eqn, vals: list) -> list:
    """Any other primitive: walks the jaxprs it nests, one to one when the shapes say so."""
    outs = [None] * len(eqn.outvars)
    for sub in sub_jaxprs(eqn):
        jaxpr = sub[0]
        one_to_one = len(jaxpr.invars) == len(eqn.invars) and all(
            not is_var(o) or getattr(i.aval, "shape", None) == getattr(o.aval, "shape", 0)
            for i, o in zip(jaxpr.invars, eqn.invars)
        )
        out = _sub(disc, frame, sub, eqn.invars, vals, len(eqn.invars) if one_to_one else 0)
        if one_to_one and len(jaxpr.outvars) == len(eqn.outvars):
            for i, value in enumerate(out):
                if value is not None:
                    outs[i] = value
    return outs


#: The discovery's rule table: environment values are ``(params leaf, axes)`` (the value is
#: that leaf, its axes in that order; ``axes=None``: reshaped) or ``None``.
RULES = {
    "conv_general_dilated": _conv,
    **{name: _value_preserving for name in _VALUE_PRESERVING},
    "reshape": _reshape,
    "transpose": _transpose,
    "cond": _cond,
    "scan": _scan,
    "while": _while,
}


class _Discovery(Walker):
    """Walks a traced model and records one :class:`ConvSpec` per params leaf used as a kernel."""

    def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], leaf_paths: Sequence[str]):
        super().__init__(RULES, _generic, missing=None, literal=lambda lit: None)
        self.leaf_shapes = leaf_shapes
        self.leaf_paths = leaf_paths
        self.specs: dict[int, ConvSpec] = {}

    def run(self, jaxpr, invals, **kwargs) -> list:
        # Constants are no params leaf.
        return super().run(jaxpr, invals, **{**kwargs, "constvals": [None] * len(jaxpr.constvars)})

    # ---------------------------------------------------------------------------- one conv
    def record_conv(self, frame: Frame, eqn, vals: list) -> None:
        """Records the spec of a conv whose kernel is a params leaf (``vals[1]`` its origin)."""
        if vals[1] is None:
            return
        leaf, axes = vals[1]
        path = self.leaf_paths[leaf]
        kshape = tuple(self.leaf_shapes[leaf])
        params = eqn.params
        if axes is None:
            raise ValueError(
                f"params leaf {path} (shape {kshape}) reaches the kernel of a conv through a "
                "reshape that changes its shape; its layout cannot be mapped to HWIO"
            )
        if any(d != 1 for d in params["lhs_dilation"]):
            raise ValueError(
                f"params leaf {path} is the kernel of a transposed conv (lhs_dilation="
                f"{tuple(params['lhs_dilation'])}); only forward convs (lhs_dilation=1) have a "
                "ConvSpec"
            )
        if params.get("batch_group_count", 1) != 1:
            raise ValueError(
                f"params leaf {path} is the kernel of a conv with batch_group_count="
                f"{params['batch_group_count']}; only batch_group_count=1 is supported"
            )
        lhs_spec, rhs_spec, _ = params["dimension_numbers"]
        if len(lhs_spec) != 4:
            raise ValueError(
                f"params leaf {path} is the kernel of a {len(lhs_spec) - 2}-D conv; ConvSpec "
                "describes 2-D convs only"
            )
        layout = tuple(axes[rhs_spec[i]] for i in (2, 3, 1, 0))
        if layout != (0, 1, 2, 3):
            raise ValueError(
                f"params leaf {path} (shape {kshape}) is a conv kernel whose layout cannot be "
                f"mapped to HWIO (the conv reads its axes {layout} as (H, W, I, O)); store the "
                "kernel as HWIO (kh, kw, c_in // groups, c_out)"
            )
        lhs = eqn.invars[0]
        lhs_shape = tuple(lhs.aval.shape)
        spatial = (lhs_shape[lhs_spec[2]], lhs_shape[lhs_spec[3]])
        dilation = tuple(int(d) for d in params["rhs_dilation"])
        keff = tuple((k - 1) * d + 1 for k, d in zip(kshape[:2], dilation))
        strides = tuple(int(s) for s in params["window_strides"])
        pads = tuple((int(lo), int(hi)) for lo, hi in params["padding"])
        padding: Any = None
        if all(p == 0 for pair in pads for p in pair):
            source = _wrap_pad_source(frame, lhs, lhs_spec, keff) if is_var(lhs) else None
            if source is not None:
                padding, spatial = "CIRCULAR", source
        if padding is None:
            padding = _name_padding(pads, spatial, keff, strides)
        try:
            spec = ConvSpec(
                input_shape=spatial,
                strides=strides,
                padding=padding,
                kernel_dilation=dilation,
                feature_group_count=int(params["feature_group_count"]),
                in_features=int(lhs_shape[lhs_spec[1]]),
            )
            spec.validate(np.broadcast_to(np.zeros((), np.float32), kshape))
        except ValueError as e:
            raise ValueError(
                f"params leaf {path}: the conv it feeds has no valid ConvSpec: {e}"
            ) from e
        out_shape = tuple(eqn.outvars[0].aval.shape[i] for i in params["dimension_numbers"][2][2:])
        if spec.output_shape(kshape) != out_shape:  # A bug here, not a user error.
            raise AssertionError(
                f"{path}: {spec} predicts {spec.output_shape(kshape)}, the conv gives {out_shape}"
            )
        previous = self.specs.get(leaf)
        if previous is not None and previous != spec:
            raise ValueError(
                f"params leaf {path} is the kernel of two convs with different operators: "
                f"{previous} and {spec}; a kernel needs a single ConvSpec (call the layer on "
                "inputs of one size)"
            )
        self.specs[leaf] = spec


def _name_padding(pads, spatial, keff, strides):
    """Explicit pads -> 'SAME' / 'VALID' / 'FULL' when they are exactly those, else the pairs."""
    same = lax.padtype_to_pads(spatial, keff, strides, "SAME")
    same = tuple(tuple(int(v) for v in p) for p in same)
    if pads == same:
        return "SAME"
    if all(p == 0 for pair in pads for p in pair):
        return "VALID"
    if pads == tuple((k - 1, k - 1) for k in keff):
        return "FULL"
    return pads


def _wrap_pad_source(scope: Frame, lhs, lhs_spec, keff) -> tuple[int, int] | None:
    """Spatial size of ``x`` when ``lhs == jnp.pad(x, circular pads, mode='wrap')``, else None."""
    ndim = len(lhs.aval.shape)
    pad_widths = [(0, 0)] * ndim
    for axis, k in zip(lhs_spec[2:], keff):
        pad_widths[axis] = ((k - 1) // 2, k // 2)
    if all(p == (0, 0) for p in pad_widths):
        return None
    expected = tuple(n - lo - hi for n, (lo, hi) in zip(lhs.aval.shape, pad_widths))
    # Go to the scope where the conv input is computed.
    while lhs not in scope.producers and lhs in scope.alias:
        scope, lhs = scope.alias[lhs]
    if lhs not in scope.producers:
        return None
    queue, seen, candidates = [lhs], {lhs}, []
    while queue and len(seen) < _MAX_WRAP_SEARCH:
        var = queue.pop(0)
        for invar in scope.jaxpr.eqns[scope.producers[var]].invars:
            if not is_var(invar) or invar in seen:
                continue
            seen.add(invar)
            if tuple(getattr(invar.aval, "shape", ())) == expected:
                candidates.append(invar)
            if invar in scope.producers:
                queue.append(invar)
    for candidate in candidates:
        if _evaluates_to_wrap_pad(scope, lhs, candidate, pad_widths):
            return tuple(expected[a] for a in lhs_spec[2:])  # type: ignore[return-value]
    return None


def _evaluates_to_wrap_pad(scope: Frame, target, source, pad_widths) -> bool:
    """Re-evaluates the traced ``source -> target`` computation on a probe: is it a wrap pad?"""
    needed, stack = set(), [target]
    while stack:
        var = stack.pop()
        if var is source or not is_var(var) or var in scope.const_map:
            continue
        index = scope.producers.get(var)
        if index is None:  # Depends on something other than `source`.
            return False
        if index not in needed:
            needed.add(index)
            if len(needed) > _MAX_WRAP_SEARCH:
                return False
            stack.extend(scope.jaxpr.eqns[index].invars)
    dtype = np.dtype(source.aval.dtype)
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        return False
    shape = tuple(source.aval.shape)
    probe = (np.arange(math.prod(shape)).reshape(shape) + 1).astype(dtype)
    env = dict(scope.const_map)
    env[source] = probe
    try:
        with jax.ensure_compile_time_eval():
            for index in sorted(needed):
                eqn = scope.jaxpr.eqns[index]
                values = [v.val if not is_var(v) else env[v] for v in eqn.invars]
                env.update(zip(eqn.outvars, bind_eqn(eqn, values)))
            result = np.asarray(env[target])
    except Exception:  # noqa: BLE001 - any failure means "not a recognisable wrap pad".
        return False
    expected = np.pad(probe, pad_widths, mode="wrap").astype(result.dtype)
    return result.shape == expected.shape and np.array_equal(result, expected)


def _is_array_like(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _conv_leaf_specs(
    apply_fn: Callable[..., Any], params: Any, example_args: tuple, example_kwargs: dict
) -> list[ConvSpec | None]:
    """One entry per leaf of ``params`` (``jax.tree.leaves`` order): its ConvSpec or None."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in path_leaves]
    leaves = [leaf for _, leaf in path_leaves]
    arg_leaves, arg_def = jax.tree.flatten((example_args, example_kwargs))
    traced_mask = [_is_array_like(x) for x in arg_leaves]

    def fn(param_leaves, traced):
        it = iter(traced)
        full = [next(it) if t else x for x, t in zip(arg_leaves, traced_mask)]
        args, kwargs = jax.tree.unflatten(arg_def, full)
        return apply_fn(jax.tree.unflatten(treedef, param_leaves), *args, **kwargs)

    traced_args = [x for x, t in zip(arg_leaves, traced_mask) if t]
    closed = jax.make_jaxpr(fn)(leaves, traced_args)
    jaxpr = closed.jaxpr
    origins = {
        var: (i, tuple(range(len(np.shape(leaf)))))
        for i, (var, leaf) in enumerate(zip(jaxpr.invars[: len(leaves)], leaves))
    }
    discovery = _Discovery([tuple(np.shape(leaf)) for leaf in leaves], paths)
    discovery.run(
        jaxpr, [origins.get(v) for v in jaxpr.invars], consts=closed.consts, where="the model"
    )
    return [discovery.specs.get(i) for i in range(len(leaves))]


def find_convs(
    apply_fn: Callable[..., Any], params: Any, *example_args: Any, **example_kwargs: Any
) -> Any:
    """The :class:`spectra.ConvSpec` of every params leaf used as a conv kernel, by tracing.

    Traces ``apply_fn(params, *example_args, **example_kwargs)`` once (abstractly: nothing is
    computed on the inputs except a small probe that confirms circular padding) and reads each
    ``lax.conv_general_dilated`` whose kernel is a params leaf, reached through shape-keeping
    reshapes, dtype casts, copies or transposes, inside nested ``jit``/``custom_jvp``/
    ``checkpoint``/``cond`` and the constants of ``scan``/``while`` bodies.

    Each spec describes the operator the layer applies to the input it sees, for the example
    input's size: ``input_shape`` is that input's ``(H, W)`` (before the wrap-around pad for
    ``padding='CIRCULAR'``), the conv's explicit pads are named ``'SAME'``/``'VALID'``/``'FULL'``
    when they are exactly those and kept as ``((lo, hi), (lo, hi))`` otherwise, and
    ``in_features`` is the input's channel count. A Flax ``padding='CIRCULAR'`` conv (a
    ``jnp.pad(mode='wrap')`` then a VALID conv) is reported as ``'CIRCULAR'``; any other padding
    done outside the conv (reflect, zero ``jnp.pad``) is not folded in: the spec is then the
    VALID conv on the padded input.

    Array-like leaves of the example arguments (``jax.Array``, ``np.ndarray``,
    ``jax.ShapeDtypeStruct``) are traced; anything else (``train=False``, ints) is passed as is.

    Args:
      apply_fn: ``apply_fn(params, *example_args, **example_kwargs)`` runs the model.
      params: the pytree of parameters; kernels must be HWIO ``(kh, kw, c_in // groups, c_out)``.
      *example_args: example positional inputs (only their shapes and dtypes matter).
      **example_kwargs: example keyword inputs.

    Returns:
      A pytree with the structure of ``params``: a :class:`spectra.ConvSpec` for each leaf used
      as the kernel of a 2-D conv, ``None`` for every other leaf (biases, dense weights, a 4-D
      array that is never a conv kernel, a kernel reached only through non-trivial ops such as
      ``kernel * mask``).

    Raises:
      ValueError: naming the params leaf, when a kernel is used by two convs whose operators
        differ (other input size, strides, ...), is the kernel of a transposed conv
        (``lhs_dilation != 1``), of a 1-D/3-D conv, or reaches the conv in a layout that cannot
        be mapped to HWIO (a transpose to another layout, a shape-changing reshape).

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> def apply(params, x):
      ...   return jax.lax.conv_general_dilated(
      ...       x, params['w'], (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      >>> params = {'w': jnp.zeros((3, 3, 2, 4)), 'b': jnp.zeros(4)}
      >>> specs = find_convs(apply, params, jnp.zeros((1, 8, 8, 2)))
      >>> specs['b'] is None, specs['w'].strides, specs['w'].padding
      (True, (2, 2), 'SAME')
    """
    _, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        treedef, _conv_leaf_specs(apply_fn, params, example_args, example_kwargs)
    )


def find_convs_nnx(model: nnx.Module, *example_args: Any, **example_kwargs: Any) -> nnx.State:
    """:func:`find_convs` for a Flax NNX model: specs for its ``nnx.Param`` state.

    Splits ``model`` into ``(graphdef, params, rest)`` with ``nnx.split(model, nnx.Param, ...)``
    and traces ``nnx.merge(graphdef, params, rest)(*example_args, **example_kwargs)`` on a copy,
    so the model itself (BatchNorm statistics, RNG counters) is left untouched.

    Returns:
      An ``nnx.State`` with the structure of ``nnx.as_pure(nnx.state(model, nnx.Param))`` (what
      ``nnx.Optimizer`` hands to ``tx.update`` as ``params``): a :class:`spectra.ConvSpec` or
      ``None`` per parameter.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Conv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
      >>> find_convs_nnx(model, jnp.zeros((1, 8, 8, 2)))['kernel']
      ConvSpec(input_shape=(8, 8), strides=(2, 2), padding='SAME', kernel_dilation=(1, 1), \
feature_group_count=1, in_features=2)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.as_pure(params)

    def apply(p, r, *args, **kwargs):
        return nnx.merge(graphdef, p, r)(*args, **kwargs)

    _, treedef = jax.tree.flatten(pure)
    return jax.tree.unflatten(
        treedef, _conv_leaf_specs(apply, pure, (rest, *example_args), example_kwargs)
    )


# ------------------------------------------------------------------ aligning specs with params

def is_spec_or_none(x) -> bool:
    """``is_leaf`` of a specs tree: a :class:`spectra.ConvSpec` or ``None`` (a hole)."""
    return x is None or isinstance(x, ConvSpec)


def is_leaf_or_hole(x) -> bool:
    """Leaves of a params tree for alignment: ``None`` and ``optax.MaskedNode`` count as leaves."""
    return x is None or isinstance(x, optax.MaskedNode)


def align_with_params(params: Any, tree: Any, name: str) -> list[Any]:
    """``tree`` (specs, max norms) flattened up to the structure of ``params``.

    Both may hold ``nnx.Variable`` wrappers (stripped first); ``params`` may hold
    ``optax.MaskedNode`` (``optax.masked``): the entry there is whatever ``tree`` holds.

    Returns:
      One entry per leaf of ``jax.tree.leaves(params, is_leaf=is_leaf_or_hole)``.

    Raises:
      ValueError: naming ``name`` when the structures differ.
    """
    treedef = jax.tree.structure(nnx.as_pure(params), is_leaf=is_leaf_or_hole)
    try:
        return treedef.flatten_up_to(nnx.as_pure(tree))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must have the structure of params ({treedef}); got "
            f"{jax.tree.structure(nnx.as_pure(tree))}: {e}"
        ) from e


def leaf_paths(params: Any) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf of ``params`` (``is_leaf_or_hole`` leaves)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(
        nnx.as_pure(params), is_leaf=is_leaf_or_hole
    )
    return [jax.tree_util.keystr(p) for p, _ in with_path]
