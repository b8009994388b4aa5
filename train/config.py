"""The training configuration: frozen sections, JSON in the run folder, command-line overrides.

:class:`TrainConfig` holds one frozen, hashable section per concern (:class:`DataConfig`,
:class:`NetworkConfig`, :class:`OptimConfig`, :class:`LossConfig`, :class:`PenaltyConfig`,
:class:`SVDConfig`, :class:`ProjectionConfig`, :class:`LogConfig`, :class:`CheckpointConfig`,
:class:`DistributedConfig`) plus ``num_steps`` and ``seed``; each section validates its own
fields once, in its ``__post_init__``.

Every section field also has a **flat name**, the name it had when the config was one flat
dataclass (``project_max_norm`` for ``project.max_norm``, ``model`` for ``network.name``): the
one alias table :data:`FLAT_NAMES`. Flat names work everywhere the old config did:
``TrainConfig(project_max_norm=1.0)``, ``dataclasses.replace(config, lr=0.05)``, reading
``config.project_max_norm``, overrides ``project_max_norm=1.0`` (as well as
``project.max_norm=1.0``), and old flat ``config.json`` files.

Overrides (``key=value`` or ``--config.key=value``) are parsed and type-checked by
``ml_collections.config_flags`` against the field types (:func:`apply_overrides`), then
validated by the sections.

Length: ten small section dataclasses whose attribute docs are the reference of every training
option, the alias table, JSON and overrides; splitting them would scatter one concept.
"""


import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from absl import flags
from flax.core import FrozenDict
from ml_collections import config_flags

from train.layers.svd import DECOMPOSITIONS
from train.regularizers import SPARSITY
from train.transforms import check_projection_args

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "piecewise", "constant")
PADDINGS = ("SAME", "CIRCULAR")
#: Projection methods of the BatchNorm-aware projection (`train.bn_aware.FOLD_METHODS`).
BN_AWARE_METHODS = ("certified", "rescale", "power")
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


def _label(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _check_int(section: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int"
        raise ValueError(f"{_label(section, name)}={value!r} must be {kind}")


def _check_choice(section: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{_label(section, name)}={value!r} must be one of {tuple(choices)}")


def _check_weight(section: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{_label(section, name)}={value!r} must be a number >= 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data (section ``data``).

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
    """

    SECTION: ClassVar[str] = "data"
    dataset: str = "digits"
    data_dir: str | None = None
    augment: bool = True
    image_pad: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size"):
            _check_int(self.SECTION, name, getattr(self, name), 1)
        _check_int(self.SECTION, "image_pad", self.image_pad, 0)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The model (section ``network``).

    Attributes:
      name: a name of the model registry (:func:`train.models.registry.build_model`):
        ``'resnet<depth>'`` (``depth = 6n + 2``, e.g. ``'resnet8'``, ``'resnet20'``) or
        ``'simple_cnn'`` from :mod:`train.models.resnet`, ``'garipov'`` from
        :mod:`train.models.garipov` (flat name ``model``).
      kwargs: further constructor arguments of the model (e.g. the variant and TT layers of
        ``'garipov'``), a JSON-like mapping (stored frozen: ``FrozenDict``, tuples; flat name
        ``model_kwargs``).
      width: channels of the first ResNet stage (16 in He et al. 2016; the stages have
        ``width, 2 width, 4 width``).
      padding: the conv padding of the model, ``'SAME'`` (zeros) or ``'CIRCULAR'``.
      shortcut: ResNet shortcut option ``'A'`` (parameter-free) or ``'B'`` (1x1 conv).
    """

    SECTION: ClassVar[str] = "network"
    name: str = "resnet20"
    kwargs: Mapping[str, Any] = FrozenDict()
    width: int = 16
    padding: str = "SAME"
    shortcut: str = "A"

    def __post_init__(self):
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"network.kwargs={self.kwargs!r} must be a mapping")
        object.__setattr__(self, "kwargs", _freeze(self.kwargs))
        _check_int(self.SECTION, "width", self.width, 1)
        _check_choice(self.SECTION, "padding", self.padding, PADDINGS)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its learning-rate schedule (section ``optim``).

    Attributes:
      name: ``'sgd'`` (with ``momentum``, ``nesterov``) or ``'adam'`` (flat name ``optimizer``).
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
    """

    SECTION: ClassVar[str] = "optim"
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    boundaries: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1

    def __post_init__(self):
        _check_choice(self.SECTION, "name", self.name, OPTIMIZERS)
        _check_choice(self.SECTION, "schedule", self.schedule, SCHEDULES)
        _check_int(self.SECTION, "warmup_steps", self.warmup_steps, 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training loss (section ``loss``): cross entropy of scaled, offset logits.

    The loss of a batch is ``CE(temperature * (logits - margin * onehot(label)))``: the
    Lipschitz-margin cross entropy (Tsuzuku et al. 2018) with a temperature. Both act in the
    loss only: the model, its logits, its accuracy, its certified Lipschitz constant and the
    certified radii ``margin(x) / (sqrt(2) L)`` of :func:`train.certified_accuracy` do not
    change. A 1-Lipschitz (or small-constant) network has logits too close together for the
    plain cross entropy to train it: a temperature ``T`` trains it as the network ``T f``
    would be trained, and an offset ``margin = sqrt(2) eps L`` asks for margins certified at
    radius ``eps`` (the defaults, 1 and 0, are the plain cross entropy).

    Attributes:
      temperature: ``T > 0``, the factor of the logits in the loss (flat name
        ``loss_temperature``).
      margin: ``m >= 0``, subtracted from the true class's logit before the temperature (flat
        name ``loss_margin``).
    """

    SECTION: ClassVar[str] = "loss"
    temperature: float = 1.0
    margin: float = 0.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
            math.isfinite(t) and t > 0
        ):
            raise ValueError(f"loss.temperature={t!r} must be a finite number > 0")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (
            math.isfinite(m) and m >= 0
        ):
            raise ValueError(f"loss.margin={m!r} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class PenaltyConfig:
    """The spectral penalty of Yi (2020) (section ``penalty``).

    Attributes:
      weight: λ of the penalty ``λ · train.spectral_penalty(params, specs)``; ``0`` disables it
        (flat name ``penalty_weight``).
      bound: the upper bound used by the penalty (a key of ``spectra._bounds.UPPER_BOUNDS`` or
        ``'exact'``; flat name ``penalty_bound``).
      reduce: ``'sum'`` or ``'max'`` over the conv layers (flat name ``penalty_reduce``).
    """

    SECTION: ClassVar[str] = "penalty"
    weight: float = 0.0
    bound: str = "gram_iteration"
    reduce: str = "sum"

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"penalty.weight={self.weight!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class SVDConfig:
    """SVD training of Yang et al. (2020) (section ``svd``).

    Attributes:
      decomposition: ``None`` (plain convs) or the SVD-training form that
        :func:`train.models.registry.build_model` gives every layer: ``'channel'`` (a ``k x k``
        conv with ``r`` outputs then a 1x1 conv) or ``'spatial'`` (a ``k x 1`` then a ``1 x k``
        conv), full rank, the paper's random initialisation (Kaiming-normal U and V,
        ``s ~ N(0, 1)``); see :func:`train.layers.svd_decompose.decompose`.
      decompose_dense: also decompose the dense (classifier) layers when ``decomposition`` is set.
      orth_weight: λ_o of the orthogonality term ``λ_o · train.regularizers.orthogonality_loss``
        on the U and V factors of the SVD layers (1 on CIFAR in Yang et al. 2020); ``0`` adds
        nothing to the loss (the term is still logged for a decomposed model).
      sparsity: the sparsity term on the singular values of the SVD layers, one of
        ``train.regularizers.SPARSITY`` (``'l1'``, ``'hoyer'``, ``'hoyer_square'``).
      sparsity_weight: λ_s of the sparsity term ``λ_s · train.regularizers.sparsity_loss``;
        ``0`` adds nothing to the loss (the term is still logged for a decomposed model).
    """

    SECTION: ClassVar[str] = "svd"
    decomposition: str | None = None
    decompose_dense: bool = True
    orth_weight: float = 0.0
    sparsity: str = "hoyer"
    sparsity_weight: float = 0.0

    def __post_init__(self):
        if self.decomposition is not None and self.decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"svd.decomposition={self.decomposition!r} must be None or one of "
                f"{DECOMPOSITIONS}"
            )
        _check_choice(self.SECTION, "sparsity", self.sparsity, SPARSITY)
        for name in ("orth_weight", "sparsity_weight"):
            _check_weight(self.SECTION, name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """The operator-norm projection and the Lipschitz target (section ``project``).

    The options of :func:`train.project_conv_operator_norm` are checked by the same function
    as there, :func:`train.transforms.check_projection_args`.

    Attributes:
      max_norm: ``c`` of :func:`train.project_conv_operator_norm` (Sedghi et al. 2019),
        appended last in the optax chain; ``None`` disables the projection.
      every: project every ``k``-th update (the first update projects).
      method: ``'certified'``, ``'sedghi'``, ``'dykstra'``, ``'rescale'`` (exact or
        certified, see :func:`spectra.clip_operator_norm`) or ``'power'`` (cheapest,
        approximate: a warm-started Krylov estimate of σ_max, see
        :func:`train.project_conv_operator_norm`).
      rounds: projection rounds per projecting update (``'power'``: Krylov products).
      certify_every: ``None``, or ``k``: a certified rescale (``certify_method``) after every
        ``k``-th update, on top of ``method`` (e.g. ``'power'`` every step, certified every
        ``k``; ``certify_every`` of :func:`train.project_conv_operator_norm`).
      certify_method: the certified method (one of ``train.transforms.CERTIFIED_METHODS``:
        ``'rescale'``, ``'certified'``) of ``certify_every`` and of the certification of every
        checkpoint and of the final parameters by the loop
        (:func:`train.certify.certify_conv_operator_norm`, whenever ``max_norm`` is set).
      certify_recalibration_batches: batches of the training data that re-estimate the
        BatchNorm statistics after a certification rescale (``0``: none).
      bn_aware: project the **BatchNorm-folded** operator of every conv followed by an
        ``nnx.BatchNorm`` (``K · diag(gamma / sqrt(running_var + eps))``, the operator of the
        evaluation network) instead of the kernel alone, by rescaling gamma
        (:func:`train.bn_aware.project_batchnorm_folded`; ``method`` one of ``'certified'``,
        ``'rescale'``, ``'power'``), and certify the folded operators at every checkpoint and at
        the end (:func:`train.bn_aware.certify_folded_train_state`: rescale, re-estimate the
        statistics, repeat; what is saved is certified for its own statistics). Convs without a
        BatchNorm are projected alone as usual. Needs ``max_norm`` (or ``lipschitz_target``).
      lipschitz_target: ``None``, or ``L > 0``: train under the constraint and certify at the
        end that the evaluation network's certified Lipschitz bound
        (:func:`train.report.network_report`'s ``network['lipschitz_upper']``) is ``<= L``
        (rounding allowance ``1e-4`` relative), else raise
        :class:`train.lipschitz_target.LipschitzTargetError` naming the blocking op or the
        largest layer. Implies ``bn_aware`` and also projects the dense layers; the per-layer
        radius is ``max_norm`` when given, else ``L^(1/n)`` for the ``n`` conv and dense layers
        (:func:`train.bn_aware.radius_for_target`; residual sums make ResNets need a smaller
        explicit radius). The bound, its kind and ``L`` go to ``lipschitz.json`` in the run
        folder. Flat name ``lipschitz_target``; the other fields' flat names are
        ``project_<field>``.
    """

    SECTION: ClassVar[str] = "project"
    max_norm: float | None = None
    every: int = 1
    method: str = "certified"
    rounds: int = 1
    certify_every: int | None = None
    certify_method: str = "rescale"
    certify_recalibration_batches: int = 20
    bn_aware: bool = False
    lipschitz_target: float | None = None

    def __post_init__(self):
        if isinstance(self.max_norm, bool):
            raise ValueError(f"project.max_norm={self.max_norm!r} must be > 0 or None")
        check_projection_args(
            self.max_norm,
            every_k_steps=self.every,
            method=self.method,
            num_rounds=self.rounds,
            certify_every=self.certify_every,
            certify_method=self.certify_method,
            names={
                "max_norm": "project.max_norm",
                "every_k_steps": "project.every",
                "method": "project.method",
                "num_rounds": "project.rounds",
                "certify_every": "project.certify_every",
                "certify_method": "project.certify_method",
            },
        )
        batches = self.certify_recalibration_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(
                f"project.certify_recalibration_batches={batches!r} must be an int >= 0"
            )
        if not isinstance(self.bn_aware, bool):
            raise ValueError(f"project.bn_aware={self.bn_aware!r} must be a bool")
        target = self.lipschitz_target
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float))
            or not math.isfinite(target) or not target > 0
        ):
            raise ValueError(
                f"project.lipschitz_target={target!r} must be None or a finite number > 0"
            )
        if self.bn_aware or target is not None:
            name = "project.lipschitz_target" if target is not None else "project.bn_aware"
            if self.method not in BN_AWARE_METHODS:
                raise ValueError(
                    f"{name} needs project.method in {BN_AWARE_METHODS} (the folded layers are "
                    f"rescaled); got project.method={self.method!r}"
                )
            if target is None and self.max_norm is None:
                raise ValueError(
                    "project.bn_aware=True needs project.max_norm (the radius) or "
                    "project.lipschitz_target"
                )


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What the loop logs and evaluates, and when (section ``log``).

    Attributes:
      every: training loss/accuracy (means since the previous log) written every this many
        steps (the only host synchronisation of the loop) and at the last step (flat name
        ``log_every``).
      sigma_every: per-layer σ_max of the convs every this many steps (``0``: only at the end).
      sigma_method: ``'auto'`` (exact: ``'fft'`` for circular layers, ``'dense'`` for small
        zero-padded ones, ``'lanczos'`` otherwise) or a ``spectra.spectral_norm`` method.
      eval_every: test-set evaluation every this many steps (``0``: only at the end).
      progress: show a tqdm progress bar.
    """

    SECTION: ClassVar[str] = "log"
    every: int = 50
    sigma_every: int = 0
    sigma_method: str = "auto"
    eval_every: int = 0
    progress: bool = True

    def __post_init__(self):
        _check_int(self.SECTION, "every", self.every, 1)
        for name in ("sigma_every", "eval_every"):
            _check_int(self.SECTION, name, getattr(self, name), 0)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the run (section ``checkpoint``).

    Attributes:
      every: checkpoint every this many steps (``0``: only at the end; flat name
        ``checkpoint_every``).
      max_to_keep: checkpoints kept.
    """

    SECTION: ClassVar[str] = "checkpoint"
    every: int = 0
    max_to_keep: int = 2

    def __post_init__(self):
        _check_int(self.SECTION, "every", self.every, 0)
        if self.max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep={self.max_to_keep!r} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Devices and processes (section ``distributed``; :mod:`train.distributed`).

    Attributes:
      num_devices: devices of the data-parallel mesh: ``0`` (all devices JAX sees; every device
        of every process in a multi-host run) or the first ``num_devices`` local devices;
        ``batch_size`` and ``eval_batch_size`` are global and must divide by it.
      fsdp: shard the params and optimiser state over the devices (FSDP-style) instead of
        replicating them.
      multi_host: start JAX's multi-process runtime (``jax.distributed.initialize``) with the
        cluster auto-detected (Slurm, Open MPI, Kubernetes, Cloud TPU).
      coordinator_address: ``'host:port'`` of process 0 for ``jax.distributed.initialize``
        (``None``: auto-detected when ``multi_host``).
      num_processes: the number of processes (``None``: auto-detected).
      process_id: this process's index (``None``: auto-detected).
    """

    SECTION: ClassVar[str] = "distributed"
    num_devices: int = 0
    fsdp: bool = False
    multi_host: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        _check_int(self.SECTION, "num_devices", self.num_devices, 0)


#: The sections of :class:`TrainConfig`: field name -> section class.
SECTIONS: dict[str, type] = {
    cls.SECTION: cls
    for cls in (
        DataConfig, NetworkConfig, OptimConfig, LossConfig, PenaltyConfig, SVDConfig,
        ProjectionConfig, LogConfig, CheckpointConfig, DistributedConfig,
    )
}
#: The fields of :class:`TrainConfig` outside the sections.
TOP_LEVEL = ("num_steps", "seed")
_RENAMED = {
    "model": ("network", "name"),
    "model_kwargs": ("network", "kwargs"),
    "optimizer": ("optim", "name"),
    "loss_temperature": ("loss", "temperature"),
    "loss_margin": ("loss", "margin"),
    "penalty_weight": ("penalty", "weight"),
    "penalty_bound": ("penalty", "bound"),
    "penalty_reduce": ("penalty", "reduce"),
    "lipschitz_target": ("project", "lipschitz_target"),
    "log_every": ("log", "every"),
    "checkpoint_every": ("checkpoint", "every"),
}


def _flat_name(section: str, name: str) -> str:
    for flat, target in _RENAMED.items():
        if target == (section, name):
            return flat
    return f"project_{name}" if section == "project" else name


#: The one alias table: the flat name of every section field (the field names of the flat
#: ``TrainConfig`` of earlier versions) -> ``(section, field)``, in field order.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    _flat_name(section, f.name): (section, f.name)
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
}
#: ``'section.field'`` -> its flat name (the inverse of :data:`FLAT_NAMES`).
DOTTED_NAMES: dict[str, str] = {f"{s}.{n}": flat for flat, (s, n) in FLAT_NAMES.items()}


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig:
    """Everything that defines a training run (hashable; saved as ``config.json`` in the run).

    Constructed from sections and/or flat names (:data:`FLAT_NAMES`; a flat name is applied
    on top of its section, so ``dataclasses.replace(config, lr=0.05)`` works):

      >>> config = TrainConfig(project=ProjectionConfig(max_norm=1.0), lr=0.05)
      >>> config.project.max_norm, config.optim.lr, config.project_max_norm
      (1.0, 0.05, 1.0)

    Attributes:
      data: :class:`DataConfig`.
      network: :class:`NetworkConfig`.
      optim: :class:`OptimConfig`.
      loss: :class:`LossConfig`.
      penalty: :class:`PenaltyConfig`.
      svd: :class:`SVDConfig`.
      project: :class:`ProjectionConfig`.
      log: :class:`LogConfig`.
      checkpoint: :class:`CheckpointConfig`.
      distributed: :class:`DistributedConfig`.
      num_steps: optimiser steps of the whole run.
      seed: initialisation and data-order seed.

    Raises:
      ValueError: naming the field (``section.field``) of an invalid value.
      TypeError: for a keyword that is neither a field nor a flat name.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    penalty: PenaltyConfig = dataclasses.field(default_factory=PenaltyConfig)
    svd: SVDConfig = dataclasses.field(default_factory=SVDConfig)
    project: ProjectionConfig = dataclasses.field(default_factory=ProjectionConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    num_steps: int = 1000
    seed: int = 0

    def __init__(self, **kwargs: Any):
        sections = {}
        for name, cls in SECTIONS.items():
            value = kwargs.pop(name, None)
            if value is None:
                value = cls()
            elif isinstance(value, Mapping):
                value = cls(**value)
            elif not isinstance(value, cls):
                raise ValueError(f"{name}={value!r} must be a {cls.__name__} or a mapping")
            sections[name] = value
        top = {name: kwargs.pop(name, getattr(type(self), name)) for name in TOP_LEVEL}
        changes: dict[str, dict[str, Any]] = {}
        for flat, value in kwargs.items():
            if flat not in FLAT_NAMES:
                raise TypeError(
                    f"TrainConfig got an unexpected keyword argument {flat!r}; expected a "
                    f"section {tuple(SECTIONS)}, one of {TOP_LEVEL} or a flat name "
                    f"(train.config.FLAT_NAMES)"
                )
            section, name = FLAT_NAMES[flat]
            changes.setdefault(section, {})[name] = value
        for section, fields in changes.items():
            try:
                sections[section] = dataclasses.replace(sections[section], **fields)
            except ValueError as e:
                given = [flat for flat in kwargs if FLAT_NAMES[flat][0] == section]
                raise ValueError(f"{e} (given by the flat names {given})") from e
        for name, value in {**sections, **top}.items():
            object.__setattr__(self, name, value)
        _check_int("", "num_steps", self.num_steps, 1)

    def __getattr__(self, name: str) -> Any:
        """Read-only flat names (:data:`FLAT_NAMES`): ``config.project_max_norm`` is
        ``config.project.max_norm``."""
        alias = FLAT_NAMES.get(name)
        if alias is None:
            raise AttributeError(f"'TrainConfig' object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, alias[0]), alias[1])

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (:data:`FLAT_NAMES`, then ``num_steps``, ``seed``)."""
        values = {
            flat: getattr(getattr(self, s), n) for flat, (s, n) in FLAT_NAMES.items()
        }
        return {**values, **{name: getattr(self, name) for name in TOP_LEVEL}}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict, one dict per section (what ``config.json`` holds)."""
        out: dict[str, Any] = {
            name: {f.name: _to_json(getattr(getattr(self, name), f.name))
                   for f in dataclasses.fields(cls)}
            for name, cls in SECTIONS.items()
        }
        out.update({name: getattr(self, name) for name in TOP_LEVEL})
        return out

    def to_flat_dict(self) -> dict[str, Any]:
        """The fields as a flat JSON-able dict keyed by flat names (the format of earlier
        ``config.json`` files, which :meth:`from_json` still reads)."""
        return {name: _to_json(value) for name, value in self.flat().items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; also reads flat names (:meth:`to_flat_dict`, the
        ``config.json`` of earlier versions) and a mix of both (flat names applied last).

        Raises:
          ValueError: naming the unknown fields.
        """
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, Mapping):
                names = {f.name for f in dataclasses.fields(SECTIONS[key])}
                unknown += [f"{key}.{k}" for k in value if k not in names]
                kwargs[key] = {k: _from_json(v) for k, v in value.items() if k in names}
            elif key in TOP_LEVEL or key in FLAT_NAMES:
                kwargs[key] = _from_json(value)
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"config JSON has unknown fields {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """:meth:`from_dict` of a JSON text (sections or flat names)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "TrainConfig":
        return cls.from_json(pathlib.Path(path).read_text())


def _field_types() -> dict[str, Any]:
    """Flat name -> field type, for every field of :class:`TrainConfig`."""
    types = {
        flat: {f.name: f.type for f in dataclasses.fields(SECTIONS[s])}[n]
        for flat, (s, n) in FLAT_NAMES.items()
    }
    top = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    return {**types, **{name: top[name] for name in TOP_LEVEL}}


def _override_mirror(config: TrainConfig) -> Any:
    """A mutable dataclass with the flat names and types of the fields of ``config``, holding
    its values: what ``ml_collections.config_flags`` parses overrides into (it assigns fields
    in place)."""
    values = config.flat()
    cls = dataclasses.make_dataclass(
        "TrainConfigOverrides",
        [(name, kind, dataclasses.field(default=values[name]))
         for name, kind in _field_types().items()],
    )
    return cls()


def _optional(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``config`` with ``key=value`` overrides applied (``--config.key=value`` also accepted).

    A key is ``section.field`` (``project.max_norm=1.0``), a flat name (:data:`FLAT_NAMES`,
    ``project_max_norm=1.0``) or ``num_steps`` / ``seed``. Values are parsed as the field's type
    by ``ml_collections.config_flags``: ``lr=0.05``, ``nesterov=true``,
    ``boundaries=0.3,0.6`` (or ``'(0.3, 0.6)'``); an optional field takes ``none``
    (``project_max_norm=none``). The result is validated by the sections.

    Raises:
      ValueError: naming the override when it is not ``key=value``, the key is not a field of
        :class:`TrainConfig`, or the value does not parse / is invalid.

    Example:
      >>> config = apply_overrides(TrainConfig(), ['--config.lr=0.05', 'network.name=resnet8'])
      >>> config.optim.lr, config.network.name
      (0.05, 'resnet8')
    """
    types = _field_types()
    argv, to_none = ["apply_overrides"], []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        text = text[len("config."):] if text.startswith("config.") else text
        if "=" not in text:
            raise ValueError(f"override {item!r} must be key=value or --config.key=value")
        key, value = text.split("=", 1)
        key = DOTTED_NAMES.get(key, key)
        if key not in types:
            raise ValueError(
                f"override {item!r}: {key!r} is not a TrainConfig field; expected a "
                f"section.field of {sorted(DOTTED_NAMES)}, one of {TOP_LEVEL} or a flat name "
                f"of {sorted(FLAT_NAMES)}"
            )
        if _optional(types[key]) and value.lower() in _NONE_WORDS:
            to_none.append(key)
        else:
            argv.append(f"--config.{key}={value}")
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dataclass(
        "config", _override_mirror(config), flag_values=flag_values, sys_argv=argv
    )
    try:
        flag_values(argv)
    except (flags.Error, KeyError, TypeError) as e:
        raise ValueError(f"overrides {list(overrides)!r}: {e}") from e
    parsed = flag_values.config
    values = {name: getattr(parsed, name) for name in types}
    values.update({name: None for name in to_none})
    changes: dict[str, Any] = {name: values[name] for name in TOP_LEVEL}
    for flat, (section, name) in FLAT_NAMES.items():
        changes.setdefault(section, {})[name] = values[flat]
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        raise ValueError(f"overrides {list(overrides)!r}: {e}") from e
