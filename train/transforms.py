"""Optax transforms that keep conv layers inside an operator-norm ball during training.

Length: one transform; its argument checks, grouping, sharding and power-vector helpers are only
used by it (:mod:`train.bn_aware` reuses its update schedule).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from spectra import CLIP_METHODS
from spectra import ConvSpec
from spectra import clip_operator_norm
from spectra import clip_operator_norm_power
from train import discovery

#: Methods of :func:`project_conv_operator_norm`: those of ``spectra.clip_operator_norm`` and
#: ``'power'`` (``spectra.clip_operator_norm_power`` with vectors carried in the state).
PROJECT_METHODS = (*CLIP_METHODS, "power")
#: Certified methods (the real layer's σ_max ``<= max_norm`` after each projection, up to
#: rounding): the ``certify_method`` choices of :func:`project_conv_operator_norm`. Both are a
#: pure rescale ``K * min(1, c / u)``: ``'rescale'`` with ``u`` the Gram-iteration upper bound of
#: the circular operator ``C`` (matmuls only), ``'certified'`` with ``u = σ_max(C)`` exact
#: (per-frequency SVD, ``num_rounds=0``).
CERTIFIED_METHODS = ("certified", "rescale")
#: Power iterations run by ``init`` for ``method='power'``, on the initial kernels, so that the
#: first projection starts from converged vectors.
POWER_INIT_ITERATIONS = 100


class ProjectConvOperatorNormState(NamedTuple):
    """State of :func:`project_conv_operator_norm`.

    Attributes:
      count: int32 scalar, the number of updates seen so far (the step that is projected when
        ``count % every_k_steps == 0``).
      feasibility_gap: float32 scalar, the largest ``ClipResult.feasibility_gap`` over the conv
        leaves at the most recent projecting update (``σ_max(C) - max_norm`` of the returned
        kernels, with ``C`` the circular operator the projection works on, an upper bound on
        the real layer's σ_max: ``<= 0`` means every projected layer is feasible); ``0`` before
        the first projection. For ``'power'`` it is ``σ̂ - max_norm`` with ``σ̂`` the power
        estimate of the *input* kernels (before rescaling): ``> 0`` means some layer was
        rescaled; not a certificate (``σ̂`` is a lower estimate).
      vectors: for ``'power'``, one array per group of same-shaped kernels, ``(G, H, W, c_in)``:
        the right-vector estimates carried from step to step (warm starts; ``init`` runs
        :data:`POWER_INIT_ITERATIONS` iterations on the initial kernels); ``()`` otherwise.
    """

    count: jax.Array
    feasibility_gap: jax.Array
    vectors: tuple = ()


_is_spec_or_none = discovery.is_spec_or_none


def _check_specs(specs: Any) -> None:
    with_path, _ = jax.tree_util.tree_flatten_with_path(
        nnx.as_pure(specs), is_leaf=_is_spec_or_none
    )
    for path, spec in with_path:
        if not _is_spec_or_none(spec):
            raise ValueError(
                f"specs must be a pytree of spectra.ConvSpec or None; got {spec!r} at "
                f"{jax.tree_util.keystr(path)}"
            )


def _max_norm_per_spec(
    max_norm: Any, specs: Any, name: str = "max_norm"
) -> tuple[Any, list[Any] | None]:
    """Validates ``max_norm``; returns it as a scalar, or as a list aligned with specs' leaves."""

    def check(value, where: str):
        if np.ndim(value) != 0:
            raise ValueError(
                f"{name}{where} must be a scalar; got shape {np.shape(value)}"
            )
        if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
            raise ValueError(f"{name}{where}={value!r} must be > 0")

    if isinstance(max_norm, (int, float, np.number, np.ndarray, jax.Array)):
        check(max_norm, "")
        return max_norm, None
    stripped_specs = nnx.as_pure(specs)
    treedef = jax.tree.structure(stripped_specs, is_leaf=_is_spec_or_none)
    try:
        norms = treedef.flatten_up_to(nnx.as_pure(max_norm))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must be a scalar or a pytree with the structure of specs "
            f"({treedef}); "
            f"got {jax.tree.structure(max_norm)}"
        ) from e
    with_path, _ = jax.tree_util.tree_flatten_with_path(stripped_specs, is_leaf=_is_spec_or_none)
    for (path, spec), value in zip(with_path, norms):
        if spec is not None:
            check(value, jax.tree_util.keystr(path))
    return None, norms


def _shard_stack(x: jax.Array, mesh: Mesh | None, axis: str) -> jax.Array:
    """Pads a stack ``(G, ...)`` to a multiple of the mesh axis size (repeating its first entry)
    and constrains it to be sharded over ``axis`` on its leading dimension; identity without a
    mesh."""
    if mesh is None:
        return x
    pad = -x.shape[0] % mesh.shape[axis]
    if pad:
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
    return _constrain(x, mesh, PartitionSpec(axis))


def _gather_stack(x: jax.Array, size: int, mesh: Mesh | None) -> jax.Array:
    """Inverse of :func:`_shard_stack`: the first ``size`` entries, replicated over the mesh."""
    if mesh is None:
        return x
    return _constrain(x[:size], mesh, PartitionSpec())


def _constrain(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """``with_sharding_constraint`` on ``mesh``'s devices, its axes taken as ``Auto`` (the
    default of ``jax.make_mesh`` is ``Explicit``, which the constraint does not accept)."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) != auto:
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))



#: The arguments :func:`check_projection_args` names in its errors (by default their own names).
_ARG_NAMES = {
    name: name
    for name in ("max_norm", "every_k_steps", "method", "num_rounds", "certify_every",
                 "certify_method", "mesh", "mesh_axis")
}


def check_projection_args(
    max_norm: Any = None,
    specs: Any = None,
    *,
    every_k_steps: int = 1,
    method: str = "certified",
    num_rounds: int = 1,
    certify_every: int | None = None,
    certify_method: str = "rescale",
    mesh: Mesh | None = None,
    mesh_axis: str = "data",
    names: Mapping[str, str] | None = None,
) -> tuple[Any, list[Any] | None]:
    """Checks the arguments of :func:`project_conv_operator_norm` (the one place they are checked).

    Args:
      max_norm: ``None`` (not checked), a scalar ``> 0``, or (with ``specs``) a pytree with the
        structure of ``specs`` holding a scalar ``> 0`` for every conv leaf.
      specs: ``None`` (not checked), or a pytree of :class:`spectra.ConvSpec` or ``None``.
      every_k_steps: as in :func:`project_conv_operator_norm`.
      method: as in :func:`project_conv_operator_norm`.
      num_rounds: as in :func:`project_conv_operator_norm`.
      certify_every: as in :func:`project_conv_operator_norm`.
      certify_method: as in :func:`project_conv_operator_norm`.
      mesh: as in :func:`project_conv_operator_norm`.
      mesh_axis: as in :func:`project_conv_operator_norm`.
      names: the name the error messages give each argument, e.g. ``{'every_k_steps':
        'project_every'}`` for a config's fields; arguments not in it keep their own name.

    Returns:
      ``(scalar_norm, spec_norms)``: ``max_norm`` and ``None`` for a scalar ``max_norm``;
      ``None`` and the list of ``max_norm``'s entries aligned with the leaves of ``specs`` for a
      pytree; ``(None, None)`` when ``max_norm`` is ``None``.

    Raises:
      ValueError: naming the first argument that is not as expected.
    """
    n = {**_ARG_NAMES, **(names or {})}
    if not isinstance(every_k_steps, (int, np.integer)) or every_k_steps < 1:
        raise ValueError(f"{n['every_k_steps']}={every_k_steps!r} must be a positive int")
    if method not in PROJECT_METHODS:
        raise ValueError(f"{n['method']}={method!r} is unknown; expected one of {PROJECT_METHODS}")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 0:
        raise ValueError(f"{n['num_rounds']}={num_rounds!r} must be a non-negative int")
    if certify_every is not None and (
        isinstance(certify_every, bool)
        or not isinstance(certify_every, (int, np.integer))
        or certify_every < 1
    ):
        raise ValueError(f"{n['certify_every']}={certify_every!r} must be None or a positive int")
    if certify_method not in CERTIFIED_METHODS:
        raise ValueError(
            f"{n['certify_method']}={certify_method!r} is unknown; expected one of "
            f"{CERTIFIED_METHODS}"
        )
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"{n['mesh']} must be a jax.sharding.Mesh or None; got {mesh!r}")
        if mesh_axis not in mesh.axis_names:
            raise ValueError(
                f"{n['mesh_axis']}={mesh_axis!r} is not an axis of mesh (axes {mesh.axis_names})"
            )
    if specs is not None:
        _check_specs(specs)
    if max_norm is None:
        return None, None
    return _max_norm_per_spec(max_norm, specs, n["max_norm"])


def project_conv_operator_norm(
    max_norm: Any,
    specs: Any,
    *,
    every_k_steps: int = 1,
    method: str = "certified",
    num_rounds: int = 1,
    certify_every: int | None = None,
    certify_method: str = "rescale",
    mesh: Mesh | None = None,
    mesh_axis: str = "data",
) -> optax.GradientTransformation:
    r"""Keeps every conv layer's operator norm at most ``max_norm`` (Sedghi et al. 2019).

    Rewrites the updates of each params leaf with a :class:`spectra.ConvSpec` in ``specs`` so
    that ``params + updates`` is ``spectra.clip_operator_norm(params + updates, spec, max_norm,
    method=method, num_rounds=num_rounds).kernel`` (``'power'``:
    :func:`spectra.clip_operator_norm_power` with the vectors carried in the state); other
    leaves' updates are untouched. Needs ``params``: goes **last** in :func:`optax.chain`.
    Projects on updates with ``count % every_k_steps == 0`` (the first update projects).
    ``'certified'`` (default) and ``'rescale'``: the exact σ_max of each projected layer is
    ``<= max_norm`` up to rounding (proven); ``'sedghi'``, ``'dykstra'`` and ``'power'`` are
    approximations (see ``state.feasibility_gap``). A kernel already inside the ball is left
    bit-identical. Design, costs and the options' rationale: ``docs/projection.md``.

    Args:
      max_norm: the radius ``c > 0``: a scalar, or a pytree with the structure of ``specs``
        holding a scalar for every conv leaf (entries at ``None`` specs are ignored).
      specs: a pytree with the structure of the params: a :class:`spectra.ConvSpec` for each
        kernel to constrain (HWIO, 4-D), ``None`` elsewhere; e.g. from :func:`train.find_convs`.
      every_k_steps: project every ``k``-th update (``k >= 1``).
      method: one of :data:`PROJECT_METHODS`: a ``spectra.clip_operator_norm`` method
        (``'certified'``, ``'sedghi'``, ``'dykstra'``, ``'rescale'``) or ``'power'``.
      num_rounds: projection rounds per projecting update (``>= 0``; see
        ``spectra.clip_operator_norm``); for ``'power'``, power iterations per update.
      certify_every: ``None`` (no extra step), or ``k >= 1``: a certified rescale after the
        projection on every ``k``-th update (``(count + 1) % k == 0``), so the parameters after
        updates ``k, 2k, ...`` are certified.
      certify_method: one of :data:`CERTIFIED_METHODS`, used when ``certify_every`` is set.
      mesh: a :class:`jax.sharding.Mesh` to spread each group of same-shaped kernels over;
        ``None``: no sharding constraint (the values are the same either way).
      mesh_axis: the name of the ``mesh`` axis the groups are split over.

    Returns:
      An :class:`optax.GradientTransformation`. Its state is a
      :class:`ProjectConvOperatorNormState`; with ``certify_every``, the tuple
      ``(ProjectConvOperatorNormState, optax.ConditionallyTransformState)`` whose
      ``[1].inner_state`` is the certifying projection's state and ``[1].step`` the update
      counter.

    Raises:
      ValueError: naming the argument that is not as expected (see
        :func:`check_projection_args`); at ``init``/``update``, naming the params leaf whose
        spec does not match it, or ``params`` when they are missing.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import spectra
      >>> params = {'w': jnp.ones((3, 3, 2, 2)), 'b': jnp.zeros(2)}
      >>> specs = {'w': spectra.ConvSpec((8, 8), padding='SAME'), 'b': None}
      >>> tx = optax.chain(optax.sgd(0.1), project_conv_operator_norm(1.0, specs))
      >>> state = tx.init(params)
      >>> grads = {'w': jnp.ones((3, 3, 2, 2)), 'b': jnp.ones(2)}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(spectra.spectral_norm(params['w'], specs['w'], 'dense') <= 1.0 + 1e-5)
      True

    References:
      H. Sedghi, V. Gupta, P. M. Long. The Singular Values of Convolutional Layers. ICLR 2019.
    """
    scalar_norm, spec_norms = check_projection_args(
        max_norm, specs, every_k_steps=every_k_steps, method=method, num_rounds=num_rounds,
        certify_every=certify_every, certify_method=certify_method, mesh=mesh,
        mesh_axis=mesh_axis,
    )
    options = (specs, scalar_norm, spec_norms, mesh, mesh_axis)
    cheap = _projection(*options, int(every_k_steps), method, int(num_rounds))
    if certify_every is None:
        return cheap
    certify = _projection(*options, 1, certify_method, 0)
    k = int(certify_every)
    return optax.chain(
        cheap, optax.conditionally_transform(certify, lambda step: (step + 1) % k == 0)
    )


def every_k_steps_apply(count, every_k_steps: int, project, skip, operands, *, active: bool):
    """``project(operands)`` on the steps where ``count % every_k_steps == 0``, else
    ``skip(operands)`` (a ``lax.cond`` inside ``jit``; no cond when ``every_k_steps == 1``, and
    ``skip`` alone when nothing is ``active``): the schedule of the projection transforms."""
    if not active:
        return skip(operands)
    if every_k_steps == 1:
        return project(operands)
    return lax.cond(count % every_k_steps == 0, project, skip, operands)


def _conv_leaves(
    params: Any, specs: Any, scalar_norm: Any = 1.0, spec_norms: list[Any] | None = None
) -> list[tuple[int, ConvSpec, Any]]:
    """The conv leaves of ``params``, each checked against its spec.

    Args:
      params: the params pytree (``nnx.Variable`` wrappers allowed).
      specs: a pytree of :class:`spectra.ConvSpec` or ``None`` aligned with ``params``.
      scalar_norm: the radius of every conv leaf when ``spec_norms`` is ``None``.
      spec_norms: ``None``, or one radius per leaf of ``specs`` (from
        :func:`check_projection_args`).

    Returns:
      ``[(leaf index, spec, max_norm), ...]`` in the order of ``jax.tree.leaves(params)``.

    Raises:
      ValueError: naming the params leaf whose spec is not a ConvSpec or does not match it.
    """
    leaves = jax.tree.leaves(nnx.as_pure(params), is_leaf=discovery.is_leaf_or_hole)
    aligned = discovery.align_with_params(params, specs, "specs")
    if spec_norms is not None:
        # Number the specs' leaves, then flatten the numbers like the params.
        treedef = jax.tree.structure(nnx.as_pure(specs), is_leaf=_is_spec_or_none)
        numbers = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
        aligned_numbers = discovery.align_with_params(params, numbers, "specs")
    paths = discovery.leaf_paths(params)
    out = []
    for i, (leaf, spec) in enumerate(zip(leaves, aligned)):
        if discovery.is_leaf_or_hole(leaf) or spec is None:
            continue
        if not isinstance(spec, ConvSpec):
            raise ValueError(
                f"specs at params leaf {paths[i]} must be a ConvSpec or None; got {spec!r}"
            )
        shape = np.shape(leaf)
        if len(shape) != 4:
            raise ValueError(
                f"specs gives a ConvSpec for params leaf {paths[i]}, which is not a 4-D "
                f"HWIO kernel (shape {shape})"
            )
        try:
            spec.validate(np.broadcast_to(np.zeros((), np.float32), shape))
        except ValueError as e:
            raise ValueError(f"params leaf {paths[i]} does not match its spec: {e}") from e
        norm = scalar_norm if spec_norms is None else spec_norms[aligned_numbers[i]]
        out.append((i, spec, norm))
    return out


def _group_convs(
    flat_params: list[Any], convs: list[tuple[int, ConvSpec, Any]]
) -> dict[tuple, list[tuple[int, Any]]]:
    """Groups conv leaves that can be projected with one :func:`jax.vmap`.

    Args:
      flat_params: the leaves of the params.
      convs: ``(leaf index, spec, max_norm)`` triples, from :func:`_conv_leaves`.

    Returns:
      ``{(shape, dtype, spec): [(leaf index, max_norm), ...]}``, groups and members in order of
      first appearance.
    """
    groups = collections.defaultdict(list)
    for i, spec, norm in convs:
        leaf = flat_params[i]
        groups[(np.shape(leaf), jnp.result_type(leaf), spec)].append((i, norm))
    return groups


def _init_power_vectors(
    flat_params: list[Any], groups: dict, mesh: Mesh | None = None, mesh_axis: str = "data"
) -> tuple[jax.Array, ...]:
    """Right-vector estimates for ``method='power'``, warmed on the initial kernels.

    One jitted program per group, compiled once per group shape and placement of the kernels
    (jit keys on the arguments' shardings): concrete kernels on one device are committed to it
    (``SingleDeviceSharding``, no data moves), so that kernels restored onto a one-device mesh
    reuse the program of a freshly built model. The values are the same either way.

    Args:
      flat_params: the leaves of the params.
      groups: from :func:`_group_convs`.
      mesh: as in :func:`project_conv_operator_norm`.
      mesh_axis: as in :func:`project_conv_operator_norm`.

    Returns:
      One ``(G, H, W, c_in)`` array per group: :data:`POWER_INIT_ITERATIONS` power iterations
      from a fixed random start (``PRNGKey(0)`` folded with the group's index).
    """

    def placed(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if len(devices := x.sharding.device_set) == 1:
                return jax.device_put(x, jax.sharding.SingleDeviceSharding(next(iter(devices))))
        return x

    vectors = []
    for g, ((_, _, spec), members) in enumerate(groups.items()):
        kernels = tuple(placed(flat_params[i]) for i, _ in members)
        # Always a float32 scalar (0 for the first group): one program per group shape.
        after = jnp.sum(vectors[-1]).astype(jnp.float32) if vectors else jnp.float32(0)
        vectors.append(_warm_power_vectors(kernels, jnp.uint32(g), after, spec, mesh, mesh_axis))
    return tuple(vectors)


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "mesh_axis"))
def _warm_power_vectors(kernels: tuple, g: jax.Array, after: jax.Array, spec: ConvSpec,
                        mesh: Mesh | None, mesh_axis: str) -> jax.Array:
    """:func:`_init_power_vectors` of group ``g`` (same-shaped ``kernels``), made to depend on
    ``after`` (the previous group's sum, or 0) like the groups of :func:`_project_groups`
    (XLA:CPU LAPACK deadlock): one program per group shape, shared by every layout."""
    stack = jnp.stack(kernels)
    vshape = (len(kernels), *spec.input_shape, spec.channels(stack.shape[1:])[0])
    start = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), g), vshape, stack.dtype)
    start = start + 0 * after.astype(stack.dtype)

    def warm(kernel, vector):
        return clip_operator_norm_power(
            kernel, spec, 1.0, vector, num_iterations=POWER_INIT_ITERATIONS
        ).vector

    warmed = jax.vmap(warm)(*(_shard_stack(x, mesh, mesh_axis) for x in (stack, start)))
    return _gather_stack(warmed, len(kernels), mesh)


def _project_group(
    spec: ConvSpec,
    kernels: list[jax.Array],
    updates: list[jax.Array],
    norms: list[Any],
    *,
    method: str,
    num_rounds: int,
    vectors: jax.Array | None = None,
    after: jax.Array | None = None,
    mesh: Mesh | None = None,
    mesh_axis: str = "data",
) -> tuple[list[jax.Array], jax.Array, jax.Array | None]:
    """Projects ``kernels + updates`` of one group of same-shaped kernels with one vmap.

    Args:
      spec: the group's spec.
      kernels: the group's params, same shape and dtype.
      updates: their updates.
      norms: their radii.
      method: one of :data:`PROJECT_METHODS`.
      num_rounds: as in :func:`project_conv_operator_norm`.
      vectors: for ``'power'``, the group's ``(G, H, W, c_in)`` vectors; else ``None``.
      after: ``None``, or a float32 scalar the projection is made to depend on (it serialises
        the groups: XLA:CPU can deadlock on several independent batched LAPACK
        eigendecompositions in one program).
      mesh: as in :func:`project_conv_operator_norm`.
      mesh_axis: as in :func:`project_conv_operator_norm`.

    Returns:
      ``(new_updates, gap, new_vectors)``: one update per kernel (the old update wherever the
      projection kept the value, so that ``kernel + update`` is bit-identical to the unprojected
      step there), the group's largest gap as a float32 scalar (``feasibility_gap``; for
      ``'power'``, ``σ̂ - max_norm``), and the new vectors (``None`` unless ``'power'``).
    """
    old = jnp.stack(kernels)
    upd = jnp.stack(updates)
    norms = jnp.stack([jnp.asarray(n, old.dtype) for n in norms])
    target = (old + upd).astype(old.dtype)  # As optax.apply_updates.
    if after is not None:
        target = target + (0 * after).astype(target.dtype)

    def shard(x):  # Spread the group over the mesh axis (identity without a mesh).
        return _shard_stack(x, mesh, mesh_axis)

    def gather(x):  # Back to the group's size, replicated.
        return _gather_stack(x, len(kernels), mesh)

    if method == "power":

        def clip(kernel, norm, vector):
            return clip_operator_norm_power(kernel, spec, norm, vector, num_iterations=num_rounds)

        result = jax.tree.map(gather, jax.vmap(clip)(*map(shard, (target, norms, vectors))))
        gap, new_vectors = result.sigma - norms, result.vector
    else:

        def clip(kernel, norm):
            return clip_operator_norm(kernel, spec, norm, method=method, num_rounds=num_rounds)

        result = jax.tree.map(gather, jax.vmap(clip)(*map(shard, (target, norms))))
        gap, new_vectors = result.feasibility_gap, None
    kept = result.kernel == target
    new_updates = [
        jnp.where(kept[j], u, (result.kernel[j] - k).astype(u.dtype))
        for j, (k, u) in enumerate(zip(kernels, updates))
    ]
    return new_updates, jnp.max(gap).astype(jnp.float32), new_vectors


def _project_groups(
    groups: dict, conv_params: dict, conv_updates: dict, vectors: tuple, **options
) -> tuple[dict, jax.Array, tuple]:
    """:func:`_project_group` on every group, chained (see ``after`` there).

    Args:
      groups: from :func:`_group_convs`.
      conv_params: ``{leaf index: kernel}``.
      conv_updates: ``{leaf index: update}``.
      vectors: for ``'power'``, one array per group; ``()`` otherwise.
      **options: ``method``, ``num_rounds``, ``mesh``, ``mesh_axis`` of :func:`_project_group`.

    Returns:
      ``(new_updates, gap, new_vectors)``: ``{leaf index: update}``, the largest gap (float32
      scalar) and the tuple of new vectors (``()`` unless ``'power'``).
    """
    new_updates, gaps, new_vectors = dict(conv_updates), [], []
    for g, ((_, _, spec), members) in enumerate(groups.items()):
        idx = [i for i, _ in members]
        updates, gap, vector = _project_group(
            spec, [conv_params[i] for i in idx], [conv_updates[i] for i in idx],
            [n for _, n in members], vectors=vectors[g] if vectors else None,
            after=gaps[-1] if gaps else None, **options,
        )
        new_updates.update(zip(idx, updates))
        gaps.append(gap)
        if vector is not None:
            new_vectors.append(vector)
    return new_updates, jnp.max(jnp.stack(gaps)), tuple(new_vectors)


def _projection(
    specs: Any,
    scalar_norm: Any,
    spec_norms: list[Any] | None,
    mesh: Mesh | None,
    mesh_axis: str,
    every_k_steps: int,
    method: str,
    num_rounds: int,
) -> optax.GradientTransformation:
    """The transform of :func:`project_conv_operator_norm` for one method (arguments checked)."""
    options = dict(method=method, num_rounds=num_rounds, mesh=mesh, mesh_axis=mesh_axis)

    def groups_of(params):
        flat_params = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
        convs = _conv_leaves(params, specs, scalar_norm, spec_norms)
        return flat_params, convs, _group_convs(flat_params, convs)

    def init_fn(params):
        flat_params, _, groups = groups_of(params)
        vectors = ()
        if method == "power":
            vectors = _init_power_vectors(flat_params, groups, mesh, mesh_axis)
        return ProjectConvOperatorNormState(
            count=jnp.zeros([], jnp.int32),
            feasibility_gap=jnp.zeros([], jnp.float32),
            vectors=vectors,
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "project_conv_operator_norm needs `params` (tx.update(updates, state, params)) "
                "to project params + updates"
            )
        flat_params, convs, groups = groups_of(params)
        flat_updates, updates_def = _flatten_like(updates, params)
        if method == "power" and len(state.vectors) != len(groups):
            raise ValueError(
                f"state.vectors holds {len(state.vectors)} groups but params have {len(groups)}"
                " groups of same-shaped conv kernels: init the state with these params"
            )
        operands = (
            {i: flat_params[i] for i, _, _ in convs},
            {i: flat_updates[i] for i, _, _ in convs},
            tuple(state.vectors),
        )
        new_conv_updates, gap, vectors = every_k_steps_apply(
            state.count,
            every_k_steps,
            lambda ops: _project_groups(groups, *ops, **options),
            lambda ops: (ops[1], state.feasibility_gap, ops[2]),
            operands,
            active=bool(convs),
        )
        for i, value in new_conv_updates.items():
            flat_updates[i] = value
        new_state = ProjectConvOperatorNormState(
            count=optax.safe_int32_increment(state.count), feasibility_gap=gap, vectors=vectors
        )
        return jax.tree.unflatten(updates_def, flat_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _flatten_like(updates: Any, params: Any) -> tuple[list[Any], Any]:
    """``jax.tree.flatten(updates)``, checked to have as many leaves as ``params``."""
    flat_updates, updates_def = jax.tree.flatten(updates, is_leaf=discovery.is_leaf_or_hole)
    num_params = len(jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole))
    if len(flat_updates) != num_params:
        raise ValueError(
            f"updates ({updates_def}) must have the structure of params "
            f"({jax.tree.structure(params, is_leaf=discovery.is_leaf_or_hole)})"
        )
    return flat_updates, updates_def
