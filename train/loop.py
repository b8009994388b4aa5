"""Training and evaluation of Flax NNX models with optax: jitted steps, checkpoints, metrics.

Design (functional NNX API). The model is split once with
``nnx.split(model, nnx.Param, ...)`` into a static ``graphdef`` and two pure pytrees of arrays:
``params`` (the ``nnx.Param`` state, what the optimiser updates and what
:func:`train.find_convs_nnx` describes) and ``rest`` (BatchNorm statistics, RNG stream state).
The train step is a pure jitted function of a :class:`TrainState`
``(params, rest, opt_state, step, sums)`` that merges the model inside the trace, so the whole
state is a plain pytree: it is checkpointed by orbax as it is, and a restored run continues
**bit-identically** (same executable, same inputs, same data order). ``nnx.Optimizer`` is not
used because its Python-object state would have to be split again for every checkpoint; the
update it performs (``tx.update`` then ``optax.apply_updates``) is the same.

The optimiser (:func:`make_optimizer`) is ``optax.chain`` of weight decay, SGD-momentum or Adam
with a cosine / piecewise / constant schedule, and, when ``project_max_norm`` is set,
:func:`train.project_conv_operator_norm` last (Sedghi et al. 2019). The loss is the (masked)
cross entropy plus ``penalty_weight * train.spectral_penalty`` (Yi 2020), and, for SVD
training (Yang et al. 2020; ``config.decomposition`` builds the decomposed model),
``orth_weight * train.regularizers.orthogonality_loss + sparsity_weight *
train.regularizers.sparsity_loss`` (both terms are logged as the ``orth`` and ``sparsity``
metrics whenever they are computed: for a decomposed model or a positive weight).

The penalty weight λ, the projection radius c and the SVD-training weights λ_o, λ_s are traced
arguments of the step (:func:`step_hyperparameters`), and the jitted functions are cached
across runs (:func:`make_steps`): a sweep over seeds, λ, c, λ_o or λ_s compiles once (per
on/off pattern of the terms).

Host synchronisation: none per step. Training metrics are summed on the device inside the
state and read every ``log_every`` steps; the per-layer σ_max of the convs is computed by one
jitted function (exact methods, see :func:`layer_spectral_norms`) every ``sigma_every`` steps,
dispatched asynchronously and read at the next log; evaluation sums on the device and reads once.

A run folder holds ``config.json``, ``metrics.csv`` (one row per logged step), ``tensorboard/``
(the same scalars, written with ``tensorboardX``: no TensorFlow needed) and ``checkpoints/``
(orbax ``CheckpointManager``: the train state and a JSON
with the step and the data position ``(epoch, batch)``). A folder is never overwritten:
:func:`train_and_evaluate` raises when it exists and ``resume`` is false; :func:`make_run_dir`
gives a fresh numbered folder.

Randomness: the model's RNG streams (e.g. dropout) live in ``rest`` and are checkpointed (typed
PRNG keys stored as their ``uint32`` data); the data order and augmentation of
``train.data.Pipeline`` are functions of ``(seed, epoch, batch)``, so the saved position restores
them. Single process (evaluation sums are not reduced across hosts).

CPU note: jax 0.10's XLA:CPU can deadlock when batched LAPACK calls (SVD/eigh: the projection,
exact spectra) run concurrently on a 2-core machine; entry points call
:func:`avoid_cpu_lapack_deadlock` before the first computation.

Example::

    from train import loop
    from train.config import TrainConfig

    config = TrainConfig(dataset="digits", image_pad=2, model="resnet8", width=8,
                         num_steps=300, project_max_norm=1.0, project_every=10)
    result = loop.train_and_evaluate(config, loop.make_run_dir("runs"))
    result["test_error"], result["sigma_max"]

Command line: ``python -m train.loop --out runs --config.lr=0.05 model=resnet8 ...``
(``--run-dir DIR --resume`` continues a run).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spectra._exact import spectral_norm
from spectra._spec import ConvSpec
from train import discovery
from train.config import TrainConfig
from train.config import apply_overrides
from train.regularizers import spectral_penalty
from train.transforms import project_conv_operator_norm

#: Zero-padded layers whose dense operator has both dims at most this use ``'dense'`` for σ_max
#: under ``sigma_method='auto'`` (exact); larger ones use ``'lanczos'`` (exact to a tolerance).
MAX_DENSE_SIGMA_DIM = 1024

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.json"

#: XLA flag that avoids a CPU deadlock of jax 0.10 (see :func:`avoid_cpu_lapack_deadlock`).
CPU_DEADLOCK_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_cpu_lapack_deadlock() -> bool:
    """Adds :data:`CPU_DEADLOCK_FLAG` to ``XLA_FLAGS`` if the JAX backend has not started yet.

    jax/jaxlib 0.10 run batched LAPACK calls (SVD, eigh) on XLA:CPU's intra-op thread pool
    (``ParallelBatchMap``) from thunks that themselves occupy the pool's threads; when as many
    independent batched LAPACK calls run concurrently as the pool has threads (2 on a 2-core
    machine), every worker waits for sub-tasks that no free thread can run: the jitted step hangs
    (seen with ``project_conv_operator_norm`` on several layers every step; jax issue reports:
    ffsim PR 684, PyAutoFit issue 1530). Disabling the concurrency-optimised scheduler makes
    XLA reuse buffers between such calls, which orders them; it is a workaround, not a proof.
    Call before the first JAX computation (it is read when the CPU backend starts).

    Returns:
      True when the flag is (now) in ``XLA_FLAGS`` before the backend started, False when the
      backend was already running (nothing can be changed then).
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEADLOCK_FLAG.split("=")[0] in flags:
        return True
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_DEADLOCK_FLAG}".strip()
    return True


#: Config fields that may differ between a run and its resumption (they change no number).
RESUMABLE_CHANGES = frozenset({"progress", "checkpoint_every", "max_to_keep", "data_dir"})


# --------------------------------------------------------------------------------- data protocol
class BatchSource(Protocol):
    """What the loop needs from a data pipeline (e.g. ``train.data.Pipeline``).

    ``batches(epoch, start_batch)`` yields the batches of one epoch from ``start_batch`` on, in an
    order fixed by the pipeline's seed and ``epoch`` (so a resumed run sees the same data), each a
    dict with ``'image'`` ``(B, H, W, C)``, ``'label'`` ``(B,)`` int and optionally ``'mask'``
    ``(B,)`` (1 for real examples, 0 for padding), or a tuple ``(image, label[, mask])``.
    """

    num_batches: int

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Any]: ...


def _unpack(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(batch, dict):
        image, label, mask = batch["image"], batch["label"], batch.get("mask")
    else:
        image, label, *more = batch
        mask = more[0] if more else None
    if mask is None:
        mask = np.ones(np.shape(label)[0], np.float32)
    return image, label, mask


def _num_batches(source: Any) -> int:
    for name in ("num_batches", "steps_per_epoch", "batches_per_epoch"):
        if hasattr(source, name):
            value = getattr(source, name)
            return int(value() if callable(value) else value)
    return len(source)


# ------------------------------------------------------------------------------------ the state
class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointed as it is).

    Attributes:
      params: ``nnx.State`` of the ``nnx.Param`` arrays (pure: no ``Variable`` wrappers).
      rest: ``nnx.State`` of every other model variable (BatchNorm statistics, RNG streams).
      opt_state: the optax state of :func:`make_optimizer`'s transformation.
      step: int32 scalar, optimiser steps done.
      sums: dict of float32 scalars summed since the last log: ``'loss'`` (cross entropy
        times examples), ``'penalty'`` (per step), ``'correct'``, ``'count'`` (examples),
        ``'steps'``, and, only when the SVD-training terms are computed (see
        :func:`svd_terms_on`), ``'orth'`` and ``'sparsity'`` (per step; so the checkpoints of
        runs without them keep their structure).
    """

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    sums: dict[str, jax.Array]


_SUM_KEYS = ("loss", "penalty", "correct", "count", "steps")
_SVD_SUM_KEYS = ("orth", "sparsity")


def svd_terms_on(config: TrainConfig) -> bool:
    """Whether the step computes (and logs) the SVD-training terms ``orth`` and ``sparsity``:
    for a decomposed model (``config.decomposition`` set) or a positive λ_o or λ_s."""
    return (
        config.decomposition is not None or config.orth_weight > 0 or config.sparsity_weight > 0
    )


def _zero_sums(config: TrainConfig | None = None) -> dict[str, jax.Array]:
    keys = _SUM_KEYS
    if config is not None and svd_terms_on(config):
        keys = keys + _SVD_SUM_KEYS
    return {k: jnp.zeros([], jnp.float32) for k in keys}


# ------------------------------------------------------------------------------------ optimiser
def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate as a function of the step: warm-up, then cosine / piecewise / constant.

    ``'cosine'`` decays from ``lr`` to 0 at ``num_steps``; ``'piecewise'`` multiplies ``lr`` by
    ``decay_factor`` at each ``round(b * num_steps)`` for ``b`` in ``boundaries``.
    """
    decay_steps = max(config.num_steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, decay_steps)
    elif config.schedule == "piecewise":
        bounds = {
            max(int(round(b * config.num_steps)) - config.warmup_steps, 1): config.decay_factor
            for b in config.boundaries
        }
        main = optax.piecewise_constant_schedule(config.lr, bounds)
    else:
        main = optax.constant_schedule(config.lr)
    if config.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.join_schedules([warmup, main], [config.warmup_steps])


def make_optimizer(
    config: TrainConfig, specs: Any = None, max_norm: Any = None
) -> optax.GradientTransformation:
    """``optax.chain(weight decay, SGD-momentum | Adam with the schedule[, projection])``.

    Args:
      config: the run's configuration.
      specs: conv specs with the structure of the params (from :func:`train.find_convs_nnx`);
        needed when ``config.project_max_norm`` is set (the projection goes last).
      max_norm: the projection radius to use instead of ``config.project_max_norm`` (e.g. a
        traced scalar, so that runs differing only in the radius share one compilation).

    Returns:
      The transformation; its ``update`` needs ``params`` when the projection is on.
    """
    schedule = learning_rate_schedule(config)
    parts = []
    if config.weight_decay:
        parts.append(
            optax.add_decayed_weights(
                config.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
            )
        )
    if config.optimizer == "sgd":
        parts.append(
            optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
        )
    else:
        parts.append(optax.adam(schedule))
    if config.project_max_norm is not None:
        if specs is None:
            raise ValueError("specs are needed when config.project_max_norm is set")
        parts.append(
            project_conv_operator_norm(
                config.project_max_norm if max_norm is None else max_norm,
                specs,
                every_k_steps=config.project_every,
                method=config.project_method,
                num_rounds=config.project_rounds,
            )
        )
    return optax.chain(*parts)


# --------------------------------------------------------------------------------- conv spectra
def _is_spec_or_none(x) -> bool:
    return x is None or isinstance(x, ConvSpec)


def conv_layers(specs: Any) -> list[tuple[str, ConvSpec]]:
    """``(name, spec)`` of the conv leaves of ``specs``, in params-leaf order.

    Names are the dotted parameter paths, e.g. ``'blocks.0.conv1.kernel'``.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(
        discovery.strip_variables(specs), is_leaf=_is_spec_or_none
    )
    out = []
    for path, spec in with_path:
        if spec is not None:
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            out.append((name, spec))
    return out


def _sigma_method(spec: ConvSpec, kshape: tuple[int, ...], method: str) -> str:
    if method != "auto":
        return method
    if spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides)):
        return "fft"
    if max(spec.in_dim(kshape), spec.out_dim(kshape)) <= MAX_DENSE_SIGMA_DIM:
        return "dense"
    return "lanczos"


def layer_spectral_norms(params: Any, specs: Any, method: str = "auto") -> jax.Array:
    """σ_max of every conv layer, ``(num_convs,)`` in :func:`conv_layers` order.

    With ``method='auto'`` every value is exact: ``'fft'`` (per-frequency SVD) for circular
    layers, ``'dense'`` (SVD of the dense operator) for zero-padded layers with both dims at most
    ``MAX_DENSE_SIGMA_DIM``, ``'lanczos'`` (exact to its tolerance) for larger ones. Jit-able
    (specs static).
    """
    leaves = jax.tree.leaves(
        discovery.strip_variables(params), is_leaf=discovery.is_leaf_or_hole
    )
    aligned = discovery.align_with_params(params, specs, "specs")
    values = []
    for leaf, spec in zip(leaves, aligned):
        if spec is None:
            continue
        kernel = jnp.asarray(leaf)
        if values:
            # One layer after the other (a data dependence): XLA:CPU in jax 0.10 can deadlock
            # when several batched LAPACK calls run concurrently on a small thread pool.
            _, kernel = jax.lax.optimization_barrier((values[-1], kernel))
        values.append(
            spectral_norm(kernel, spec, _sigma_method(spec, kernel.shape, method)).astype(
                jnp.float32
            )
        )
    return jnp.stack(values) if values else jnp.zeros([0], jnp.float32)


# ------------------------------------------------------------------------------------ the steps
class Steps(NamedTuple):
    """The jitted functions of a run (cached across runs that differ only in the seed, λ or c).

    ``train_step(state, image, label, mask, hyper) -> (state, lr)`` with ``hyper`` from
    :func:`step_hyperparameters` (traced: λ and c do not trigger a recompilation).
    """

    train_step: Callable[..., tuple[TrainState, Any]]
    eval_step: Callable[..., dict[str, jax.Array]]
    sigmas: Callable[[Any], jax.Array]
    tx: optax.GradientTransformation


#: Fields of TrainConfig that change the compiled step functions (besides whether the penalty
#: and the projection are on; their λ and c are traced, see :func:`step_hyperparameters`).
_STEP_FIELDS = (
    "num_steps", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
    "warmup_steps", "boundaries", "decay_factor", "penalty_bound", "penalty_reduce",
    "project_every", "project_method", "project_rounds", "sigma_method", "sparsity",
)


def step_hyperparameters(config: TrainConfig) -> dict[str, jax.Array]:
    """The traced scalars of the train step: ``penalty_weight`` (λ), ``max_norm`` (c) and the
    SVD-training weights ``orth_weight`` (λ_o) and ``sparsity_weight`` (λ_s)."""
    c = config.project_max_norm
    return {
        "penalty_weight": jnp.asarray(config.penalty_weight, jnp.float32),
        "max_norm": jnp.asarray(1.0 if c is None else c, jnp.float32),
        "orth_weight": jnp.asarray(config.orth_weight, jnp.float32),
        "sparsity_weight": jnp.asarray(config.sparsity_weight, jnp.float32),
    }

_STEPS_CACHE: dict[Any, Steps] = {}
_STEPS_CACHE_SIZE = 16


def _cross_entropy_sums(logits, labels, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


def make_steps(
    graphdef_train: nnx.GraphDef, graphdef_eval: nnx.GraphDef, specs: Any, config: TrainConfig
) -> Steps:
    """The jitted train / eval / σ_max functions for a model split with ``nnx.split``.

    ``train_step(state, image, label, mask, hyper) -> (state, lr)`` does one optimiser step on
    the mask-weighted mean cross entropy (+ ``hyper['penalty_weight']`` times the spectral
    penalty, + ``hyper['orth_weight']`` times the orthogonality term and
    ``hyper['sparsity_weight']`` times the ``config.sparsity`` term of the SVD layers when
    :func:`svd_terms_on`; projection radius ``hyper['max_norm']``, see
    :func:`step_hyperparameters`) with the
    model in training mode (``graphdef_train``: BatchNorm on batch statistics, running averages
    updated in ``state.rest``) and adds its metrics to ``state.sums``.
    ``eval_step(params, rest, image, label, mask, sums) -> sums`` adds the masked loss / correct /
    count of a batch in evaluation mode. ``sigmas(params)`` is :func:`layer_spectral_norms`.
    Functions are cached on ``(graphdefs, specs, the step-relevant config fields)``, so runs
    that differ only in the seed, λ, c, λ_o or λ_s share one compilation.
    """
    spec_leaves, spec_def = jax.tree.flatten(
        discovery.strip_variables(specs), is_leaf=_is_spec_or_none
    )
    key = (
        graphdef_train,
        graphdef_eval,
        spec_def,
        tuple(spec_leaves),
        tuple(getattr(config, f) for f in _STEP_FIELDS),
        config.penalty_weight > 0,
        config.project_max_norm is not None,
        svd_terms_on(config),
    )
    if key in _STEPS_CACHE:
        return _STEPS_CACHE[key]
    tx = make_optimizer(config, specs)
    schedule = learning_rate_schedule(config)
    use_penalty = config.penalty_weight > 0
    use_svd_terms = svd_terms_on(config)
    if use_svd_terms:
        from train.regularizers import orthogonality_loss
        from train.regularizers import sparsity_loss

    def loss_fn(params, rest, image, label, mask, hyper):
        model = nnx.merge(graphdef_train, params, rest)
        logits = model(image)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        loss_sum, correct, count = _cross_entropy_sums(logits, label, mask)
        loss = loss_sum / jnp.maximum(count, 1.0)
        penalty = (
            spectral_penalty(params, specs, config.penalty_bound, config.penalty_reduce)
            if use_penalty
            else jnp.zeros([], jnp.float32)
        )
        total = loss + hyper["penalty_weight"] * penalty
        terms = {}
        if use_svd_terms:
            terms["orth"] = orthogonality_loss(params)
            terms["sparsity"] = sparsity_loss(params, config.sparsity)
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
        step_tx = (
            make_optimizer(config, specs, max_norm=hyper["max_norm"])
            if config.project_max_norm is not None
            else tx
        )
        updates, opt_state = step_tx.update(grads, state.opt_state, state.params)
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
        return new, schedule(state.step)

    @jax.jit
    def eval_step(params, rest, image, label, mask, sums):
        model = nnx.merge(graphdef_eval, params, rest)
        logits = model(jnp.asarray(image, jnp.float32))
        loss_sum, correct, count = _cross_entropy_sums(
            logits, label, jnp.asarray(mask, jnp.float32)
        )
        return {
            "loss": sums["loss"] + loss_sum,
            "correct": sums["correct"] + correct,
            "count": sums["count"] + count,
        }

    @jax.jit
    def sigmas(params):
        return layer_spectral_norms(params, specs, config.sigma_method)

    steps = Steps(train_step, eval_step, sigmas, tx)
    if len(_STEPS_CACHE) >= _STEPS_CACHE_SIZE:
        _STEPS_CACHE.pop(next(iter(_STEPS_CACHE)))
    _STEPS_CACHE[key] = steps
    return steps


def evaluate(steps: Steps, params: Any, rest: Any, source: Any) -> dict[str, float]:
    """Mean loss, accuracy and error over one pass of ``source`` (mask-weighted; one sync).

    Every example with mask 1 counts exactly once, so the final partial batch (padded by the
    pipeline and masked) is included.
    """
    sums = {k: jnp.zeros([], jnp.float32) for k in ("loss", "correct", "count")}
    for batch in source.batches(0):
        image, label, mask = _unpack(batch)
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


# ---------------------------------------------------------------------------- models and data
def build_model(config: TrainConfig, num_classes: int, in_channels: int) -> nnx.Module:
    """The model named by ``config.model`` (``'resnet<6n+2>'`` or ``'simple_cnn'``), seeded.

    With ``config.decomposition`` set, every conv (and, with ``config.decompose_dense``, every
    dense layer) is replaced by its full-rank SVD form (Yang et al. 2020) with the paper's random
    initialisation: ``train.layers.svd.decompose(model, config.decomposition, init='random',
    dense=config.decompose_dense, rngs=...)`` (seeded by ``config.seed``).
    """
    model = _build_plain_model(config, num_classes, in_channels)
    if config.decomposition is None:
        return model
    from train.layers import svd

    return svd.decompose(
        model,
        config.decomposition,
        dense=config.decompose_dense,
        init="random",
        rngs=nnx.Rngs(config.seed + 1),
    )


def _build_plain_model(config: TrainConfig, num_classes: int, in_channels: int) -> nnx.Module:
    from train.models import resnet

    rngs = nnx.Rngs(config.seed)
    name = config.model.lower()
    if name.startswith("resnet"):
        try:
            depth = int(name[len("resnet"):])
        except ValueError as e:
            raise ValueError(f"model={config.model!r}: expected 'resnet<depth>'") from e
        return resnet.ResNet(
            depth,
            num_classes,
            in_channels=in_channels,
            padding=config.padding,
            shortcut=config.shortcut,
            width=config.width,
            rngs=rngs,
        )
    if name == "simple_cnn":
        w = config.width
        return resnet.SimpleCNN(
            num_classes,
            in_channels=in_channels,
            padding=config.padding,
            features=(w, 2 * w, 2 * w),
            rngs=rngs,
        )
    raise ValueError(f"model={config.model!r}: expected 'resnet<depth>' or 'simple_cnn'")


def build_data(config: TrainConfig) -> tuple[Any, Any, Any]:
    """``(train pipeline, test pipeline, info)`` for ``config.dataset`` (:mod:`train.data`).

    Training: shuffled per epoch with ``config.seed``, normalised with the dataset's train
    statistics, full batches only; with ``config.augment``, random crops with 1 pixel of zero
    padding for inputs of at most 16 px (digits) and 4 otherwise (CIFAR), and horizontal flips
    except for digits. Test: the same normalisation, no augmentation, the last batch padded and
    masked (every example counts once). ``info`` is ``train.data.dataset_info(config.dataset)``.
    Single process (multi-host evaluation would need a cross-process sum).
    """
    from train import data

    info = data.dataset_info(config.dataset)
    x_train, y_train = data.load_split(config.dataset, "train", data_dir=config.data_dir)
    x_test, y_test = data.load_split(config.dataset, "test", data_dir=config.data_dir)
    if config.image_pad:
        pad = ((0, 0), (config.image_pad,) * 2, (config.image_pad,) * 2, (0, 0))
        x_train, x_test = np.pad(x_train, pad), np.pad(x_test, pad)
    small = info.image_shape[0] <= 16
    train = data.Pipeline(
        x_train,
        y_train,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        crop_pad=(1 if small else 4) if config.augment else 0,
        flip=config.augment and config.dataset != "digits",
        mean=info.mean,
        std=info.std,
        drop_remainder=True,
    )
    test = data.Pipeline(
        x_test, y_test, config.eval_batch_size, mean=info.mean, std=info.std,
        drop_remainder=False,
    )
    return train, test, info


# -------------------------------------------------------------------------------- run folders
def make_run_dir(root: str | pathlib.Path, prefix: str = "run") -> pathlib.Path:
    """Creates and returns a fresh folder ``root/<prefix>_<NNN>`` (the first unused number)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(100000):
        path = root / f"{prefix}_{index:03d}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free run folder name under {root}")


def _storable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 data (what orbax can write)."""

    def convert(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x

    return jax.tree.map(convert, tree)


def _from_storable(restored: Any, template: Any) -> Any:
    def convert(x, t):
        if isinstance(t, jax.Array) and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
        return x

    return jax.tree.map(convert, restored, template)


def _checkpoint_manager(run_dir: pathlib.Path, config: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True)
    return ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).absolute(), options=options)


def _save(manager, state: TrainState, meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(meta["step"])
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)), meta=ocp.args.JsonSave(meta)
        ),
    )


def _restore(manager, template: TrainState, step: int | None = None):
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _storable(template))
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return _from_storable(out["state"], template), out["meta"]


# ------------------------------------------------------------------------------------- metrics
class _MetricsWriter:
    """Appends one CSV row per logged step and the same scalars to TensorBoard (tensorboardX)."""

    def __init__(self, path: pathlib.Path, columns: list[str], resume_step: int | None):
        self.path = path
        self.columns = columns
        if resume_step is not None and path.exists():
            # Drop rows written after the checkpoint we resume from: they are recomputed.
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._rewrite(rows)
        else:
            self._rewrite([])
        import tensorboardX

        self.tb = tensorboardX.SummaryWriter(str(path.parent / "tensorboard"))

    def _rewrite(self, rows):
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(
                {k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                 for k, v in row.items()}
            )
        for k, v in row.items():
            if k != "step" and isinstance(v, (float, int, np.floating)):
                self.tb.add_scalar(k, float(v), int(row["step"]))
        self.tb.flush()

    def close(self):
        self.tb.close()


def read_history(run_dir: str | pathlib.Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.csv`` as dicts of floats (empty cells left out)."""
    with (pathlib.Path(run_dir) / METRICS_FILE).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------ the loop
def _check_resume_config(run_dir: pathlib.Path, config: TrainConfig) -> None:
    saved = TrainConfig.load(run_dir / CONFIG_FILE)
    diffs = [
        f"{f.name}: saved {getattr(saved, f.name)!r}, given {getattr(config, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diffs:
        raise ValueError(
            f"config differs from the one of the run in {run_dir} (only {sorted(RESUMABLE_CHANGES)}"
            f" may change on resume): " + "; ".join(diffs)
        )


def _example_input(source: Any) -> np.ndarray:
    image, _, _ = _unpack(next(iter(source.batches(0))))
    return np.asarray(image[:1], np.float32)


def train_and_evaluate(
    config: TrainConfig,
    run_dir: str | pathlib.Path,
    *,
    resume: bool = False,
    until_step: int | None = None,
    model: nnx.Module | None = None,
    train_data: Any = None,
    test_data: Any = None,
) -> dict[str, Any]:
    """Trains ``config``'s model, checkpoints, logs and evaluates on the test split.

    Args:
      config: the run's configuration.
      run_dir: the run folder. Without ``resume`` it must not exist or be empty (a run is never
        overwritten; see :func:`make_run_dir` for a fresh one).
      resume: continue the run in ``run_dir`` from its latest checkpoint (its ``config.json``
        must match ``config`` except for :data:`RESUMABLE_CHANGES`); the continuation is
        bit-identical to an uninterrupted run.
      until_step: stop (with a checkpoint) after this many total steps, before
        ``config.num_steps`` (the schedule still spans ``num_steps``); for preemptible jobs and
        tests of resumption.
      model: a model to train instead of ``build_model(config, ...)`` (a fresh one, built the
        same way on resumption: its values are replaced by the checkpoint's).
      train_data: a :class:`BatchSource` instead of the one from :func:`build_data`.
      test_data: a :class:`BatchSource` (one pass, masked) instead of :func:`build_data`'s.

    Returns:
      A dict: ``run_dir``, ``step``, ``test_accuracy``, ``test_error``, ``test_loss``,
      ``test_count`` (``None`` when stopped early by ``until_step``), ``train_loss`` (mean over
      the last log interval), ``sigma_max`` ``{layer name: σ_max}`` (exact, see
      :func:`layer_spectral_norms`), ``history`` (the rows of ``metrics.csv``), ``compile_s``
      (time of the first step of this call, compile included), ``step_time_s`` (median
      per-step time of the log intervals), ``model`` (the trained model, its state updated in
      place, in training mode) and ``specs`` (its :func:`train.find_convs_nnx` specs).

    Raises:
      FileExistsError: when ``run_dir`` is not empty and ``resume`` is false.
      FileNotFoundError: when ``resume`` is true and ``run_dir`` holds no checkpoint.
      ValueError: naming ``config`` fields that differ from the resumed run's.
    """
    run_dir = pathlib.Path(run_dir)
    if resume:
        if not (run_dir / CHECKPOINT_DIR).exists():
            raise FileNotFoundError(f"resume=True but {run_dir} holds no checkpoint")
        _check_resume_config(run_dir, config)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run_dir={str(run_dir)!r} exists and is not empty; pass resume=True to continue it "
            "or use train.loop.make_run_dir(root) for a fresh folder"
        )
    if until_step is not None and not 0 < until_step <= config.num_steps:
        raise ValueError(f"until_step={until_step} must be in [1, num_steps={config.num_steps}]")
    stop = config.num_steps if until_step is None else until_step

    num_classes = None
    if train_data is None or test_data is None:
        built_train, built_test, info = build_data(config)
        train_data = built_train if train_data is None else train_data
        test_data = built_test if test_data is None else test_data
        num_classes = info.num_classes
    example = _example_input(train_data)
    if model is None:
        if num_classes is None:
            num_classes = _dataset_num_classes(config)
        model = build_model(config, num_classes, example.shape[-1])
    steps_per_epoch = _num_batches(train_data)
    if steps_per_epoch < 1:
        raise ValueError("train_data yields no full batch per epoch")

    specs = discovery.find_convs_nnx(model, example)
    layers = conv_layers(specs)
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    steps = make_steps(graphdef_train, graphdef_eval, specs, config)
    state = TrainState(
        params, rest, steps.tx.init(params), jnp.zeros([], jnp.int32), _zero_sums(config)
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    manager = _checkpoint_manager(run_dir, config)
    resume_step = None
    if resume:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"resume=True but {run_dir / CHECKPOINT_DIR} is empty")
        state, meta = _restore(manager, state)
        resume_step = int(meta["step"])
    else:
        (run_dir / CONFIG_FILE).write_text(config.to_json())

    sigma_cols = [f"sigma/{name}" for name, _ in layers]
    svd_cols = list(_SVD_SUM_KEYS) if svd_terms_on(config) else []
    columns = ["step", "epoch", "lr", "loss", "penalty", *svd_cols, "accuracy", "step_time_s",
               "test_loss", "test_accuracy", *sigma_cols]
    writer = _MetricsWriter(run_dir / METRICS_FILE, columns, resume_step)

    hyper = step_hyperparameters(config)
    step = int(state.step)
    epoch, batch_index = divmod(step, steps_per_epoch)
    iterator = iter(train_data.batches(epoch, start_batch=batch_index))
    progress = _progress_bar(config, step, stop)
    # Rows waiting for the next host synchronisation: step -> {column: float or device array}.
    pending: dict[int, dict[str, Any]] = {}
    interval_times, compile_s, t_last, steps_since = [], None, time.perf_counter(), 0
    last_train_loss, test, final_sigmas = math.nan, None, {}

    def row_at(s: int) -> dict[str, Any]:
        return pending.setdefault(s, {"step": s, "epoch": s / steps_per_epoch})

    def flush() -> None:
        for s in sorted(pending):
            values = jax.device_get(pending[s])
            sigmas = values.pop("_sigmas", None)
            row = {k: (v if k == "step" else float(v)) for k, v in values.items()}
            if sigmas is not None:
                row.update(zip(sigma_cols, (float(v) for v in sigmas)))
            writer.write(row)
        pending.clear()

    try:
        while step < stop:
            try:
                batch = next(iterator)
            except StopIteration:
                epoch += 1
                iterator = iter(train_data.batches(epoch))
                batch = next(iterator)
            image, label, mask = _unpack(batch)
            state, lr = steps.train_step(state, image, label, mask, hyper)
            step += 1
            steps_since += 1
            if progress is not None:
                progress.update(1)
            if compile_s is None:  # One synchronisation, to time the compilation.
                jax.block_until_ready(state.step)
                compile_s = time.perf_counter() - t_last
                t_last, steps_since = time.perf_counter(), 0
            if config.sigma_every and step % config.sigma_every == 0:
                # Dispatched asynchronously; read at the next flush.
                row_at(step)["_sigmas"] = steps.sigmas(state.params)
            if step % config.log_every == 0 or step == config.num_steps:
                sums = jax.device_get(state.sums)  # The loop's host synchronisation.
                now = time.perf_counter()
                step_time = (now - t_last) / steps_since if steps_since else math.nan
                if steps_since:
                    interval_times.append(step_time)
                t_last, steps_since = now, 0
                count = max(float(sums["count"]), 1.0)
                num = max(float(sums["steps"]), 1.0)
                last_train_loss = float(sums["loss"]) / count
                row_at(step).update(
                    lr=lr,
                    loss=last_train_loss,
                    penalty=float(sums["penalty"]) / num,
                    accuracy=float(sums["correct"]) / count,
                    step_time_s=step_time,
                    **{k: float(sums[k]) / num for k in svd_cols},
                )
                state = state._replace(sums=_zero_sums(config))
                if progress is not None:
                    progress.set_postfix(loss=f"{last_train_loss:.4f}", refresh=False)
            if (config.eval_every and step % config.eval_every == 0) or step == config.num_steps:
                test = evaluate(steps, state.params, state.rest, test_data)
                row_at(step).update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            if step == config.num_steps:
                sigmas = steps.sigmas(state.params)
                final_sigmas = {
                    name: float(v) for (name, _), v in zip(layers, jax.device_get(sigmas))
                }
                row_at(step).update(
                    {f"sigma/{name}": v for name, v in final_sigmas.items()}
                )
            if step % config.log_every == 0 or step == stop:
                flush()
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                flush()
                _save(manager, state, _meta(step, steps_per_epoch, config))
        flush()
        _save(manager, state, _meta(step, steps_per_epoch, config))
        if not final_sigmas:
            final_sigmas = {
                name: float(v) for (name, _), v in zip(layers, jax.device_get(
                    steps.sigmas(state.params)))
            }
        if step == config.num_steps and test is None:
            test = evaluate(steps, state.params, state.rest, test_data)
        manager.wait_until_finished()
    finally:
        manager.close()
        writer.close()
        if progress is not None:
            progress.close()
    if step < config.num_steps:
        test = None

    nnx.update(model, state.params, state.rest)
    return {
        "run_dir": str(run_dir),
        "step": step,
        "test_accuracy": None if test is None else test["accuracy"],
        "test_error": None if test is None else test["error"],
        "test_loss": None if test is None else test["loss"],
        "test_count": None if test is None else test["count"],
        "train_loss": last_train_loss,
        "sigma_max": final_sigmas,
        "history": read_history(run_dir),
        "compile_s": compile_s,
        "step_time_s": float(np.median(interval_times)) if interval_times else math.nan,
        "model": model,
        "specs": specs,
    }


def _meta(step: int, steps_per_epoch: int, config: TrainConfig) -> dict[str, Any]:
    epoch, batch = divmod(step, steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch": batch, "seed": config.seed}


def _dataset_num_classes(config: TrainConfig) -> int:
    from train import data

    return data.dataset_info(config.dataset).num_classes


def _progress_bar(config: TrainConfig, initial: int, total: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=False)


def restore_model(
    run_dir: str | pathlib.Path,
    step: int | None = None,
    *,
    model: nnx.Module | None = None,
    example_input: Any = None,
) -> tuple[nnx.Module, TrainConfig, dict[str, Any]]:
    """The trained model of a run folder (latest checkpoint, or ``step``), in eval mode.

    Args:
      run_dir: a folder written by :func:`train_and_evaluate`.
      step: the checkpoint step (``None``: the latest).
      model: a fresh model of the run's architecture (as passed to
        :func:`train_and_evaluate`); built from ``config.json`` when ``None``.
      example_input: one input batch ``(1, H, W, C)``; taken from the run's dataset when
        ``None``.

    Returns:
      ``(model, config, meta)`` with ``meta`` the checkpoint's ``{step, epoch, batch, seed}``.

    Raises:
      FileNotFoundError: when ``run_dir`` holds no checkpoint.
    """
    run_dir = pathlib.Path(run_dir)
    config = TrainConfig.load(run_dir / CONFIG_FILE)
    if example_input is None:
        from train import data

        h, w, c = data.dataset_info(config.dataset).image_shape
        example_input = np.zeros(
            (1, h + 2 * config.image_pad, w + 2 * config.image_pad, c), np.float32
        )
    if model is None:
        model = build_model(config, _dataset_num_classes(config), example_input.shape[-1])
    specs = discovery.find_convs_nnx(model, example_input)
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = make_optimizer(config, specs)
    template = TrainState(
        params, rest, tx.init(params), jnp.zeros([], jnp.int32), _zero_sums(config)
    )
    manager = _checkpoint_manager(run_dir, config)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR} holds no checkpoint")
        state, meta = _restore(manager, template, step)
    finally:
        manager.close()
    nnx.update(model, state.params, state.rest)
    model.eval()
    return model, config, meta


def _split_for_steps(model: nnx.Module, example_input: Any, config: TrainConfig):
    """``(specs, graphdef_train, graphdef_eval, params, rest)`` as :func:`train_and_evaluate`
    splits a model (left in training mode)."""
    specs = discovery.find_convs_nnx(model, example_input)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    return specs, graphdef_train, graphdef_eval, nnx.as_pure(params), nnx.as_pure(rest)


def evaluate_model(
    model: nnx.Module, config: TrainConfig, test_data: Any, example_input: Any = None
) -> dict[str, float]:
    """Test loss / accuracy / error of ``model`` on one pass of ``test_data`` (eval mode).

    The same jitted evaluation as the end of :func:`train_and_evaluate` (BatchNorm running
    averages, every masked-in example counted once), for a model that was not trained by the
    loop (e.g. a pruned one). ``config`` supplies the step-relevant fields of the cached steps.

    Args:
      model: the model (left in training mode afterwards, as the loop leaves it).
      config: a configuration (only the fields of :func:`make_steps`'s cache key matter).
      test_data: a :class:`BatchSource` (one pass, masked).
      example_input: one input batch ``(1, H, W, C)`` (default: ``test_data``'s first example).

    Returns:
      ``{'loss', 'accuracy', 'error', 'count'}`` (see :func:`evaluate`).
    """
    example = _example_input(test_data) if example_input is None else example_input
    specs, graphdef_train, graphdef_eval, params, rest = _split_for_steps(model, example, config)
    steps = make_steps(graphdef_train, graphdef_eval, specs, config)
    return evaluate(steps, params, rest, test_data)


def save_model(
    run_dir: str | pathlib.Path,
    model: nnx.Module,
    config: TrainConfig,
    example_input: Any,
    step: int = 0,
) -> None:
    """Writes ``model`` to a new run folder in the loop's format, readable by
    :func:`restore_model` (and resumable by ``train_and_evaluate(config, run_dir,
    resume=True, model=...)`` with ``config.num_steps > step``).

    The folder gets ``config.json`` (``config``) and one orbax checkpoint at ``step`` holding
    the model's params and other state (BatchNorm statistics, RNG streams) and a fresh
    optimiser state of :func:`make_optimizer` (``config``). For models made outside the loop,
    e.g. a pruned SVD model (:mod:`train.svd_pipeline`).

    Raises:
      FileExistsError: when ``run_dir`` exists and is not empty.
    """
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run_dir={str(run_dir)!r} exists and is not empty")
    specs, _, _, params, rest = _split_for_steps(model, example_input, config)
    tx = make_optimizer(config, specs)
    state = TrainState(
        params, rest, tx.init(params), jnp.asarray(step, jnp.int32), _zero_sums(config)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    manager = _checkpoint_manager(run_dir, config)
    try:
        _save(manager, state, {"step": int(step), "epoch": 0, "batch": 0, "seed": config.seed})
        manager.wait_until_finished()
    finally:
        manager.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m train.loop --out runs [--resume] [--config.key=value | key=value ...]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs"),
                        help="root folder: a fresh numbered run folder is made under it")
    parser.add_argument("--run-dir", type=pathlib.Path, default=None,
                        help="an explicit run folder (must be new unless --resume)")
    parser.add_argument("--resume", action="store_true")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    avoid_cpu_lapack_deadlock()
    config = apply_overrides(TrainConfig(), overrides)
    run_dir = args.run_dir if args.run_dir is not None else make_run_dir(args.out)
    result = train_and_evaluate(config, run_dir, resume=args.resume)
    print(f"run {result['run_dir']}: step {result['step']}, test error {result['test_error']}")
    for name, value in result["sigma_max"].items():
        print(f"  σ_max {name}: {value:.4f}")


if __name__ == "__main__":
    main()
