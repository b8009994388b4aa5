"""BatchNorm-aware control: bound the operator a conv applies *together with* its BatchNorm.

In evaluation mode a BatchNorm after a conv is the affine map
``y -> s * (y - running_mean) + beta`` with the per-output-channel scale
``s = gamma / sqrt(running_var + eps)``, so the eval network applies the **folded** kernel
``K · diag(s)`` (``K`` HWIO, ``s`` on its output axis) followed by a translation. Projecting ``K``
alone (:func:`train.project_conv_operator_norm`) does not bound it: a BatchNorm trained on batch
statistics makes the network invariant to the scale of ``K`` (shrink ``K`` and the running
variance shrinks, ``s`` grows by as much), so the folded σ_max of the projected quick-preset
ResNet-8 of ``experiments/network_report.py`` reached 6.3 at ``c = 1`` and its certified network
bound 4,422. This module bounds the folded operator instead:

* :func:`find_batchnorm_folds`: the conv → ``nnx.BatchNorm`` pairs of a model, read from the
  jaxpr of its evaluation-mode forward pass (a conv whose output — plus a bias — goes only to
  the ``x - running_mean`` of a BatchNorm); :func:`find_dense_kernels` its dense weights.
* :func:`project_batchnorm_folded` (optax, last in the chain): every projecting update rescales
  **gamma** (and beta with it: the layer's whole output, which commutes with the ReLU after
  it) so that the folded operator ``K · diag(gamma / sqrt(running_var + eps))``, with the
  running variance of the current step (``batch_stats`` extra argument of ``update``), has
  ``σ_max <= c``. Gamma, not ``K``: a rescale of ``K`` is undone by the batch statistics of
  training mode, a rescale of gamma scales the layer's output in training and in evaluation mode
  alike. Between projections, and inside a step, training-mode BatchNorm normalises with the
  statistics of the batch, so the bound only concerns the evaluation network, whose running
  statistics lag behind (momentum): **the certificate is the one of** :func:`certify_folded`
  **at the end** (and at checkpoints), not of the training steps.
* :func:`certify_folded` (host, float64): rescales gamma (or ``K`` for a BatchNorm without
  scale) of every folded layer whose certified bound exceeds ``c`` and reports the certified
  bound of the folded operator; :func:`certify_folded_train_state` (what the loop runs with
  ``TrainConfig.project_bn_aware``): the running statistics are re-estimated after a rescale
  (:func:`train.recalibrate_batch_stats`), which changes ``s`` downstream, so it alternates
  rescale and re-estimation up to :data:`BN_CERTIFY_ROUNDS` times and, when the last round still
  had to rescale, keeps (freezes) the statistics the last rescale was computed with: **what is
  saved is certified for its own saved statistics** either way; the metadata says which
  (``"bn_stats_match_params"``).
* :func:`train.lipschitz_target.check_lipschitz_target`: the eval network's certified bound
  (:func:`train.report.network_report`'s ``network['lipschitz_upper']``) against
  ``TrainConfig.lipschitz_target``; :class:`train.lipschitz_target.LipschitzTargetError` names
  the blocking op or the
  largest layer.

A mean-only :class:`train.batchnorm.BatchCentering` has no scale (it is a translation in
evaluation mode): its conv needs no fold and is projected alone.

Length: fold discovery from the eval jaxpr, the optax transform and the end-of-run
certification all work on :class:`BatchNormFold` and its scale; kept together until a split
by concern (discovery / transform / certification) is done.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import spectra
from spectra import ConvSpec
from train import discovery
from train._jaxpr import is_var
from train.config import BN_AWARE_METHODS
from train.transforms import every_k_steps_apply

#: Methods of :func:`project_batchnorm_folded`: the bound ``u`` of the folded operator that sets
#: the rescale ``min(1, c / u)``: ``'certified'`` (exact ``σ_max`` of the circular operator,
#: per-frequency SVD: certified), ``'rescale'`` (Gram-iteration upper bound: certified, cheaper)
#: or ``'power'`` (warm-started power estimate, a lower estimate: approximate).
FOLD_METHODS = BN_AWARE_METHODS
#: Rescale / re-estimate rounds of :func:`certify_folded_train_state` at most.
BN_CERTIFY_ROUNDS = 6
#: :func:`certify_folded_train_state` stops once a round's largest folded bound before its
#: rescale is ``<= c (1 + BN_STATS_RTOL)``: the statistics then match the saved parameters up
#: to a rescale of gamma by at most this relative amount.
BN_STATS_RTOL = 1e-3
#: Power iterations run by ``init`` for ``method='power'`` on the initial kernels.
POWER_INIT_ITERATIONS = 50

_PASS_THROUGH = ("convert_element_type", "copy", "copy_p")


@dataclasses.dataclass(frozen=True)
class BatchNormFold:
    """A conv kernel followed by an ``nnx.BatchNorm``: what :func:`find_batchnorm_folds` finds.

    Attributes:
      kernel: the conv kernel's params path (``jax.tree_util.keystr`` of
        :func:`train.discovery.leaf_paths`).
      scale: the BatchNorm's gamma params path, ``None`` for a BatchNorm without scale.
      var: the running variance's path in the non-param state (``rest``/``batch_stats``).
      epsilon: the BatchNorm's ``epsilon``.
      module: the BatchNorm module's path (``'blocks/0/bn1'``).
      bias: the BatchNorm's beta params path (``None``: without bias). Rescaled with gamma, so
        that a rescale multiplies the layer's whole output ``gamma * x_hat + beta`` (and
        commutes with a following ReLU) instead of shrinking it towards ``beta``.
      scale_free: the BatchNorm's output reaches (through ReLUs, as its only use) the conv of
        another fold: in training mode that BatchNorm normalises the scale of this one's output
        away, so the training function does not depend on the scale of (gamma, beta) here, and
        no gradient would restore it once a projection shrank it (and the next fold's norm,
        which grows as its input shrinks, would have to shrink its gamma too).
        :func:`project_batchnorm_folded` therefore *sets* such a fold to ``σ_max = c`` (up or
        down) instead of only shrinking it. (Measured on the quick ResNet-8: no effect at
        ``c = 1``, where these folds are always above ``c`` at a projection; the training loss
        of BN-aware runs still rises at the end of training, see the README.)
    """

    kernel: str
    scale: str | None
    var: str
    epsilon: float
    module: str
    bias: str | None = None
    scale_free: bool = False


def _split_pure(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def _trace(model: nnx.Module, example_args: tuple, example_kwargs: dict):
    """The evaluation-mode jaxpr of ``model`` over ``(param leaves, rest leaves, *args)``."""
    work = nnx.clone(model)
    work.eval()
    graphdef, params, rest = _split_pure(work)
    p_leaves = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
    r_leaves = jax.tree.leaves(rest, is_leaf=discovery.is_leaf_or_hole)
    p_def = jax.tree.structure(params, is_leaf=discovery.is_leaf_or_hole)
    r_def = jax.tree.structure(rest, is_leaf=discovery.is_leaf_or_hole)

    def fn(pl, rl, *args):
        merged = nnx.merge(graphdef, jax.tree.unflatten(p_def, pl), jax.tree.unflatten(r_def, rl))
        return merged(*args, **example_kwargs)

    closed = jax.make_jaxpr(fn)(p_leaves, r_leaves, *example_args)
    return work, closed.jaxpr, params, rest, len(p_leaves), len(r_leaves)


def _analyse(model: nnx.Module, example_args: tuple, example_kwargs: dict):
    """``(folds, dense paths)`` of ``model`` from its top-level evaluation-mode jaxpr."""
    work, jaxpr, params, rest, num_p, num_r = _trace(model, example_args, example_kwargs)
    p_paths = discovery.leaf_paths(params)
    r_paths = discovery.leaf_paths(rest)
    invars = jaxpr.invars
    param_of = {v: i for i, v in enumerate(invars[:num_p])}
    rest_of = {v: i for i, v in enumerate(invars[num_p : num_p + num_r])}
    # Which input leaves each var depends on: ('p', i) / ('r', i) / ('x', 0).
    deps: dict[Any, frozenset] = {}
    for v, i in param_of.items():
        deps[v] = frozenset({("p", i)})
    for v, i in rest_of.items():
        deps[v] = frozenset({("r", i)})
    for v in invars[num_p + num_r :]:
        deps[v] = frozenset({("x", 0)})
    producer: dict[Any, Any] = {}
    consumers: dict[Any, list] = collections.defaultdict(list)
    for eqn in jaxpr.eqns:
        ins = frozenset().union(
            *(deps.get(v, frozenset()) for v in eqn.invars if is_var(v))
        )
        for v in eqn.invars:
            if is_var(v):
                consumers[v].append(eqn)
        for v in eqn.outvars:
            deps[v] = ins
            producer[v] = eqn
    for v in jaxpr.outvars:
        if is_var(v):
            consumers[v].append(None)  # A model output: used outside.

    def param_source(v) -> int | None:
        while v not in param_of:
            eqn = producer.get(v)
            if eqn is None or eqn.primitive.name not in _PASS_THROUGH or len(eqn.invars) != 1:
                return None
            v = eqn.invars[0]
        return param_of[v]

    modules = {tuple(path): module for path, module in nnx.iter_modules(work)}
    p_index = {path: i for i, path in enumerate(p_paths)}
    r_index = {path: i for i, path in enumerate(r_paths)}
    folds, dense, feeds = [], [], {}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            for operand in eqn.invars[:2]:
                if not is_var(operand):
                    continue
                leaf = param_source(operand)
                if leaf is not None and len(operand.aval.shape) == 2:
                    if p_paths[leaf] not in dense:
                        dense.append(p_paths[leaf])
            continue
        if name != "conv_general_dilated":
            continue
        kernel_leaf = param_source(eqn.invars[1])
        if kernel_leaf is None:
            continue
        if eqn.params["dimension_numbers"].out_spec[1] != len(eqn.outvars[0].aval.shape) - 1:
            continue  # Channels not last: BatchNorm(axis=-1) would not be per output channel.
        cur = eqn.outvars[0]
        fold = None
        while True:
            users = consumers.get(cur, [])
            if len(users) != 1 or users[0] is None:
                break
            user = users[0]
            other = [v for v in user.invars if v is not cur]
            if user.primitive.name in _PASS_THROUGH:
                cur = user.outvars[0]
                continue
            other_deps = frozenset().union(
                *(deps.get(v, frozenset()) for v in other if is_var(v))
            )
            if user.primitive.name == "add" and all(k == "p" for k, _ in other_deps):
                cur = user.outvars[0]  # A conv bias: a translation.
                continue
            if (
                user.primitive.name == "sub"
                and user.invars[0] is cur
                and len(other_deps) == 1
                and next(iter(other_deps))[0] == "r"
            ):
                mean_path = r_paths[next(iter(other_deps))[1]]
                fold = _fold_for(mean_path, modules, p_index, r_index, p_paths[kernel_leaf],
                                 eqn.outvars[0].aval.shape[-1])
                if fold is not None:
                    feeds[fold.kernel] = _next_conv(user.outvars[0], consumers, deps,
                                                    param_source, p_paths)
            break
        if fold is not None and fold.kernel not in {f.kernel for f in folds}:
            folds.append(fold)
    kernels = {f.kernel for f in folds}
    folds = [
        dataclasses.replace(f, scale_free=feeds.get(f.kernel) in kernels) for f in folds
    ]
    return tuple(folds), tuple(dense)


#: Elementwise ops a BatchNorm's output may pass (with operands that do not depend on the input)
#: on its way to the next conv for the fold to be scale-free; and positively homogeneous
#: activations (``relu``).
_AFFINE = ("mul", "add", "sub", *_PASS_THROUGH)


def _is_relu(call_jaxpr) -> bool:
    """Whether a ``custom_jvp_call``'s body is ``jax.nn.relu`` (``max(x, 0)``)."""
    text = str(call_jaxpr)
    return "name=relu\n" in text or (text.count(" max ") == 1 and " 0.0:" in text)


def _next_conv(var, consumers, deps, param_source, p_paths) -> str | None:
    """The params path of the conv kernel that ``var`` (a BatchNorm's ``x - mean``) reaches
    through its BatchNorm's affine ops and ReLUs only, as the only use at every step; else
    ``None``."""
    cur = var
    while True:
        users = consumers.get(cur, [])
        if len(users) != 1 or users[0] is None:
            return None
        user = users[0]
        name = user.primitive.name
        others = [v for v in user.invars if v is not cur]
        other_deps = frozenset().union(
            *(deps.get(v, frozenset()) for v in others if is_var(v))
        )
        if name == "conv_general_dilated" and user.invars[0] is cur:
            leaf = param_source(user.invars[1])
            return None if leaf is None else p_paths[leaf]
        if name in _AFFINE and not any(k == "x" for k, _ in other_deps):
            cur = user.outvars[0]
            continue
        if name == "custom_jvp_call" and _is_relu(user.params.get("call_jaxpr")):
            cur = user.outvars[0]
            continue
        if name == "max" and all(not is_var(v) and float(v.val) == 0
                                 for v in others):
            cur = user.outvars[0]
            continue
        return None


def _fold_for(mean_path, modules, p_index, r_index, kernel_path, channels):
    """The :class:`BatchNormFold` whose running mean is at ``mean_path``, or ``None``."""
    if not mean_path.endswith("['mean']"):
        return None
    prefix = mean_path[: -len("['mean']")]
    for path, module in modules.items():
        if not isinstance(module, nnx.BatchNorm):
            continue
        if "".join(f"[{k!r}]" for k in path) != prefix:  # jax.tree_util.keystr of DictKeys.
            continue
        if module.num_features != channels or module.axis != -1:
            return None
        scale = f"{prefix}['scale']" if module.scale is not None else None
        var = f"{prefix}['var']"
        if (scale is not None and scale not in p_index) or var not in r_index:
            return None
        bias = f"{prefix}['bias']" if module.bias is not None else None
        if bias is not None and bias not in p_index:
            return None
        name = "/".join(str(k) for k in path)
        return BatchNormFold(kernel_path, scale, var, float(module.epsilon), name, bias)
    return None


def find_batchnorm_folds(
    model: nnx.Module, *example_args: Any, **example_kwargs: Any
) -> tuple[BatchNormFold, ...]:
    """The conv → ``nnx.BatchNorm`` pairs of ``model`` whose eval operators fold.

    Traces ``model`` in evaluation mode on the example inputs (a copy: ``model`` is untouched)
    and, for every ``lax.conv_general_dilated`` of the top-level jaxpr whose kernel is a
    ``nnx.Param`` (through dtype casts), follows its output: through ``+ bias`` (a params-only
    operand), it must reach, as its **only** use, the ``x - running_mean`` of an
    ``nnx.BatchNorm`` over the conv's output channels (``axis=-1``). Such a conv and BatchNorm
    apply, in evaluation mode, the folded kernel ``K · diag(gamma / sqrt(var + eps))`` then a
    translation. A conv whose output is used elsewhere too (before its BatchNorm), one inside a
    nested ``jit``/``scan`` or followed by anything else (a :class:`train.batchnorm.
    BatchCentering`, an activation) is not folded.

    Args:
      model: a Flax NNX model.
      *example_args: example inputs (a batch of one suffices).
      **example_kwargs: keyword inputs, held fixed.

    Returns:
      One :class:`BatchNormFold` per folded conv, in the order of the forward pass.

    Example:
      >>> from train.models.resnet import ResNet
      >>> model = ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(0))
      >>> folds = find_batchnorm_folds(model, jnp.zeros((1, 12, 12, 1)))
      >>> len(folds), folds[0].module, folds[0].scale
      (7, 'bn', "['bn']['scale']")
    """
    return _analyse(model, example_args, example_kwargs)[0]


def find_dense_kernels(model: nnx.Module, *example_args: Any, **example_kwargs: Any) -> tuple:
    """The params paths of the 2-D ``nnx.Param`` weights used by a ``dot_general`` (dense
    layers, e.g. ``nnx.Linear``'s kernel) in ``model``'s top-level evaluation-mode jaxpr."""
    return _analyse(model, example_args, example_kwargs)[1]


# --------------------------------------------------------------------------- scales and bounds

def _leaf_map(tree: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(nnx.as_pure(tree), is_leaf=discovery.is_leaf_or_hole)
    return dict(zip(discovery.leaf_paths(tree), leaves))


def fold_scale(fold: BatchNormFold, params: Any, batch_stats: Any, xp=jnp) -> Any:
    """``gamma / sqrt(running_var + eps)`` of ``fold`` (``(c_out,)``; ``xp=np``: float64 host)."""
    var = _leaf_map(batch_stats)[fold.var]
    if xp is np:
        var = np.asarray(var, np.float64)
        inv = 1.0 / np.sqrt(var + fold.epsilon)
        if fold.scale is None:
            return inv
        return np.asarray(_leaf_map(params)[fold.scale], np.float64) * inv
    inv = lax.rsqrt(var + jnp.asarray(fold.epsilon, var.dtype))
    if fold.scale is None:
        return inv
    return _leaf_map(params)[fold.scale] * inv


def _circulant(spec: ConvSpec, shape) -> ConvSpec:
    return spectra.circulant_embedding(spec, tuple(shape))


def _bound(kernel: jax.Array, spec: ConvSpec, method: str) -> jax.Array:
    """``u >= σ_max`` of ``spec``'s layer (``'certified'``: exact circular; ``'rescale'``: Gram)."""
    if method == "certified":
        return spectra.spectral_norm(kernel, _circulant(spec, kernel.shape), "fft")
    return spectra.gram_iteration_bound(kernel, spec)


class ProjectFoldedState(NamedTuple):
    """State of :func:`project_batchnorm_folded`.

    Attributes:
      count: int32 scalar, updates seen (those with ``count % every_k_steps == 0`` project).
      max_ratio: float32 scalar, ``max u / c`` over the folded and dense layers at the latest
        projecting update, before its rescale (``u`` the method's bound or estimate; ``<= 1``:
        nothing was rescaled); ``0`` before the first.
      vectors: for ``'power'``, one ``(G, H, W, c_in)`` array of warm-start right vectors per
        group of same-shaped folded kernels; ``()`` otherwise.
    """

    count: jax.Array
    max_ratio: jax.Array
    vectors: tuple = ()


def project_batchnorm_folded(
    max_norm: Any,
    specs: Any,
    folds: Sequence[BatchNormFold],
    *,
    dense: Sequence[str] = (),
    every_k_steps: int = 1,
    method: str = "certified",
    num_rounds: int = 1,
    certify_every: int | None = None,
    certify_method: str = "rescale",
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps every BatchNorm-folded conv operator (and dense layer) at ``σ_max <= max_norm``.

    For each fold (:func:`find_batchnorm_folds`) with ``K`` and gamma taken after the update
    (``params + updates``) and the running variance of ``batch_stats``:

    .. math::

       F = K \cdot \mathrm{diag}\Big(\frac{\gamma}{\sqrt{v + \epsilon}}\Big),\qquad
       (\gamma, \beta) \leftarrow (\gamma, \beta) \cdot \min(1, c / u(F))

    (a :attr:`BatchNormFold.scale_free` fold is set to ``u = c``: multiplied by ``c / u`` also
    when ``u < c``), with ``u`` the method's bound (:data:`FOLD_METHODS`:
    ``'certified'``/``'rescale'`` a
    certified upper bound on the circular operator containing the layer's, so with these
    statistics the folded layer's exact σ_max is ``<= c`` after the update; ``'power'`` a
    warm-started estimate, approximate). A BatchNorm without scale has ``K`` rescaled instead
    (which training-mode BatchNorm then undoes: only evaluation sees it). Each ``dense`` weight
    ``W`` is rescaled to ``σ_max(W) <= c`` (exact SVD). Other leaves' updates pass through:
    chain :func:`train.project_conv_operator_norm` for the convs without a fold (with their
    specs only). Like it, it goes **last** in :func:`optax.chain`; updates with ``count %
    every_k_steps == 0`` project (the first does).

    **What training-mode BatchNorm does between certifications**: a training step normalises
    with the statistics of its batch, not the running ones, and updates the running ones with
    momentum. This projection uses the running variance of ``batch_stats`` (pass the state the
    step's forward pass just produced), so it bounds the *evaluation* network of the current
    running statistics; the training-mode forward pass is never bounded by it, and the running
    statistics move after it. Certify the final model with :func:`certify_folded` (the training
    loop does, see :func:`certify_folded_train_state`).

    Args:
      max_norm: the radius ``c > 0`` (a scalar; traced under ``optax.inject_hyperparams``).
      specs: a :class:`spectra.ConvSpec` per conv leaf (params structure); folds' kernels must
        have one.
      folds: the :class:`BatchNormFold`\ s to project.
      dense: params paths of 2-D dense weights to keep at ``σ_max <= c``.
      every_k_steps: project every ``k``-th update (``k >= 1``).
      method: one of :data:`FOLD_METHODS`.
      num_rounds: power iterations per update for ``'power'`` (``>= 1``).
      certify_every: ``None``, or ``k``: on every ``k``-th update (``(count + 1) % k == 0``) also
        rescale with ``certify_method`` (e.g. ``'power'`` every step, certified every ``k``).
      certify_method: ``'certified'`` or ``'rescale'``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state, params,
      batch_stats=rest)`` needs ``params`` and, with folds, ``batch_stats`` (the model's
      non-param state holding the running variances; pure or with ``nnx.Variable`` wrappers).
      Its state is a :class:`ProjectFoldedState` (with ``certify_every``, a pair with the
      ``optax.conditionally_transform`` state).

    Raises:
      ValueError: naming ``max_norm``, ``folds`` (not :class:`BatchNormFold`\ s, a kernel
        without spec), ``dense``, ``every_k_steps``, ``method``, ``num_rounds``,
        ``certify_every``, ``certify_method``; at ``update``, ``params`` or ``batch_stats``
        when missing or without the folds' paths.

    Example:
      >>> from train.models.resnet import ResNet
      >>> model = ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(0))
      >>> x = jnp.zeros((1, 12, 12, 1))
      >>> specs, folds = discovery.find_convs_nnx(model, x), find_batchnorm_folds(model, x)
      >>> _, params, rest = nnx.split(model, nnx.Param, ...)
      >>> params, rest = nnx.as_pure(params), nnx.as_pure(rest)
      >>> tx = optax.chain(optax.sgd(0.1), project_batchnorm_folded(0.5, specs, folds))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, state, params, batch_stats=rest)
      >>> float(state[1].max_ratio) > 1  # He-initialised folded layers exceed 0.5: rescaled.
      True
    """
    folds = tuple(folds)
    dense = tuple(dense)
    if any(not isinstance(f, BatchNormFold) for f in folds):
        raise ValueError(f"folds must be BatchNormFold instances; got {folds!r}")
    if any(not isinstance(d, str) for d in dense):
        raise ValueError(f"dense must be params paths (str); got {dense!r}")
    if not isinstance(every_k_steps, (int, np.integer)) or every_k_steps < 1:
        raise ValueError(f"every_k_steps={every_k_steps!r} must be a positive int")
    if method not in FOLD_METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {FOLD_METHODS}")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r} must be a positive int")
    if certify_every is not None and (
        isinstance(certify_every, bool) or not isinstance(certify_every, (int, np.integer))
        or certify_every < 1
    ):
        raise ValueError(f"certify_every={certify_every!r} must be None or a positive int")
    if certify_method not in ("certified", "rescale"):
        raise ValueError(
            f"certify_method={certify_method!r} must be 'certified' or 'rescale'"
        )
    if np.ndim(max_norm) != 0:
        raise ValueError(f"max_norm must be a scalar; got shape {np.shape(max_norm)}")
    if not isinstance(max_norm, jax.core.Tracer) and not float(max_norm) > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0")
    cheap = _folded(max_norm, specs, folds, dense, int(every_k_steps), method, int(num_rounds))
    if certify_every is None:
        return cheap
    certify = _folded(max_norm, specs, folds, dense, 1, certify_method, 1)
    k = int(certify_every)
    return optax.chain(
        cheap, optax.conditionally_transform(certify, lambda step: (step + 1) % k == 0)
    )


def _folded(max_norm, specs, folds, dense, every_k_steps, method, num_rounds):
    def layout(params):
        paths = discovery.leaf_paths(params)
        index = {p: i for i, p in enumerate(paths)}
        aligned = discovery.align_with_params(params, specs, "specs")
        leaves = jax.tree.leaves(nnx.as_pure(params), is_leaf=discovery.is_leaf_or_hole)
        groups = collections.defaultdict(list)
        for j, fold in enumerate(folds):
            for path in (fold.kernel, fold.scale, fold.bias):
                if path is not None and path not in index:
                    raise ValueError(f"folds[{j}]: {path} is not a params leaf")
            spec = aligned[index[fold.kernel]]
            if not isinstance(spec, ConvSpec):
                raise ValueError(f"folds[{j}]: kernel {fold.kernel} has no ConvSpec in specs")
            kernel = leaves[index[fold.kernel]]
            groups[(np.shape(kernel), jnp.result_type(kernel), spec)].append(j)
        for path in dense:
            if path not in index:
                raise ValueError(f"dense: {path} is not a params leaf")
            if np.ndim(leaves[index[path]]) != 2:
                raise ValueError(f"dense: {path} is not a 2-D weight")
        return index, groups

    def init_fn(params):
        index, groups = layout(params)
        vectors = ()
        if method == "power":
            leaves = jax.tree.leaves(nnx.as_pure(params), is_leaf=discovery.is_leaf_or_hole)
            vectors = []
            for g, ((shape, dtype, spec), members) in enumerate(groups.items()):
                vshape = (len(members), *spec.input_shape, spec.channels(shape)[0])
                start = jax.random.normal(jax.random.fold_in(jax.random.key(1), g), vshape, dtype)
                if vectors:  # Chained (XLA:CPU LAPACK deadlock, see transforms.py).
                    start = start + 0 * jnp.sum(vectors[-1]).astype(dtype)
                kernels = jnp.stack([leaves[index[folds[j].kernel]] for j in members])

                def warm(kernel, vector, spec=spec):
                    return spectra.clip_operator_norm_power(
                        kernel, spec, 1.0, vector, num_iterations=POWER_INIT_ITERATIONS
                    ).vector

                vectors.append(jax.vmap(warm)(kernels, start))
            vectors = tuple(vectors)
        return ProjectFoldedState(
            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), vectors
        )

    def update_fn(updates, state, params=None, *, batch_stats=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("project_batchnorm_folded needs `params` (tx.update(..., params))")
        if folds and batch_stats is None:
            raise ValueError(
                "project_batchnorm_folded needs `batch_stats` (the model's non-param state "
                "with the running variances): tx.update(updates, state, params, "
                "batch_stats=rest)"
            )
        index, groups = layout(params)
        flat_params = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
        flat_updates, updates_def = jax.tree.flatten(updates, is_leaf=discovery.is_leaf_or_hole)
        stats = _leaf_map(batch_stats) if folds else {}
        for j, fold in enumerate(folds):
            if fold.var not in stats:
                raise ValueError(f"batch_stats has no {fold.var} (folds[{j}])")
        touched = sorted(
            {index[f.kernel] for f in folds}
            | {index[f.scale] for f in folds if f.scale is not None}
            | {index[f.bias] for f in folds if f.scale is not None and f.bias is not None}
            | {index[d] for d in dense}
        )

        def project(operands):
            p, u, vectors = operands
            new = {i: (p[i] + u[i]).astype(p[i].dtype) for i in touched}  # optax.apply_updates.
            out = dict(u)
            ratios, new_vectors = [], []
            c = jnp.asarray(max_norm, jnp.float32)
            chain = jnp.zeros([], jnp.float32)
            for g, ((_, _, spec), members) in enumerate(groups.items()):
                kernels = []
                for j in members:
                    fold = folds[j]
                    var = stats[fold.var]
                    inv = lax.rsqrt(var + jnp.asarray(fold.epsilon, var.dtype))
                    s = inv if fold.scale is None else new[index[fold.scale]] * inv
                    kernel = new[index[fold.kernel]]
                    kernels.append(kernel * s.astype(kernel.dtype))
                folded = jnp.stack(kernels)
                folded = folded + (0 * chain).astype(folded.dtype)  # Serialise the groups.
                if method == "power":

                    def estimate(kernel, vector, spec=spec):
                        r = spectra.clip_operator_norm_power(
                            kernel, spec, 1.0, vector, num_iterations=num_rounds
                        )
                        return r.sigma, r.vector

                    u_fold, vec = jax.vmap(estimate)(folded, vectors[g])
                    new_vectors.append(vec)
                else:
                    u_fold = jax.vmap(lambda k, spec=spec: _bound(k, spec, method))(folded)
                u_fold = u_fold.astype(jnp.float32)
                chain = jnp.max(u_fold)
                free = jnp.asarray([folds[j].scale_free and folds[j].scale is not None
                                    for j in members])
                # Shrink to c; scale-free folds also grow to c (their scale is free).
                factor = jnp.where((u_fold > c) | (free & (u_fold > 0)),
                                   c / jnp.where(u_fold > 0, u_fold, 1.0), 1.0)
                ratios.append(jnp.max(u_fold) / c)
                for m, j in enumerate(members):
                    fold = folds[j]
                    targets = [fold.kernel] if fold.scale is None else [fold.scale, fold.bias]
                    for target in targets:
                        if target is None:
                            continue
                        i = index[target]
                        a = factor[m].astype(new[i].dtype)
                        out[i] = jnp.where(
                            factor[m] != 1, (a * new[i] - p[i]).astype(u[i].dtype), u[i]
                        )
            for path in dense:
                i = index[path]
                w = new[i] + (0 * chain).astype(new[i].dtype)
                sigma = jnp.linalg.norm(w.astype(jnp.float32), 2)
                chain = sigma
                factor = jnp.where(sigma > c, c / jnp.where(sigma > 0, sigma, 1.0), 1.0)
                ratios.append(sigma / c)
                out[i] = jnp.where(
                    factor < 1, (factor.astype(w.dtype) * new[i] - p[i]).astype(u[i].dtype), u[i]
                )
            ratio = jnp.max(jnp.stack(ratios)) if ratios else jnp.zeros([], jnp.float32)
            return out, ratio.astype(jnp.float32), tuple(new_vectors)

        def skip(operands):
            return operands[1], state.max_ratio, operands[2]

        p = {i: flat_params[i] for i in touched}
        u = {i: flat_updates[i] for i in touched}
        operands = (p, u, tuple(state.vectors))
        new_u, ratio, vectors = every_k_steps_apply(
            state.count, every_k_steps, project, skip, operands, active=bool(touched)
        )
        for i, value in new_u.items():
            flat_updates[i] = value
        new_state = ProjectFoldedState(
            optax.safe_int32_increment(state.count), ratio, vectors
        )
        return jax.tree.unflatten(updates_def, flat_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def unfolded_specs(specs: Any, folds: Sequence[BatchNormFold]) -> Any:
    """``specs`` with ``None`` at the folds' kernels (what the plain projection keeps)."""
    kernels = {f.kernel for f in folds}
    pure = nnx.as_pure(specs)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(
        pure, is_leaf=lambda x: x is None or isinstance(x, ConvSpec)
    )
    return jax.tree.unflatten(
        treedef,
        [None if jax.tree_util.keystr(p) in kernels else s for p, s in with_path],
    )


# ----------------------------------------------------------------------------- certification

def _set_leaves(tree: Any, values: dict[str, Any]) -> Any:
    paths = discovery.leaf_paths(tree)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=discovery.is_leaf_or_hole)
    return jax.tree.unflatten(
        treedef, [values.get(p, leaf) for p, leaf in zip(paths, leaves)]
    )


def _headroom(values: Any) -> float:
    """``1 - 8 eps`` of the values' float dtype: a rescale to ``c`` times this stays ``<= c``
    after rounding the rescaled values to that dtype (each moves by at most ``eps / 2``
    relative, so the norm by at most that factor) and the bound's rounding allowance."""
    dtype = np.asarray(values).dtype  # jnp.finfo: bfloat16 too.
    eps = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 2.0**-52
    return 1.0 - 8 * eps


def folded_upper_bound(kernel: Any, scale: Any, spec: ConvSpec) -> float:
    """Certified float64 upper bound on σ_max of the folded layer ``kernel · diag(scale)``.

    :func:`train.certify.certified_upper_bound` of ``kernel * scale`` (``scale`` on the output
    axis): the exact σ_max of the circular operator containing ``spec``'s layer (exact for a
    circular layer).
    """
    from train.certify import certified_upper_bound

    folded = np.asarray(kernel, np.float64) * np.asarray(scale, np.float64)
    return certified_upper_bound(folded, spec)


def certify_folded(
    params: Any,
    batch_stats: Any,
    specs: Any,
    folds: Sequence[BatchNormFold],
    max_norm: float,
    *,
    dense: Sequence[str] = (),
    tolerance: float | None = None,
) -> tuple[Any, Any]:
    """Certifies every folded layer (and dense weight) of ``params`` at ``σ_max <= max_norm``.

    (:func:`_certify_folded` also returns the largest ``u / c`` before the rescale.)

    Host-side, float64. For each fold, ``u`` = :func:`folded_upper_bound` of ``K · diag(s)``
    with ``s = gamma / sqrt(var + eps)`` from ``params`` and ``batch_stats``; where ``u > c``,
    gamma and beta (``K`` without scale) are multiplied by ``c / u`` (in their dtype). Each
    dense weight with exact ``σ_max(W) > c`` (float64 SVD) is multiplied by ``c / σ_max``. Both
    rescales aim at ``c (1 - 8 eps)`` of the values' dtype, so that rounding cannot lift a bound
    back above ``c`` and certifying the result again changes nothing. Then the bounds of
    the **returned** values are computed: with these ``batch_stats``, each folded layer of the
    evaluation network has exact σ_max ``<=`` its reported bound ``<= c (1 + tolerance)``.
    Convs without fold are not touched (:func:`train.certify.certify_conv_operator_norm`).

    Args:
      params: the params pytree (host or device arrays).
      batch_stats: the non-param state holding the folds' running variances.
      specs: a :class:`spectra.ConvSpec` per conv leaf (params structure).
      folds: from :func:`find_batchnorm_folds`.
      max_norm: ``c > 0``.
      dense: params paths of dense weights to certify too.
      tolerance: of the report (default :data:`train.certify.CERTIFY_TOLERANCE`).

    Returns:
      ``(params, report)``: a :class:`train.certify.CertificationReport` with one entry per fold
      (``folded_with`` its BatchNorm) and per dense weight.
    """
    return _certify_folded(
        params, batch_stats, specs, folds, max_norm, dense=dense, tolerance=tolerance
    )[:2]


def _certify_folded(params, batch_stats, specs, folds, max_norm, *, dense=(), tolerance=None):
    from train.certify import CERTIFY_TOLERANCE
    from train.certify import CertificationReport

    c = float(max_norm)
    before = 0.0
    if not c > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0")
    tol = CERTIFY_TOLERANCE if tolerance is None else float(tolerance)
    values = {k: np.asarray(v) for k, v in _leaf_map(params).items()}
    stats = {k: np.asarray(v) for k, v in _leaf_map(batch_stats).items()}
    aligned = dict(zip(discovery.leaf_paths(params), discovery.align_with_params(
        params, specs, "specs")))
    new: dict[str, np.ndarray] = {}
    layers, radii, bounds, changed, with_ = [], [], [], [], []
    for fold in folds:
        spec = aligned[fold.kernel]
        kernel = values[fold.kernel]
        inv = 1.0 / np.sqrt(np.asarray(stats[fold.var], np.float64) + fold.epsilon)
        gamma = None if fold.scale is None else values[fold.scale]
        scale = inv if gamma is None else np.asarray(gamma, np.float64) * inv
        u = folded_upper_bound(kernel, scale, spec)
        before = max(before, u / c)
        did = u > c
        if did:
            # Rescaled to just below c: the rounding of the new values to their dtype (and the
            # bound's own allowance) cannot lift the bound back above c, so that certifying
            # the result again changes nothing.
            target = c / u * _headroom(kernel if gamma is None else gamma)
            if gamma is None:
                kernel = (np.asarray(kernel, np.float64) * target).astype(kernel.dtype)
                new[fold.kernel] = kernel
            else:
                gamma = (np.asarray(gamma, np.float64) * target).astype(gamma.dtype)
                new[fold.scale] = gamma
                if fold.bias is not None:
                    beta = values[fold.bias]
                    new[fold.bias] = (np.asarray(beta, np.float64) * target).astype(beta.dtype)
                scale = np.asarray(gamma, np.float64) * inv
            u = folded_upper_bound(kernel, scale, spec)
        layers.append(fold.kernel)
        radii.append(c)
        bounds.append(u)
        changed.append(bool(did))
        with_.append(fold.module)
    for path in dense:
        w = values[path]
        sigma = float(np.linalg.norm(np.asarray(w, np.float64), 2))
        before = max(before, sigma / c)
        did = sigma > c
        if did:
            w = (np.asarray(w, np.float64) * (c / sigma * _headroom(w))).astype(w.dtype)
            new[path] = w
            sigma = float(np.linalg.norm(np.asarray(w, np.float64), 2))
        layers.append(path)
        radii.append(c)
        bounds.append(sigma)
        changed.append(bool(did))
        with_.append("dense")
    out = _set_leaves(params, {k: jnp.asarray(v) for k, v in new.items()}) if new else params
    report = CertificationReport(
        method="certified",
        layers=tuple(layers),
        max_norms=tuple(radii),
        upper_bounds=tuple(bounds),
        changed=tuple(changed),
        tolerance=tol,
        folded_with=tuple(with_),
    )
    return out, report, before


def _merge_reports(first, second):
    from train.certify import CertificationReport

    def pad(r):
        return r.folded_with or (None,) * len(r.layers)

    return CertificationReport(
        method=first.method,
        layers=first.layers + second.layers,
        max_norms=first.max_norms + second.max_norms,
        upper_bounds=first.upper_bounds + second.upper_bounds,
        changed=first.changed + second.changed,
        tolerance=first.tolerance,
        folded_with=pad(first) + pad(second),
    )


def certify_folded_train_state(
    config: Any,
    specs: Any,
    state: Any,
    mesh: Any,
    recalibrate: Callable[[Any, Any], Any],
    folds: Sequence[BatchNormFold],
    dense: Sequence[str] = (),
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """:func:`train.certify.certify_train_state` for a BatchNorm-aware run.

    1. Convs without fold: :func:`train.certify.certify_conv_operator_norm`
       (``config.project.certify_method``); if it changed a kernel, the running statistics are
       re-estimated (``recalibrate``).
    2. Up to :data:`BN_CERTIFY_ROUNDS` rounds of :func:`certify_folded` with the current
       statistics, each followed, when it rescaled something, by a re-estimation of the
       statistics for the new parameters (a rescaled gamma changes the inputs, hence the
       statistics, of every later BatchNorm). It stops at the first round that changes nothing
       (the saved statistics are then those the parameters were certified with *and* those
       re-estimated for them, or the training ones when nothing was ever rescaled), or after
       the last round, whose statistics are kept **frozen** (not re-estimated after its
       rescale: certified for them, slightly stale for the parameters). A round whose largest
       bound before rescaling is ``<= c (1 + BN_STATS_RTOL)`` also ends it (its rescale is
       still applied). Either way the saved evaluation network has every folded layer at
       ``σ_max <= c`` up to the tolerance, for the saved statistics.

    Returns:
      ``(params, rest, separate, meta)`` as :func:`train.certify.certify_train_state`; ``meta``
      adds ``"bn_aware": true``, ``"bn_certify_rounds"``, ``"bn_last_round_ratio"`` (the last
      round's largest bound / c before its rescale) and ``"bn_stats_match_params"`` (the rounds
      ended with that ratio ``<= 1 + BN_STATS_RTOL``: the saved statistics were estimated for
      the saved parameters up to that last small rescale; ``false``: frozen after a larger one).
    """
    from train import distributed
    from train.certify import certify_conv_operator_norm

    c = config.project.max_norm
    params = distributed.host_values(state.params)
    params, rep_u = certify_conv_operator_norm(
        params, unfolded_specs(specs, folds), c, method=config.project.certify_method
    )
    rest = state.rest
    recalibrated = False
    if rep_u.any_changed:
        new_rest = recalibrate(distributed.place_state(params, mesh, config.distributed.fsdp), rest)
        recalibrated = new_rest is not rest
        rest = new_rest
    rounds, match, any_folded, ratio = 0, True, False, 0.0
    for rounds in range(1, BN_CERTIFY_ROUNDS + 1):
        params, rep_f, ratio = _certify_folded(
            params, distributed.host_values(rest), specs, folds, c, dense=dense
        )
        any_folded = any_folded or rep_f.any_changed
        if ratio <= 1 + BN_STATS_RTOL:  # Nothing, or next to nothing, rescaled.
            break
        if rounds == BN_CERTIFY_ROUNDS:
            match = False
            break
        new_rest = recalibrate(distributed.place_state(params, mesh, config.distributed.fsdp), rest)
        if new_rest is rest:  # No re-estimation (no batches): certified for these statistics.
            match = False
            break
        rest, recalibrated = new_rest, True
    report = _merge_reports(rep_u, rep_f)
    changed = rep_u.any_changed or any_folded
    meta = {
        **report.as_metadata(),
        "certified_params_separate": changed,
        "bn_aware": True,
        "bn_certify_rounds": rounds,
        "bn_last_round_ratio": ratio,
        "bn_stats_match_params": match,
    }
    if not changed:
        return state.params, state.rest, None, meta
    params = distributed.place_state(params, mesh, config.distributed.fsdp)
    meta["certified_batch_stats_recalibrated"] = recalibrated
    return params, rest, {"params": params, "rest": rest}, meta


# ---------------------------------------------------------------------------- Lipschitz target

def radius_for_target(target: float, num_layers: int) -> float:
    """The per-layer radius ``c = L^(1/n)`` that :class:`~train.config.TrainConfig`'s
    ``lipschitz_target`` uses when ``project_max_norm`` is not given (``n`` = constrained conv
    and dense layers). For a chain of ``n`` layers and 1-Lipschitz activations the composition
    is then ``<= L``; residual sums add (``1 + c^2`` per block), so ResNets need an explicit,
    smaller ``project_max_norm``."""
    if not num_layers >= 1:
        raise ValueError(f"num_layers={num_layers!r} must be >= 1")
    return float(target) ** (1.0 / num_layers)


def resolve_config(config: Any, model: nnx.Module, example: Any, specs: Any):
    """``(config, folds, dense)`` of a run: the folds and dense weights to project, and
    ``config`` with ``project_max_norm`` set to :func:`radius_for_target` when
    ``lipschitz_target`` is set without it (``((), ())`` and ``config`` itself for a run that
    is not BatchNorm-aware)."""
    from train.conv_norms import conv_layers

    if not config.project.bn_aware and config.project.lipschitz_target is None:
        return config, (), ()
    folds, dense = _analyse(model, (example,), {})
    if config.project.lipschitz_target is None:
        dense = ()
    if config.project.max_norm is None:
        n = len(conv_layers(specs)) + len(dense)
        config = dataclasses.replace(
            config, project_max_norm=radius_for_target(config.project.lipschitz_target, n)
        )
    return config, folds, dense


__all__ = [
    "BN_CERTIFY_ROUNDS",
    "FOLD_METHODS",
    "BatchNormFold",
    "ProjectFoldedState",
    "certify_folded",
    "certify_folded_train_state",
    "resolve_config",
    "find_batchnorm_folds",
    "find_dense_kernels",
    "fold_scale",
    "folded_upper_bound",
    "project_batchnorm_folded",
    "radius_for_target",
    "unfolded_specs",
]
