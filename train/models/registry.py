"""One registry of every model the training code builds from a :class:`TrainConfig`.

A model is named by ``config.network.name``: an exact name (``'simple_cnn'``, ``'garipov'``) or a
family prefix followed by a number (``'resnet<depth>'``). Its builder receives the config, the
number of classes, the input channels and the input size ``(H, W)`` (or ``None``: the
dataset's) and returns a freshly initialised NNX
model seeded by ``config.seed``; ``config.network.kwargs`` holds further constructor arguments.
:func:`build_model` then applies ``config.svd.decomposition`` (SVD training). Register a new model
with :func:`register_model`; :func:`train.model_io.restore_model` rebuilds any registered model from
a run's ``config.json``.
"""

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.core import unfreeze

from train.config import TrainConfig

#: ``builder(config, num_classes, in_channels, input_shape) -> nnx.Module``.
ModelBuilder = Callable[[TrainConfig, int, int, Any], nnx.Module]

_EXACT: dict[str, ModelBuilder] = {}
_FAMILIES: dict[str, ModelBuilder] = {}


def register_model(name: str, *, family: bool = False) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder`` under ``name`` (or, with ``family``, every
    ``name<int>``; the builder reads the number from ``config.network.name``).

    Raises:
      ValueError: when ``name`` is already registered.
    """

    def register(builder: ModelBuilder) -> ModelBuilder:
        table = _FAMILIES if family else _EXACT
        if name in table:
            raise ValueError(f"model name {name!r} is already registered")
        table[name] = builder
        return builder

    return register


def model_names() -> tuple[str, ...]:
    """The registered names, families written ``'<name><int>'``, sorted."""
    return tuple(sorted([*_EXACT, *(f"{n}<int>" for n in _FAMILIES)]))


def _builder(model: str) -> ModelBuilder:
    name = model.lower()
    if name in _EXACT:
        return _EXACT[name]
    for prefix, builder in _FAMILIES.items():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return builder
    raise ValueError(f"model={model!r}: expected one of {model_names()}")


def build_model(
    config: TrainConfig, num_classes: int, in_channels: int, input_shape: Any = None
) -> nnx.Module:
    """The model named by ``config.network.name``, seeded by ``config.seed``.

    With ``config.svd.decomposition`` set, every conv (and, with ``config.svd.decompose_dense``,
    every dense layer) is replaced by its full-rank SVD form (Yang et al. 2020) with the paper's
    random initialisation: ``train.layers.svd_decompose.decompose(model, config.svd.decomposition,
    init='random', dense=config.svd.decompose_dense, rngs=nnx.Rngs(config.seed + 1))``.

    Args:
      config: the configuration (``model``, ``model_kwargs``, ``width``, ``padding``, ...).
      num_classes: outputs of the classifier.
      in_channels: channels of the input images.
      input_shape: ``(H, W)`` of the input images (default: the dataset's, with
        ``config.data.image_pad``); only models with a size-dependent head use it.

    Raises:
      ValueError: naming ``config.network.name`` when it is not registered (or a resnet depth is
        not ``6n + 2``).

    Example:
      >>> model = build_model(TrainConfig(model='resnet8', width=4), 10, 1)
      >>> type(model).__name__
      'ResNet'
    """
    model = _builder(config.network.name)(config, num_classes, in_channels, input_shape)
    if config.svd.decomposition is None:
        return model
    from train.layers import svd_decompose

    return svd_decompose.decompose(
        model,
        config.svd.decomposition,
        dense=config.svd.decompose_dense,
        init="random",
        rngs=nnx.Rngs(config.seed + 1),
    )


@register_model("resnet", family=True)
def _resnet(config: TrainConfig, num_classes: int, in_channels: int, input_shape) -> nnx.Module:
    from train.models import resnet

    depth = int(config.network.name.lower()[len("resnet"):])
    kwargs = dict(unfreeze(config.network.kwargs))
    if kwargs.get("norm") == "capped" and kwargs.get("input_size") is None and input_shape:
        kwargs["input_size"] = tuple(int(n) for n in input_shape)  # The power vectors' sizes.
    return resnet.ResNet(
        depth,
        num_classes,
        in_channels=in_channels,
        padding=config.network.padding,
        shortcut=config.network.shortcut,
        width=config.network.width,
        rngs=nnx.Rngs(config.seed),
        **kwargs,
    )


@register_model("simple_cnn")
def _simple_cnn(
    config: TrainConfig, num_classes: int, in_channels: int, input_shape
) -> nnx.Module:
    from train.models import resnet

    w = config.network.width
    kwargs = {"features": (w, 2 * w, 2 * w), **unfreeze(config.network.kwargs)}
    return resnet.SimpleCNN(
        num_classes,
        in_channels=in_channels,
        padding=config.network.padding,
        rngs=nnx.Rngs(config.seed),
        **kwargs,
    )


@register_model("garipov")
def _garipov(config: TrainConfig, num_classes: int, in_channels: int, input_shape) -> nnx.Module:
    """Garipov et al.'s conv / conv-fc network; ``config.network.kwargs`` holds its variant,
    channels, FC sizes and TT layers (:class:`train.models.garipov.GaripovNet`)."""
    from train.models import garipov

    if input_shape is None:
        from train.builders import input_shape as dataset_input_shape

        input_shape = dataset_input_shape(config)[:2]
    kwargs = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_shape": tuple(input_shape),
        **unfreeze(config.network.kwargs),
    }
    return garipov.GaripovNet(**kwargs, rngs=nnx.Rngs(config.seed))


@register_model("lipresnet")
def _lipresnet(
    config: TrainConfig, num_classes: int, in_channels: int, input_shape
) -> nnx.Module:
    """The 1-Lipschitz residual CNN :class:`train.models.lipnet.LipResNet`
    (``config.network.width``, ``config.network.padding``; depths, activation, head in
    ``config.network.kwargs``); train it with ``project_max_norm=1.0``
    to keep every conv at σ_max <= 1."""
    from train.models import lipnet

    if input_shape is None:
        from train.builders import input_shape as dataset_input_shape

        input_shape = dataset_input_shape(config)[:2]
    return lipnet.LipResNet(
        num_classes,
        in_channels=in_channels,
        input_shape=tuple(input_shape),
        width=config.network.width,
        padding=config.network.padding,
        rngs=nnx.Rngs(config.seed),
        **unfreeze(config.network.kwargs),
    )
