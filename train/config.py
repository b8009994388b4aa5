"""The training configuration: a frozen dataclass, JSON in the run folder, command-line overrides.

Overrides (``key=value`` or ``--config.key=value``) are parsed and type-checked by
``ml_collections.config_flags`` against the field types of :class:`TrainConfig`
(:func:`apply_overrides`), then validated by :class:`TrainConfig` itself.
"""


import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from absl import flags
from flax.core import FrozenDict
from ml_collections import config_flags

from train.layers.svd import DECOMPOSITIONS
from train.regularizers import SPARSITY

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "piecewise", "constant")
PADDINGS = ("SAME", "CIRCULAR")
#: Words that set an optional field to ``None`` in an override.
_NONE_WORDS = ("none", "null", "")


def _freeze(value: Any) -> Any:
    """A hashable copy of a JSON-like value: mappings -> ``FrozenDict``, lists -> tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    """JSON form of a frozen value; a mapping with a non-string key becomes
    ``{"__items__": [[key, value], ...]}`` so that its key types survive."""
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {"__items__": [[k, _to_json(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__items__"}:
            return FrozenDict({_freeze(k): _from_json(v) for k, v in value["__items__"]})
        return FrozenDict({k: _from_json(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (hashable; saved as ``config.json`` in the run).

    Attributes:
      dataset: ``'digits'`` (scikit-learn 8x8 digits, no download) or a tfds name
        (``'cifar10'``, ``'cifar100'``) read with ``tfds.data_source`` from ``data_dir``.
      data_dir: the tfds data folder (``None``: the tfds default).
      augment: random crop (pad 4, or 1 for 8x8 inputs, as the data pipeline chooses) + horizontal
        flip of the training images.
      image_pad: zero pixels added on every side of every image before the pipeline (e.g. 2
        turns the 8x8 digits into 12x12, so that a ResNet's third stage sees 3x3 inputs, as large
        as its 3x3 kernels, which :class:`spectra.ConvSpec` requires).
      batch_size: training batch size (the last partial batch of an epoch is dropped).
      eval_batch_size: evaluation batch size (the last partial batch is padded and masked: every
        test example counts exactly once).
      model: a name of the model registry (:func:`train.models.registry.build_model`):
        ``'resnet<depth>'`` (``depth = 6n + 2``, e.g. ``'resnet8'``, ``'resnet20'``) or
        ``'simple_cnn'`` from :mod:`train.models.resnet`, ``'garipov'`` from
        :mod:`train.models.garipov`.
      model_kwargs: further constructor arguments of the model (e.g. the variant and TT
        layers of ``'garipov'``), a JSON-like mapping (stored frozen: ``FrozenDict``, tuples).
      width: channels of the first ResNet stage (16 in He et al. 2016; the stages have
        ``width, 2 width, 4 width``).
      padding: the conv padding of the model, ``'SAME'`` (zeros) or ``'CIRCULAR'``.
      shortcut: ResNet shortcut option ``'A'`` (parameter-free) or ``'B'`` (1x1 conv).
      num_steps: optimiser steps of the whole run.
      optimizer: ``'sgd'`` (with ``momentum``, ``nesterov``) or ``'adam'``.
      lr: peak learning rate.
      momentum: SGD momentum (0 for plain SGD).
      nesterov: Nesterov momentum.
      weight_decay: L2 weight decay added to the gradients (``optax.add_decayed_weights``) of
        every parameter with more than one axis (kernels, not biases / BN scales).
      schedule: ``'cosine'`` (to 0 at ``num_steps``), ``'piecewise'`` (``lr`` times
        ``decay_factor`` at each fraction of ``num_steps`` in ``boundaries``) or ``'constant'``.
      warmup_steps: linear warm-up from 0 before the schedule.
      boundaries: fractions of ``num_steps`` where the piecewise schedule decays.
      decay_factor: multiplier applied at each piecewise boundary.
      penalty_weight: λ of the spectral penalty ``λ · train.spectral_penalty(params, specs)``
        (Yi 2020); ``0`` disables it.
      penalty_bound: the upper bound used by the penalty (a key of
        ``spectra._bounds.UPPER_BOUNDS`` or ``'exact'``).
      penalty_reduce: ``'sum'`` or ``'max'`` over the conv layers.
      project_max_norm: ``c`` of :func:`train.project_conv_operator_norm` (Sedghi et al. 2019),
        appended last in the optax chain; ``None`` disables the projection.
      project_every: project every ``k``-th update (the first update projects).
      project_method: ``'certified'``, ``'sedghi'``, ``'dykstra'``, ``'rescale'`` (exact or
        certified, see :func:`spectra.clip_operator_norm`) or ``'power'`` (cheapest,
        approximate: a warm-started Krylov estimate of σ_max, see
        :func:`train.project_conv_operator_norm`).
      project_rounds: projection rounds per projecting update (``'power'``: Krylov products).
      project_certify_every: ``None``, or ``k``: a certified rescale (``project_certify_method``)
        after every ``k``-th update, on top of ``project_method`` (e.g. ``'power'`` every step,
        certified every ``k``; ``certify_every`` of :func:`train.project_conv_operator_norm`).
      project_certify_method: the certified method (one of
        ``train.transforms.CERTIFIED_METHODS``: ``'rescale'``, ``'certified'``) of
        ``project_certify_every`` and of the certification of every checkpoint and of the final
        parameters by the loop (:func:`train.certify.certify_conv_operator_norm`, whenever
        ``project_max_norm`` is set).
      project_bn_aware: project the **BatchNorm-folded** operator of every conv followed by an
        ``nnx.BatchNorm`` (``K · diag(gamma / sqrt(running_var + eps))``, the operator of the
        evaluation network) instead of the kernel alone, by rescaling gamma
        (:func:`train.bn_aware.project_batchnorm_folded`; ``project_method`` one of
        ``'certified'``, ``'rescale'``, ``'power'``), and certify the folded operators at every
        checkpoint and at the end (:func:`train.bn_aware.certify_folded_train_state`: rescale,
        re-estimate the statistics, repeat; what is saved is certified for its own statistics).
        Convs without a BatchNorm are projected alone as usual. Needs ``project_max_norm`` (or
        ``lipschitz_target``).
      lipschitz_target: ``None``, or ``L > 0``: train under the constraint and certify at the
        end that the evaluation network's certified Lipschitz bound
        (:func:`train.report.network_report`'s ``network['lipschitz_upper']``) is ``<= L``
        (rounding allowance ``1e-4`` relative), else raise
        :class:`train.bn_aware.LipschitzTargetError` naming the blocking op or the largest
        layer. Implies ``project_bn_aware`` and also projects the dense layers; the per-layer
        radius is ``project_max_norm`` when given, else ``L^(1/n)`` for the ``n`` conv and
        dense layers (:func:`train.bn_aware.radius_for_target`; residual sums make ResNets need
        a smaller explicit radius). The bound, its kind and ``L`` go to ``lipschitz.json`` in
        the run folder.
      decomposition: ``None`` (plain convs) or the SVD-training form of Yang et al. (2020) that
        :func:`train.models.registry.build_model` gives every layer: ``'channel'`` (a
        ``k x k`` conv with ``r`` outputs then a 1x1 conv) or ``'spatial'`` (a ``k x 1``
        then a ``1 x k`` conv), full rank, the paper's random initialisation (Kaiming-normal
        U and V, ``s ~ N(0, 1)``); see :func:`train.layers.svd_decompose.decompose`.
      decompose_dense: also decompose the dense (classifier) layers when ``decomposition`` is set.
      orth_weight: λ_o of the orthogonality term ``λ_o · train.regularizers.orthogonality_loss``
        on the U and V factors of the SVD layers (1 on CIFAR in Yang et al. 2020); ``0`` adds
        nothing to the loss (the term is still logged for a decomposed model).
      sparsity: the sparsity term on the singular values of the SVD layers, one of
        ``train.regularizers.SPARSITY`` (``'l1'``, ``'hoyer'``, ``'hoyer_square'``).
      sparsity_weight: λ_s of the sparsity term ``λ_s · train.regularizers.sparsity_loss``;
        ``0`` adds nothing to the loss (the term is still logged for a decomposed model).
      seed: initialisation and data-order seed.
      log_every: training loss/accuracy (means since the previous log) written every this many
        steps (the only host synchronisation of the loop) and at the last step.
      sigma_every: per-layer σ_max of the convs every this many steps (``0``: only at the end).
      sigma_method: ``'auto'`` (exact: ``'fft'`` for circular layers, ``'dense'`` for small
        zero-padded ones, ``'lanczos'`` otherwise) or a ``spectra.spectral_norm`` method.
      eval_every: test-set evaluation every this many steps (``0``: only at the end).
      checkpoint_every: orbax checkpoint every this many steps (``0``: only at the end).
      max_to_keep: checkpoints kept.
      progress: show a tqdm progress bar.
      num_devices: devices of the data-parallel mesh (:mod:`train.distributed`): ``0`` (all
        devices JAX sees; every device of every process in a multi-host run) or the first
        ``num_devices`` local devices; ``batch_size`` and ``eval_batch_size`` are global and
        must divide by it.
      fsdp: shard the params and optimiser state over the devices (FSDP-style) instead of
        replicating them.
      multi_host: start JAX's multi-process runtime (``jax.distributed.initialize``) with the
        cluster auto-detected (Slurm, Open MPI, Kubernetes, Cloud TPU).
      coordinator_address: ``'host:port'`` of process 0 for ``jax.distributed.initialize``
        (``None``: auto-detected when ``multi_host``).
      num_processes: the number of processes (``None``: auto-detected).
      process_id: this process's index (``None``: auto-detected).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    augment: bool = True
    image_pad: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500
    model: str = "resnet20"
    model_kwargs: Mapping[str, Any] = FrozenDict()
    width: int = 16
    padding: str = "SAME"
    shortcut: str = "A"
    num_steps: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    boundaries: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    penalty_weight: float = 0.0
    penalty_bound: str = "gram_iteration"
    penalty_reduce: str = "sum"
    project_max_norm: float | None = None
    project_every: int = 1
    project_method: str = "certified"
    project_rounds: int = 1
    project_certify_every: int | None = None
    project_certify_method: str = "rescale"
    project_certify_recalibration_batches: int = 20
    project_bn_aware: bool = False
    lipschitz_target: float | None = None
    decomposition: str | None = None
    decompose_dense: bool = True
    orth_weight: float = 0.0
    sparsity: str = "hoyer"
    sparsity_weight: float = 0.0
    seed: int = 0
    log_every: int = 50
    sigma_every: int = 0
    sigma_method: str = "auto"
    eval_every: int = 0
    checkpoint_every: int = 0
    max_to_keep: int = 2
    progress: bool = True
    num_devices: int = 0
    fsdp: bool = False
    multi_host: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs={self.model_kwargs!r} must be a mapping")
        object.__setattr__(self, "model_kwargs", _freeze(self.model_kwargs))
        for name in ("batch_size", "eval_batch_size", "num_steps", "width", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("image_pad", "warmup_steps", "sigma_every", "eval_every", "checkpoint_every",
                     "num_devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r} must be one of {PADDINGS}")
        if self.penalty_weight < 0:
            raise ValueError(f"penalty_weight={self.penalty_weight!r} must be >= 0")
        if self.project_max_norm is not None and not self.project_max_norm > 0:
            raise ValueError(f"project_max_norm={self.project_max_norm!r} must be > 0 or None")
        from train.transforms import CERTIFIED_METHODS
        from train.transforms import PROJECT_METHODS

        if self.project_method not in PROJECT_METHODS:
            raise ValueError(
                f"project_method={self.project_method!r} must be one of {PROJECT_METHODS}"
            )
        every = self.project_certify_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"project_certify_every={every!r} must be None or a positive int")
        if self.project_certify_method not in CERTIFIED_METHODS:
            raise ValueError(
                f"project_certify_method={self.project_certify_method!r} must be one of "
                f"{CERTIFIED_METHODS}"
            )
        batches = self.project_certify_recalibration_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(
                f"project_certify_recalibration_batches={batches!r} must be an int >= 0"
            )
        if not isinstance(self.project_bn_aware, bool):
            raise ValueError(f"project_bn_aware={self.project_bn_aware!r} must be a bool")
        target = self.lipschitz_target
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float))
            or not math.isfinite(target) or not target > 0
        ):
            raise ValueError(
                f"lipschitz_target={target!r} must be None or a finite number > 0"
            )
        if self.project_bn_aware or target is not None:
            from train.bn_aware import FOLD_METHODS

            name = "lipschitz_target" if target is not None else "project_bn_aware"
            if self.project_method not in FOLD_METHODS:
                raise ValueError(
                    f"{name} needs project_method in {FOLD_METHODS} (the folded layers are "
                    f"rescaled); got project_method={self.project_method!r}"
                )
            if target is None and self.project_max_norm is None:
                raise ValueError(
                    "project_bn_aware=True needs project_max_norm (the radius) or "
                    "lipschitz_target"
                )
        if not isinstance(self.project_every, int) or self.project_every < 1:
            raise ValueError(f"project_every={self.project_every!r} must be a positive int")
        if self.decomposition is not None and self.decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"decomposition={self.decomposition!r} must be None or one of {DECOMPOSITIONS}"
            )
        if self.sparsity not in SPARSITY:
            raise ValueError(f"sparsity={self.sparsity!r} must be one of {SPARSITY}")
        for name in ("orth_weight", "sparsity_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if self.max_to_keep < 1:
            raise ValueError(f"max_to_keep={self.max_to_keep!r} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (what ``config.json`` holds)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config JSON has unknown fields {unknown}")
        if "boundaries" in data:
            data["boundaries"] = tuple(data["boundaries"])
        if "model_kwargs" in data:
            data["model_kwargs"] = _from_json(data["model_kwargs"])
        return cls(**data)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "TrainConfig":
        return cls.from_json(pathlib.Path(path).read_text())


def _override_mirror() -> type:
    """A mutable dataclass with the fields and types of :class:`TrainConfig`: what
    ``ml_collections.config_flags`` parses overrides into (it assigns fields in place)."""
    return dataclasses.make_dataclass(
        "TrainConfigOverrides",
        [
            (f.name, f.type, dataclasses.field(default=f.default))
            for f in dataclasses.fields(TrainConfig)
        ],
    )


def _optional(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``config`` with ``key=value`` overrides applied (``--config.key=value`` also accepted).

    Values are parsed as the field's type by ``ml_collections.config_flags``: ``lr=0.05``,
    ``nesterov=true``, ``boundaries=0.3,0.6`` (or ``'(0.3, 0.6)'``); an optional field takes
    ``none`` (``project_max_norm=none``). The result is validated by :class:`TrainConfig`.

    Raises:
      ValueError: naming the override when it is not ``key=value``, the key is not a field of
        :class:`TrainConfig`, or the value does not parse / is invalid.

    Example:
      >>> apply_overrides(TrainConfig(), ['--config.lr=0.05', 'model=resnet8']).lr
      0.05
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    argv, to_none = ["apply_overrides"], []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        text = text[len("config."):] if text.startswith("config.") else text
        if "=" not in text:
            raise ValueError(f"override {item!r} must be key=value or --config.key=value")
        key, value = text.split("=", 1)
        if key not in fields:
            raise ValueError(
                f"override {item!r}: {key!r} is not a TrainConfig field; expected one of "
                f"{sorted(fields)}"
            )
        if _optional(fields[key].type) and value.lower() in _NONE_WORDS:
            to_none.append(key)
        else:
            argv.append(f"--config.{key}={value}")
    mirror = _override_mirror()(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    )
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dataclass(
        "config", mirror, flag_values=flag_values, sys_argv=argv
    )
    try:
        flag_values(argv)
    except (flags.Error, KeyError, TypeError) as e:
        raise ValueError(f"overrides {list(overrides)!r}: {e}") from e
    parsed = flag_values.config
    changes = {name: getattr(parsed, name) for name in fields}
    changes.update({name: None for name in to_none})
    return dataclasses.replace(config, **changes)
