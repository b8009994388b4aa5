"""BatchNorm recalibration: re-estimate running statistics after a network was changed.

A network whose weights were edited after training (energy pruning of its singular values,
:mod:`train.pruning`; a TT-SVD of its layers, :func:`train.models.garipov.decompose_tt`) keeps
the BatchNorm running means and variances of the network it was made from. In evaluation mode
every BatchNorm then normalises its new activations with the old statistics; the mismatch grows
layer after layer. :func:`recalibrate_batch_stats` re-estimates the statistics of every
``nnx.BatchNorm`` from a few training batches (no gradient, no parameter changes), as
``torch.optim.swa_utils.update_bn`` does for SWA.

:class:`BatchCentering` is the mean-only alternative to ``nnx.BatchNorm`` of the 1-Lipschitz
literature (LiResNet, BRONet, jaxlip): ``x - mean (+ bias)``, no division by a standard
deviation, so in evaluation mode it is a translation (Lipschitz constant exactly 1) and a
network built from it has the certified bound of its convs alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import distributed
from train.batches import unpack_batch


class BatchCentering(nnx.Module):
    """Mean-only batch normalisation: ``y = x - mean (+ bias)``, no variance scaling.

    Training mode (``use_running_average=False``): ``mean`` is the batch mean of ``x`` over every
    axis but ``axis`` (the features), and the running mean is updated as ``nnx.BatchNorm`` does,
    ``running = momentum * running + (1 - momentum) * batch_mean``. Evaluation mode
    (``use_running_average=True``, set by ``model.eval()``): ``mean`` is the running mean, so the
    layer is the translation ``x -> x - running_mean + bias``, whose ℓ2 Lipschitz constant is
    exactly 1 (exact, for any input). In training mode it is ``x -> (I - P) x + bias`` with ``P``
    the per-channel averaging projection over the batch, also 1-Lipschitz (an orthogonal
    projection's complement). Used instead of BatchNorm by LiResNet (Hu et al. 2023) and BRONet
    (Lai et al. 2025): the eval network's certified bound is that of its other layers.

    The running mean is an ``nnx.BatchStat`` named ``mean`` (like ``nnx.BatchNorm``'s), so
    :func:`recalibrate_batch_stats` re-estimates it.

    Args:
      num_features: the size of the feature axis.
      use_running_average: the default mode (``model.train()`` / ``model.eval()`` set it).
      axis: the feature axis (default the last).
      momentum: of the running mean, in ``[0, 1)``.
      use_bias: add a learned per-feature bias (initialised by ``bias_init``).
      bias_init: initialiser of the bias.
      dtype: the computation dtype (default: the input's).
      param_dtype: dtype of the bias and the running mean.
      axis_name: a ``pmap``/``shard_map`` axis over which the batch mean is averaged.
      rngs: ``nnx.Rngs`` (the bias initialiser's ``params`` stream).

    Example:
      >>> layer = BatchCentering(2, momentum=0.0, rngs=nnx.Rngs(0))
      >>> x = jnp.asarray([[1.0, 2.0], [3.0, 6.0]])
      >>> layer(x).tolist()  # Training mode: batch mean [2, 4] subtracted, and stored.
      [[-1.0, -2.0], [1.0, 2.0]]
      >>> layer.eval()
      >>> layer(jnp.zeros((1, 2))).tolist()
      [[-2.0, -4.0]]
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        momentum: float = 0.99,
        use_bias: bool = True,
        bias_init: Callable[..., Any] = nnx.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        if not (isinstance(num_features, (int, np.integer)) and num_features >= 1):
            raise ValueError(f"num_features={num_features!r} must be an int >= 1")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum={momentum!r} must be a float in [0, 1)")
        self.num_features = int(num_features)
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.dtype = dtype
        self.axis_name = axis_name
        self.mean = nnx.BatchStat(jnp.zeros((self.num_features,), param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (self.num_features,), param_dtype))
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """``x - mean (+ bias)``; ``use_running_average`` overrides the layer's mode."""
        ura = self.use_running_average if use_running_average is None else use_running_average
        axis = self.axis % x.ndim
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"x has {x.shape[axis]} features on axis {self.axis}; expected "
                f"num_features={self.num_features}"
            )
        dtype = self.dtype or jnp.result_type(x, self.mean[...])
        x = jnp.asarray(x, dtype)
        shape = [1] * x.ndim
        shape[axis] = self.num_features
        if ura:
            mean = self.mean[...]
        else:
            reduce = tuple(i for i in range(x.ndim) if i != axis)
            mean = jnp.mean(x.astype(jnp.promote_types(dtype, jnp.float32)), axis=reduce)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            self.mean[...] = jax.lax.stop_gradient(
                self.momentum * self.mean[...] + (1 - self.momentum) * mean
            ).astype(self.mean[...].dtype)
        y = x - jnp.asarray(mean, dtype).reshape(shape)
        if self.bias is not None:
            y = y + jnp.asarray(self.bias[...], dtype).reshape(shape)
        return y


#: The running statistics that :func:`recalibrate_batch_stats` re-estimates, per layer type.
_RUNNING_STATS = ((nnx.BatchNorm, ("mean", "var")), (BatchCentering, ("mean",)))


def _stat_names(layer: nnx.Module) -> tuple[str, ...]:
    for kind, names in _RUNNING_STATS:
        if isinstance(layer, kind):
            return names
    return ()


def batch_norm_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer)]`` of every ``nnx.BatchNorm`` and :class:`BatchCentering` of ``model``
    (the layers with running statistics), in graph order.

    ``path`` joins the attribute names / indices with ``'/'`` (``'blocks/0/bn1'``).
    """
    return [
        ("/".join(str(p) for p in path), module)
        for path, module in nnx.iter_modules(model)
        if _stat_names(module)
    ]


def _check_arguments(num_batches: int | None, momentum: float | None) -> None:
    if num_batches is not None and not (
        isinstance(num_batches, (int, np.integer)) and num_batches >= 1
    ):
        raise ValueError(f"num_batches={num_batches!r} must be None or an int >= 1")
    if momentum is not None and not (
        isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0
    ):
        raise ValueError(f"momentum={momentum!r} must be None or a float in [0, 1)")


def _source_batches(data: Any, num_batches: int | None) -> Iterator[np.ndarray]:
    """The input batches of a :class:`train.batches.BatchSource`, padding rows dropped.

    Epochs 0, 1, ... in order until ``num_batches`` batches with at least one real example
    were yielded (``None``: every such batch of epoch 0).
    """
    yielded, epoch = 0, 0
    while True:
        useful = 0
        for batch in data.batches(epoch):
            images, _, mask = unpack_batch(batch)
            mask = np.asarray(mask, bool)
            if not mask.any():
                continue
            images = np.asarray(images)
            yield images if mask.all() else images[mask]
            useful += 1
            yielded += 1
            if num_batches is not None and yielded == num_batches:
                return
        if num_batches is None:
            return
        if useful == 0:
            raise ValueError(
                f"data yielded no batch with a real example in epoch {epoch}: expected a "
                "source with at least one unmasked example"
            )
        epoch += 1


def _array_batches(
    data: Any, num_batches: int | None, batch_size: int | None
) -> Iterator[np.ndarray]:
    """Consecutive slices of ``batch_size`` examples of an array of inputs."""
    images = np.asarray(data)
    if images.ndim < 1 or images.shape[0] == 0:
        raise ValueError(
            f"data has shape {images.shape}: expected a non-empty array of inputs (N, ...) "
            "or a BatchSource"
        )
    n = images.shape[0]
    size = n if batch_size is None else batch_size
    if not (isinstance(size, (int, np.integer)) and size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be None or an int >= 1")
    available = -(-n // size)
    count = available if num_batches is None else num_batches
    if count > available:
        raise ValueError(
            f"num_batches={num_batches} exceeds the {available} batches of {size} examples "
            f"that data (N={n}) holds"
        )
    for b in range(count):
        yield images[b * size : (b + 1) * size]


@functools.lru_cache(maxsize=64)
def _batch_statistics_fn(graphdef: Any) -> Callable[..., Any]:
    """The jitted training-mode forward pass of ``graphdef`` that returns its new
    ``nnx.BatchStat`` and ``nnx.RngState`` (cached per architecture, so recalibrating models of
    one architecture twice compiles once)."""

    @jax.jit
    def batch_statistics(blank, rng_state, others, inputs):
        module = nnx.merge(graphdef, blank, rng_state, others)
        module(inputs)
        _, measured, rng_state, _ = nnx.split(module, nnx.BatchStat, nnx.RngState, ...)
        return measured, rng_state

    return batch_statistics


def recalibrate_batch_stats(
    model: nnx.Module,
    data: Any,
    num_batches: int | None = None,
    *,
    momentum: float | None = None,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> nnx.Module:
    r"""A copy of ``model`` whose BatchNorm running statistics are re-estimated from ``data``.

    Every ``nnx.BatchNorm`` (:func:`batch_norm_layers`) gets new running ``mean`` and ``var``
    (every :class:`BatchCentering` its ``mean``): by default the exact average over ``K`` batches
    of the per-batch statistics that a jitted **training-mode** forward pass (no gradient)
    computes; with ``momentum``, BatchNorm's moving average. ``model`` is left untouched;
    parameters, other state and mode flags are copied. The definition of the statistics and its
    assumptions: ``docs/batchnorm_recalibration.md``.

    Args:
      model: an NNX model taking one batch of inputs ``(B, ...)``.
      data: a :class:`train.batches.BatchSource` (e.g. a training :class:`train.data.Pipeline`:
        ``.batches(epoch)`` yielding ``Batch(images, labels, mask)``, dicts or tuples), whose
        masked-out (padding) examples are dropped before the forward pass (a batch without a
        real example is skipped); or an array of inputs ``(N, ...)`` cut into consecutive
        batches of ``batch_size`` examples.
      num_batches: ``K``, the number of batches used; ``None``: every batch of epoch 0 of a
        source, every batch of an array. A source is read through epochs 0, 1, ... until
        ``K`` batches were used (its own order).
      momentum: ``None`` for the exact average, or ``m`` in ``[0, 1)``: the moving average
        ``s_k = m s_{k-1} + (1 - m) b_k`` from ``s_1 = b_1`` (the old statistics discarded).
      batch_size: examples per batch when ``data`` is an array (default: the whole array in
        one batch); ignored for a source.
      mesh: a device mesh (:func:`train.distributed.make_mesh`): every batch whose size
        divides by its device count is split over its ``'data'`` axis (the statistics are
        those of the whole batch all the same; other batches run replicated). In a multi-host
        run ``data`` yields this process's rows (e.g. its :class:`train.data.Pipeline` shard)
        and every batch is the global batch of all processes.

    Returns:
      A new model (``nnx.clone`` of ``model``) with the re-estimated statistics.

    Raises:
      ValueError: naming the argument: ``num_batches`` not ``None`` or an int ``>= 1`` (or
        more than an array holds), ``momentum`` outside ``[0, 1)``, ``batch_size`` not
        ``>= 1``, ``data`` an empty array or a source without unmasked examples.

    Example:
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
      >>> new = recalibrate_batch_stats(model, x, batch_size=16)  # 4 batches, exact average.
      >>> new.layers[1].mean.shape
      (4,)
    """
    _check_arguments(num_batches, momentum)
    new = nnx.clone(model)
    layers = batch_norm_layers(new)
    if not layers:
        return new
    if hasattr(data, "batches"):
        batches = _source_batches(data, num_batches)
    else:
        batches = _array_batches(data, num_batches, batch_size)

    # The working copy: training mode, every BatchNorm with momentum 0, so that after one
    # forward pass its running statistics are exactly that batch's statistics.
    work = nnx.clone(model)
    for _, layer in batch_norm_layers(work):
        layer.momentum = 0.0
    work.train()
    graphdef, stats, rng_state, others = nnx.split(work, nnx.BatchStat, nnx.RngState, ...)
    # Fed to every pass: 0 * (finite) old value, whatever the model's statistics hold.
    blank = jax.tree.map(jnp.zeros_like, stats)

    batch_statistics = _batch_statistics_fn(graphdef)

    names = [(path, name) for path, layer in layers for name in _stat_names(layer)]
    estimate: dict[tuple[str, str], np.ndarray] = {}
    count = 0
    for inputs in batches:
        inputs = np.asarray(inputs)
        if mesh is not None and (
            jax.process_count() > 1 or len(inputs) % mesh.devices.size == 0
        ):
            (inputs,) = distributed.shard_batch(mesh, inputs)
        measured, rng_state = batch_statistics(blank, rng_state, others, jnp.asarray(inputs))
        flat = {
            "/".join(str(p) for p in path): np.asarray(value, np.float64)
            for path, value in nnx.to_flat_state(nnx.as_pure(measured))
        }
        count += 1
        for key in names:
            value = flat[f"{key[0]}/{key[1]}"]
            if count == 1:
                estimate[key] = value
            elif momentum is None:
                estimate[key] = estimate[key] + (value - estimate[key]) / count
            else:
                estimate[key] = momentum * estimate[key] + (1.0 - momentum) * value
    if count == 0:
        raise ValueError(
            "data yielded no batch with a real example: expected a source with at least one "
            "unmasked example"
        )
    for path, layer in layers:
        for name in _stat_names(layer):
            variable = getattr(layer, name)
            variable[...] = jnp.asarray(estimate[(path, name)], variable[...].dtype)
    return new


__all__ = ["BatchCentering", "recalibrate_batch_stats", "batch_norm_layers"]
