"""The jitted train / eval / σ_max functions of a run and the state they read and write.

Design (functional NNX API). A model is split once (:func:`split_model`) into static
``graphdef``\\s (training and evaluation mode) and two pure pytrees of arrays: ``params`` (the
``nnx.Param`` state, what the optimiser updates and what :func:`train.find_convs_nnx`
describes) and ``rest`` (BatchNorm statistics, RNG stream state). The train step is a pure
jitted function of a :class:`TrainState` that merges the model inside the trace, so the whole
state is a plain pytree: orbax checkpoints it as it is, and a restored run continues
bit-identically. ``nnx.Optimizer`` is not used because its Python-object state would have to be
split again for every checkpoint; the update it performs (``tx.update`` then
``optax.apply_updates``) is the same.

The loss is the (masked) cross entropy (of scaled, offset logits: ``config.loss``) plus
``penalty_weight * train.spectral_penalty`` (Yi 2020), and, for SVD training (Yang et al. 2020),
``orth_weight * orthogonality_loss + sparsity_weight * sparsity_loss`` (logged as ``orth`` and
``sparsity`` whenever computed, see :func:`svd_terms_on`).

Compilation is shared across runs: the traced hyperparameters (:data:`TRACED_FIELDS`: the
peak learning rate and the projection radius live in the optimiser state, see
:func:`train.optim.make_optimizer`; the loss weights are the ``hyper`` argument, see
:func:`step_hyperparameters`) only enter the cache key by their on/off pattern, the fields that
no step reads (:data:`UNUSED_FIELDS`) not at all, and **every other field** of
:class:`~train.config.TrainConfig` is part of the key (:func:`step_program`): a field added
later recompiles rather than reusing a stale program.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import discovery
from train import distributed
from train.batches import unpack_batch
from train.config import TrainConfig
from train.conv_norms import layer_spectral_norms
from train.optim import current_learning_rate
from train.optim import make_optimizer
from train.regularizers import orthogonality_loss
from train.regularizers import sparsity_loss
from train.regularizers import spectral_penalty

#: Fields whose values are traced: only whether they are on (> 0, not None) shapes the program.
TRACED_FIELDS = ("lr", "penalty_weight", "project_max_norm", "orth_weight", "sparsity_weight")
#: Fields that no step function reads (data, the model's architecture, which is in the
#: graphdefs, and bookkeeping).
UNUSED_FIELDS = (
    "dataset", "data_dir", "augment", "image_pad", "batch_size", "eval_batch_size", "model",
    "model_kwargs", "width", "padding", "shortcut", "decompose_dense", "seed", "log_every",
    "sigma_every", "eval_every", "checkpoint_every", "max_to_keep", "progress", "num_devices",
    "fsdp", "multi_host", "coordinator_address", "num_processes", "process_id",
    "lipschitz_target",
)
#: The metric sums of every step, and those of the SVD-training terms.
SUM_KEYS = ("loss", "penalty", "correct", "count", "steps")
SVD_SUM_KEYS = ("orth", "sparsity")

_CACHE_SIZE = 16


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointed as it is).

    Attributes:
      params: ``nnx.State`` of the ``nnx.Param`` arrays (pure: no ``Variable`` wrappers).
      rest: ``nnx.State`` of every other model variable (BatchNorm statistics, RNG streams).
      opt_state: the optax state of :func:`train.optim.make_optimizer`'s transformation.
      step: int32 scalar, optimiser steps done.
      sums: dict of float32 scalars summed since the last log: ``'loss'`` (cross entropy
        times examples), ``'penalty'`` (per step), ``'correct'``, ``'count'`` (examples),
        ``'steps'``, and, only when :func:`svd_terms_on`, ``'orth'`` and ``'sparsity'``
        (per step; so the checkpoints of runs without them keep their structure).
    """

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    sums: dict[str, jax.Array]


class Steps(NamedTuple):
    """The jitted functions of a run (see :func:`make_steps`)."""

    train_step: Callable[..., tuple[TrainState, Any]]
    eval_step: Callable[..., dict[str, jax.Array]]
    sigmas: Callable[[Any], jax.Array]


def svd_terms_on(config: TrainConfig) -> bool:
    """Whether the step computes (and logs) the SVD-training terms ``orth`` and ``sparsity``:
    for a decomposed model (``config.svd.decomposition`` set) or a positive λ_o or λ_s."""
    return (
        config.svd.decomposition is not None
        or config.svd.orth_weight > 0
        or config.svd.sparsity_weight > 0
    )


def zero_sums(config: TrainConfig | None = None) -> dict[str, jax.Array]:
    """The metric sums of :class:`TrainState` at zero (:data:`SVD_SUM_KEYS` included when
    ``config`` is given and :func:`svd_terms_on`)."""
    keys = SUM_KEYS
    if config is not None and svd_terms_on(config):
        keys = keys + SVD_SUM_KEYS
    return {k: jnp.zeros([], jnp.float32) for k in keys}


def step_hyperparameters(config: TrainConfig) -> dict[str, jax.Array]:
    """The traced loss weights, the ``hyper`` argument of the train step: ``penalty_weight``
    (λ), ``orth_weight`` (λ_o) and ``sparsity_weight`` (λ_s), float32 scalars. (The peak
    learning rate and the projection radius are in the optimiser state.)"""
    return {
        "penalty_weight": jnp.asarray(config.penalty.weight, jnp.float32),
        "orth_weight": jnp.asarray(config.svd.orth_weight, jnp.float32),
        "sparsity_weight": jnp.asarray(config.svd.sparsity_weight, jnp.float32),
    }


def step_program(config: TrainConfig) -> TrainConfig:
    """The part of ``config`` that shapes the compiled steps, as a (hashable) config.

    :data:`UNUSED_FIELDS` are reset to their defaults, :data:`TRACED_FIELDS` to a placeholder
    that keeps only whether they are on, every other field is kept. Two configs with equal
    programs (and equal graphdefs and specs) share the compiled steps of :func:`make_steps`.
    """
    defaults = TrainConfig()
    svd = 1.0 if svd_terms_on(config) else 0.0
    return dataclasses.replace(
        config,
        **{name: getattr(defaults, name) for name in UNUSED_FIELDS},
        lr=1.0,
        penalty_weight=1.0 if config.penalty.weight > 0 else 0.0,
        project_max_norm=None if config.project.max_norm is None else 1.0,
        orth_weight=svd,
        sparsity_weight=svd,
    )


def init_train_state(
    config: TrainConfig,
    specs: Any,
    params: Any,
    rest: Any,
    step: int = 0,
    *,
    folds: tuple = (),
    dense: tuple = (),
) -> TrainState:
    """A fresh :class:`TrainState`: ``params``, ``rest``, the optimiser state of
    ``make_optimizer(config, specs, folds=folds, dense=dense)`` (its hyperparameters set from
    ``config``), ``step`` and zero sums."""
    return TrainState(
        params,
        rest,
        make_optimizer(config, specs, folds=folds, dense=dense).init(params),
        jnp.asarray(step, jnp.int32),
        zero_sums(config),
    )


def split_model(model: nnx.Module, example_input: Any) -> tuple[Any, ...]:
    """``(specs, graphdef_train, graphdef_eval, params, rest)`` of ``model`` (left in training
    mode): its conv specs for ``example_input`` (:func:`train.find_convs_nnx`), its graphdefs in
    training and evaluation mode and its pure ``nnx.Param`` and other state."""
    specs = discovery.find_convs_nnx(model, example_input)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    return specs, graphdef_train, graphdef_eval, nnx.as_pure(params), nnx.as_pure(rest)


def make_steps(
    graphdef_train: nnx.GraphDef,
    graphdef_eval: nnx.GraphDef,
    specs: Any,
    config: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    *,
    folds: tuple = (),
    dense: tuple = (),
) -> Steps:
    """The jitted train / eval / σ_max functions for a model split by :func:`split_model`.

    ``folds`` / ``dense`` (BatchNorm-aware projection, :mod:`train.bn_aware`): passed to
    :func:`train.optim.make_optimizer`; the step then hands the running statistics its forward
    pass produced to the projection (``batch_stats``).

    ``train_step(state, image, label, mask, hyper) -> (state, lr)`` does one optimiser step on
    the mask-weighted mean cross entropy (+ ``hyper['penalty_weight']`` times the spectral
    penalty, + ``hyper['orth_weight']`` times the orthogonality term and
    ``hyper['sparsity_weight']`` times the ``config.svd.sparsity`` term of the SVD layers when
    :func:`svd_terms_on`; ``hyper`` from :func:`step_hyperparameters`) with the model in
    training mode (BatchNorm on batch statistics, running averages updated in ``state.rest``),
    adds its metrics to ``state.sums`` and returns the learning rate it applied.
    ``eval_step(params, rest, image, label, mask, sums) -> sums`` adds the masked loss /
    correct / count of a batch in evaluation mode. ``sigmas(params)`` is
    :func:`train.conv_norms.layer_spectral_norms` with ``config.log.sigma_method``.

    With a ``mesh`` (:mod:`train.distributed`) the functions take global arrays (batches split
    over ``'data'``) and their output state and sums keep the sharding of
    :func:`train.distributed.state_sharding` (replicated, or ``config.distributed.fsdp``); XLA
    inserts the cross-device reductions (mean gradient, BatchNorm statistics and metric sums over
    the global batch); with more than one device, the projection (``config.project.max_norm``)
    spreads its groups of kernels over the mesh (``mesh`` of
    :func:`train.optim.make_optimizer`; the same values as on one device).

    Cached (LRU, 16 entries) on ``(graphdefs, specs, step_program(config), mesh,
    config.distributed.fsdp)``: runs that differ only in the seed, the data, λ, c, λ_o, λ_s or
    the peak learning rate share one compilation. The functions see only :func:`step_program`
    ``(config)``.
    """
    spec_leaves, spec_def = jax.tree.flatten(nnx.as_pure(specs), is_leaf=discovery.is_spec_or_none)
    fsdp = bool(config.distributed.fsdp) if mesh is not None else False
    return _build_steps(
        graphdef_train, graphdef_eval, spec_def, tuple(spec_leaves), step_program(config), mesh,
        fsdp, tuple(folds), tuple(dense),
    )


def _cross_entropy_sums(logits, labels, mask, temperature=1.0, margin=0.0):
    """Masked sums of ``CE(temperature * (logits - margin * onehot(labels)))`` (the loss of
    :class:`train.config.LossConfig`), of correct argmax predictions (of ``logits`` themselves)
    and of the mask."""
    logits = logits.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if margin:
        logits = logits - margin * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if temperature != 1.0:
        logits = temperature * logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _build_steps(
    graphdef_train, graphdef_eval, spec_def, spec_leaves, program, mesh, fsdp, folds=(),
    dense=(),
) -> Steps:
    specs = jax.tree.unflatten(spec_def, spec_leaves)

    def constrain(tree):
        return tree if mesh is None else distributed.constrain_state(tree, mesh, fsdp)

    # The projection's groups of kernels are spread over the devices of a mesh of several.
    tx = make_optimizer(
        program, specs, mesh if mesh is not None and mesh.size > 1 else None, folds=folds,
        dense=dense,
    )
    # The BatchNorm-aware projection reads the running statistics of this step's forward pass.
    stats_arg = "batch_stats" if folds else None
    use_penalty = program.penalty_weight > 0
    use_svd_terms = svd_terms_on(program)

    def loss_fn(params, rest, image, label, mask, hyper):
        model = nnx.merge(graphdef_train, params, rest)
        logits = model(image)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        loss_sum, correct, count = _cross_entropy_sums(
            logits, label, mask, program.loss.temperature, program.loss.margin
        )
        loss = loss_sum / jnp.maximum(count, 1.0)
        penalty = (
            spectral_penalty(params, specs, program.penalty_bound, program.penalty_reduce)
            if use_penalty
            else jnp.zeros([], jnp.float32)
        )
        total = loss + hyper["penalty_weight"] * penalty
        terms = {}
        if use_svd_terms:
            terms["orth"] = orthogonality_loss(params)
            terms["sparsity"] = sparsity_loss(params, program.sparsity)
            total = (
                total
                + hyper["orth_weight"] * terms["orth"]
                + hyper["sparsity_weight"] * terms["sparsity"]
            )
        return total, (nnx.as_pure(new_rest), loss_sum, correct, count, penalty, terms)

    @jax.jit
    def train_step(state: TrainState, image, label, mask, hyper):
        image = jnp.asarray(image, jnp.float32)
        mask = jnp.asarray(mask, jnp.float32)
        grads, (rest, loss_sum, correct, count, penalty, terms) = jax.grad(
            loss_fn, has_aux=True
        )(state.params, state.rest, image, label, mask, hyper)
        extra = {stats_arg: rest} if stats_arg else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        sums = dict(state.sums)
        sums["loss"] = sums["loss"] + loss_sum.astype(jnp.float32)
        sums["penalty"] = sums["penalty"] + jnp.asarray(penalty, jnp.float32)
        sums["correct"] = sums["correct"] + correct
        sums["count"] = sums["count"] + count
        sums["steps"] = sums["steps"] + 1.0
        for name, value in terms.items():
            sums[name] = sums[name] + jnp.asarray(value, jnp.float32)
        new = TrainState(params, rest, opt_state, state.step + 1, sums)
        lr = current_learning_rate(program, state.opt_state, state.step)
        return constrain(new), constrain(lr)

    @jax.jit
    def eval_step(params, rest, image, label, mask, sums):
        model = nnx.merge(graphdef_eval, params, rest)
        logits = model(jnp.asarray(image, jnp.float32))
        loss_sum, correct, count = _cross_entropy_sums(
            logits, label, jnp.asarray(mask, jnp.float32), program.loss.temperature,
            program.loss.margin,
        )
        return constrain({
            "loss": sums["loss"] + loss_sum,
            "correct": sums["correct"] + correct,
            "count": sums["count"] + count,
        })

    @jax.jit
    def sigmas(params):
        return layer_spectral_norms(params, specs, program.sigma_method)

    return Steps(train_step, eval_step, sigmas)


def evaluate(
    steps: Steps, params: Any, rest: Any, source: Any, mesh: jax.sharding.Mesh | None = None
) -> dict[str, float]:
    """Mean loss, accuracy and error over one pass of ``source`` (mask-weighted; one sync).

    Every example with mask 1 counts exactly once, so the final partial batch (padded by the
    pipeline and masked) is included. With a ``mesh`` (that of ``steps``), every batch is
    split over its ``'data'`` axis (:func:`train.distributed.shard_batch`: in a multi-host run
    ``source`` yields this process's rows) and the sums are global.

    Returns:
      ``{'loss', 'accuracy', 'error', 'count'}``.

    Raises:
      ValueError: when ``source`` yields no example.
    """
    sums = {k: jnp.zeros([], jnp.float32) for k in ("loss", "correct", "count")}
    if mesh is not None:
        sums = distributed.place_state(sums, mesh)
    for batch in source.batches(0):
        image, label, mask = unpack_batch(batch)
        if mesh is not None:
            image, label, mask = distributed.shard_batch(
                mesh, np.asarray(image, np.float32), label, np.asarray(mask, np.float32)
            )
        sums = steps.eval_step(params, rest, image, label, mask, sums)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    if count == 0:
        raise ValueError("the evaluation source yielded no example")
    accuracy = float(sums["correct"]) / count
    return {
        "loss": float(sums["loss"]) / count,
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "count": int(count),
    }
