"""Optax transforms that keep conv layers inside an operator-norm ball during training."""

from __future__ import annotations

import collections
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


def _max_norm_per_spec(max_norm: Any, specs: Any) -> tuple[Any, list[Any] | None]:
    """Validates ``max_norm``; returns it as a scalar, or as a list aligned with specs' leaves."""

    def check(value, where: str):
        if np.ndim(value) != 0:
            raise ValueError(f"max_norm{where} must be a scalar; got shape {np.shape(value)}")
        if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
            raise ValueError(f"max_norm{where}={value!r} must be > 0")

    if isinstance(max_norm, (int, float, np.number, np.ndarray, jax.Array)):
        check(max_norm, "")
        return max_norm, None
    stripped_specs = nnx.as_pure(specs)
    treedef = jax.tree.structure(stripped_specs, is_leaf=_is_spec_or_none)
    try:
        norms = treedef.flatten_up_to(nnx.as_pure(max_norm))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"max_norm must be a scalar or a pytree with the structure of specs ({treedef}); "
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

    For each params leaf with a :class:`spectra.ConvSpec` in ``specs``, the updates are
    rewritten so that ``params + updates`` is
    ``spectra.clip_operator_norm(params + updates, spec, max_norm, method=method,
    num_rounds=num_rounds).kernel``; other leaves' updates are returned untouched. Like
    :func:`optax.keep_params_nonnegative`, it needs ``params`` and goes **last** in
    :func:`optax.chain`.

    .. math::

       u \leftarrow \Pi_{\{\|K\|_{op} \le c\}}(p + u) - p

    Only updates with ``count % every_k_steps == 0`` project (``count`` counts updates from 0),
    so **the first update projects** (an initial kernel outside the ball is brought in at once),
    then updates ``k, 2k, ...``; parameters after other updates may leave the ball. The choice
    is made with :func:`jax.lax.cond` on the step counter (for ``every_k_steps > 1``): no host
    synchronisation, and the projection is not computed on skipped steps.
    This cond is written here rather than by wrapping the transform in
    ``optax.conditionally_transform`` (optax 0.2.8; used below for ``certify_every``), because
    the wrapper would change the state: it nests it as ``ConditionallyTransformState(
    inner_state, step)`` with a second step counter, and the inner ``count`` would then count
    projecting updates only, while :class:`ProjectConvOperatorNormState` documents ``count`` as
    every update seen and keeps one layout whatever ``every_k_steps`` (the optimiser state that
    checkpoints save and resumed runs restore bit-identically). ``optax.MultiSteps``
    (gradient accumulation) and ``optax.conditionally_mask`` (zero updates on skipped steps)
    do something else.

    Guarantees, per projected kernel (``'certified'``, the default): the exact σ_max of the
    layer described by the spec (zero padded or circular) is ``<= max_norm`` up to rounding.
    ``'sedghi'``/``'dykstra'`` are approximate projections (see
    ``state.feasibility_gap``), ``'rescale'`` is certified and the cheapest certified one.
    ``'power'`` is the cheapest (measured: the only one within 25% of a plain ResNet-20 step on
    CPU, ``benchmarks/bench_train_step.py``) and **approximate**: ``num_rounds`` power
    iterations on the real layer per projecting update, warm-started from the vectors kept in
    the state, then ``K * min(1, c / σ̂)`` with ``σ̂`` a lower estimate of σ_max
    (:func:`spectra.clip_operator_norm_power`), so σ_max may exceed ``c`` by the estimate's
    error. A kernel already inside
    the ball of the circular operator the method works on is left bit-identical: its update is
    returned unchanged. Kernels with equal ``(shape, dtype, spec)`` are stacked and projected
    with one :func:`jax.vmap`.

    **Cheap every step, certified every k steps** (``certify_every=k``): the transform is
    ``optax.chain(P_method, optax.conditionally_transform(P_certify, every k-th update))`` with
    ``P_certify`` the projection with ``method=certify_method`` (a pure certified rescale, see
    :data:`CERTIFIED_METHODS`) applied to the output of ``P_method``, on the updates with
    ``(count + 1) % k == 0``: the parameters **after** updates ``k, 2k, ...`` are certified
    (every layer's exact σ_max ``<= max_norm`` up to rounding), so a checkpoint saved after a
    multiple of ``k`` steps holds certified parameters. Every other update is exactly the one of
    ``method`` alone (e.g. ``'power'``). Certify the final parameters with
    :func:`train.certify.certify_conv_operator_norm` whatever ``k``.

    **Sharded over devices** (``mesh``): each group's stacked kernels (and power vectors) are
    padded to a multiple of ``mesh.shape[mesh_axis]`` and constrained
    (:func:`jax.lax.with_sharding_constraint`) to be split over ``mesh_axis`` on the stack
    dimension, so the projection's per-step cost per device falls as devices are added; the
    results are gathered back (replicated). The values equal the single-device ones (same
    per-kernel program). Use it under :func:`jax.jit` with params replicated on ``mesh``.

    A traced radius (e.g. a sweep over ``c`` without recompiling): wrap the factory with
    :func:`optax.inject_hyperparams`, giving the integer options as static arguments, e.g.
    ``optax.inject_hyperparams(project_conv_operator_norm, static_args=('every_k_steps',
    'num_rounds', 'certify_every'))(max_norm=1.0, specs=specs, method='power')``; the radius is
    then ``state.hyperparams['max_norm']``.

    Works under :func:`jax.jit`, inside :func:`optax.masked` / :func:`optax.multi_transform`
    (``specs`` and a per-layer ``max_norm`` keep the structure of the full params tree) and with
    ``flax.nnx.Optimizer(model, tx, wrt=nnx.Param)``: ``specs`` from
    :func:`train.find_convs_nnx` (``nnx.Variable`` wrappers on either side are ignored).

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
        projection on every ``k``-th update (``(count + 1) % k == 0``).
      certify_method: one of :data:`CERTIFIED_METHODS`, used when ``certify_every`` is set.
      mesh: a :class:`jax.sharding.Mesh` to spread each group of kernels over; ``None``: no
        sharding constraint.
      mesh_axis: the name of the ``mesh`` axis the groups are split over.

    Returns:
      An :class:`optax.GradientTransformation`. Its state is a
      :class:`ProjectConvOperatorNormState`; with ``certify_every``, the tuple
      ``(ProjectConvOperatorNormState, optax.ConditionallyTransformState)`` whose
      ``[1].inner_state`` is the certifying projection's state (its ``feasibility_gap`` is the
      certified bound's gap ``<= 0`` at the latest certified update, its ``count`` the number of
      certified updates) and ``[1].step`` the update counter.

    Raises:
      ValueError: naming ``max_norm`` (not positive, not a scalar, wrong structure),
        ``specs`` (not ConvSpecs, wrong structure),
        ``every_k_steps``, ``method``, ``num_rounds``, ``certify_every``,
        ``certify_method``, ``mesh`` or ``mesh_axis``; at ``init``/``update``,
        naming the params leaf when a spec is given for a leaf that is not a 4-D kernel
        matching it, and naming ``params`` when they are missing.

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

      Power every step, a certified rescale after every 10th update:

      >>> tx = project_conv_operator_norm(1.0, specs, method='power', certify_every=10)
      >>> state = tx.init(params)

    References:
      H. Sedghi, V. Gupta, P. M. Long. The Singular Values of Convolutional Layers. ICLR 2019.
    """
    check_projection_options(every_k_steps, method, num_rounds, certify_every, certify_method)
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh or None; got {mesh!r}")
        if mesh_axis not in mesh.axis_names:
            raise ValueError(
                f"mesh_axis={mesh_axis!r} is not an axis of mesh (axes {mesh.axis_names})"
            )
    _check_specs(specs)
    scalar_norm, spec_norms = _max_norm_per_spec(max_norm, specs)
    options = (specs, scalar_norm, spec_norms, mesh, mesh_axis)
    cheap = _projection(*options, int(every_k_steps), method, int(num_rounds))
    if certify_every is None:
        return cheap
    certify = _projection(*options, 1, certify_method, 0)
    k = int(certify_every)
    return optax.chain(
        cheap, optax.conditionally_transform(certify, lambda step: (step + 1) % k == 0)
    )



def check_projection_options(
    every_k_steps: Any,
    method: Any,
    num_rounds: Any,
    certify_every: Any,
    certify_method: Any,
    names: dict[str, str] | None = None,
) -> None:
    """Checks the schedule and method options of :func:`project_conv_operator_norm` (the one
    check of them, also used by ``train.config.ProjectionConfig``).

    Args:
      every_k_steps: a positive int.
      method: one of :data:`PROJECT_METHODS`.
      num_rounds: a non-negative int.
      certify_every: ``None`` or a positive int (not a bool).
      certify_method: one of :data:`CERTIFIED_METHODS`.
      names: the name each argument has in the error messages (default: its own name), e.g.
        ``{'every_k_steps': 'project.every'}``.

    Raises:
      ValueError: naming the first invalid argument and what was expected.
    """
    names = names or {}

    def name(arg: str) -> str:
        return names.get(arg, arg)

    if not isinstance(every_k_steps, (int, np.integer)) or every_k_steps < 1:
        raise ValueError(f"{name('every_k_steps')}={every_k_steps!r} must be a positive int")
    if method not in PROJECT_METHODS:
        raise ValueError(
            f"{name('method')}={method!r} is unknown; expected one of {PROJECT_METHODS}"
        )
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 0:
        raise ValueError(f"{name('num_rounds')}={num_rounds!r} must be a non-negative int")
    if certify_every is not None and (
        isinstance(certify_every, bool)
        or not isinstance(certify_every, (int, np.integer))
        or certify_every < 1
    ):
        raise ValueError(
            f"{name('certify_every')}={certify_every!r} must be None or a positive int"
        )
    if certify_method not in CERTIFIED_METHODS:
        raise ValueError(
            f"{name('certify_method')}={certify_method!r} is unknown; expected one of "
            f"{CERTIFIED_METHODS}"
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

    def conv_leaves(params) -> list[tuple[int, ConvSpec, Any]]:
        """``(leaf index, spec, max_norm)`` for the conv leaves of ``params``; checks shapes."""
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

    def group_convs(flat_params, convs) -> dict[tuple, list[tuple[int, Any]]]:
        """Conv leaves grouped by ``(shape, dtype, spec)``, in order of first appearance."""
        groups = collections.defaultdict(list)
        for i, spec, norm in convs:
            leaf = flat_params[i]
            groups[(np.shape(leaf), jnp.result_type(leaf), spec)].append((i, norm))
        return groups

    def init_fn(params):
        convs = conv_leaves(params)
        vectors = ()
        if method == "power":
            flat_params = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
            vectors = []
            groups = group_convs(flat_params, convs)
            for g, ((shape, dtype, spec), members) in enumerate(groups.items()):
                vshape = (len(members), *spec.input_shape, spec.channels(shape)[0])
                start = jax.random.normal(
                    jax.random.fold_in(jax.random.PRNGKey(0), g), vshape, dtype
                )
                kernels = jnp.stack([flat_params[i] for i, _ in members])
                if vectors:  # Chained like the groups of update_fn (XLA:CPU LAPACK deadlock).
                    start = start + 0 * jnp.sum(vectors[-1]).astype(dtype)

                def warm(kernel, vector, spec=spec):
                    return clip_operator_norm_power(
                        kernel, spec, 1.0, vector, num_iterations=POWER_INIT_ITERATIONS
                    ).vector

                warmed = jax.vmap(warm)(
                    *(_shard_stack(x, mesh, mesh_axis) for x in (kernels, start))
                )
                vectors.append(_gather_stack(warmed, len(members), mesh))
            vectors = tuple(vectors)
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
        convs = conv_leaves(params)
        flat_params = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
        flat_updates, updates_def = jax.tree.flatten(updates, is_leaf=discovery.is_leaf_or_hole)
        if len(flat_updates) != len(flat_params):
            raise ValueError(
                f"updates ({updates_def}) must have the structure of params "
                f"({jax.tree.structure(params, is_leaf=discovery.is_leaf_or_hole)})"
            )
        groups = group_convs(flat_params, convs)
        if method == "power" and len(state.vectors) != len(groups):
            raise ValueError(
                f"state.vectors holds {len(state.vectors)} groups but params have {len(groups)}"
                " groups of same-shaped conv kernels: init the state with these params"
            )

        def project(operands):
            conv_params, conv_updates, vectors = operands
            new_updates = dict(conv_updates)
            gaps, new_vectors = [], []
            for g, ((_, _, spec), members) in enumerate(groups.items()):
                idx = [i for i, _ in members]
                old = jnp.stack([conv_params[i] for i in idx])
                upd = jnp.stack([conv_updates[i] for i in idx])
                norms = jnp.stack([jnp.asarray(n, old.dtype) for _, n in members])
                target = (old + upd).astype(old.dtype)  # As optax.apply_updates.
                if gaps:
                    # A data dependency on the previous group: XLA:CPU (jaxlib 0.10) can
                    # deadlock when one program runs several independent batched LAPACK
                    # eigendecompositions at once; chaining the groups serialises them.
                    target = target + (0 * gaps[-1]).astype(target.dtype)

                def shard(x):  # Spread the group over the mesh axis (identity without a mesh).
                    return _shard_stack(x, mesh, mesh_axis)

                def gather(x, idx=idx):  # Back to the group's size, replicated.
                    return _gather_stack(x, len(idx), mesh)

                if method == "power":

                    def clip(kernel, norm, vector, spec=spec):
                        return clip_operator_norm_power(
                            kernel, spec, norm, vector, num_iterations=num_rounds
                        )

                    result = jax.vmap(clip)(*map(shard, (target, norms, vectors[g])))
                    result = jax.tree.map(gather, result)
                    new_vectors.append(result.vector)
                    gap = result.sigma - norms
                else:

                    def clip(kernel, norm, spec=spec):
                        return clip_operator_norm(
                            kernel, spec, norm, method=method, num_rounds=num_rounds
                        )

                    result = jax.tree.map(gather, jax.vmap(clip)(*map(shard, (target, norms))))
                    gap = result.feasibility_gap
                # Where the projection kept a value, keep the update: params + updates is then
                # bit-identical to the unprojected step (all of it for a kernel inside the ball).
                kept = result.kernel == target
                for j, i in enumerate(idx):
                    u = conv_updates[i]
                    new_updates[i] = jnp.where(
                        kept[j], u, (result.kernel[j] - conv_params[i]).astype(u.dtype)
                    )
                gaps.append(jnp.max(gap).astype(jnp.float32))
            return new_updates, jnp.max(jnp.stack(gaps)), tuple(new_vectors)

        def skip(operands):
            return operands[1], state.feasibility_gap, operands[2]

        conv_params = {i: flat_params[i] for i, _, _ in convs}
        conv_updates = {i: flat_updates[i] for i, _, _ in convs}
        operands = (conv_params, conv_updates, tuple(state.vectors))
        new_conv_updates, gap, vectors = every_k_steps_apply(
            state.count, every_k_steps, project, skip, operands, active=bool(convs)
        )
        for i, value in new_conv_updates.items():
            flat_updates[i] = value
        new_state = ProjectConvOperatorNormState(
            count=optax.safe_int32_increment(state.count), feasibility_gap=gap, vectors=vectors
        )
        return jax.tree.unflatten(updates_def, flat_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
