"""Whole models in SVD form: :func:`decompose` and :func:`svd_layers`.

:func:`decompose` walks any NNX model and replaces every supported ``nnx.Conv`` (and
``nnx.Linear``) by a :class:`train.layers.svd.SVDConv` (:class:`train.layers.svd.SVDDense`), from
the current kernel (exact at full rank) or the paper's random initialisation (Yang et al. 2020);
:func:`svd_layers` lists the SVD layers of a model by their :func:`train.layers.svd.path_name`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from spectra import normalize_padding
from train.layers.svd import DECOMPOSITIONS
from train.layers.svd import SVD_CONV_PADDINGS
from train.layers.svd import SVDConv
from train.layers.svd import SVDDense
from train.layers.svd import SVDLayer
from train.layers.svd import factor_shape
from train.layers.svd import path_name


def _child(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _conv_is_supported(conv: nnx.Conv) -> bool:
    if len(conv.kernel_size) != 2 or conv.feature_group_count != 1 or conv.mask is not None:
        return False
    if conv.input_dilation not in (None, 1, (1, 1), [1, 1]):
        return False
    try:
        normalize_padding(conv.padding, SVD_CONV_PADDINGS)
    except ValueError:
        return False
    return True


def _layer_rank(rank: int | dict[str, int] | None, path: str, max_rank: int) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, dict):
        return rank.get(path)
    return min(int(rank), max_rank)


def _replacement(
    module: nnx.Module,
    decomposition: str,
    init: str,
    rank: int | None,
    rngs: nnx.Rngs | None,
) -> SVDLayer:
    bias = None if module.bias is None else module.bias[...]
    if isinstance(module, nnx.Conv):
        options = dict(
            strides=module.strides if module.strides is not None else 1,
            padding=module.padding,
            kernel_dilation=module.kernel_dilation if module.kernel_dilation is not None else 1,
        )
        if init == "from_dense":
            return SVDConv.from_dense(
                module.kernel[...], decomposition=decomposition, rank=rank, bias=bias,
                param_dtype=module.param_dtype, **options,
            )
        return SVDConv(
            module.in_features, module.out_features, module.kernel_size,
            decomposition=decomposition, rank=rank, use_bias=bias is not None,
            param_dtype=module.param_dtype, rngs=rngs, **options,
        )
    if init == "from_dense":
        return SVDDense.from_dense(
            module.kernel[...], bias=bias, rank=rank, param_dtype=module.param_dtype
        )
    return SVDDense(
        module.in_features, module.out_features, rank=rank, use_bias=bias is not None,
        param_dtype=module.param_dtype, rngs=rngs,
    )


def decompose(
    model: nnx.Module,
    decomposition: str = "channel",
    *,
    dense: bool = True,
    init: str = "from_dense",
    rank: int | dict[str, int] | None = None,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """A copy of ``model`` with its convs (and dense layers) in SVD form.

    Every ``nnx.Conv`` with a 2-D kernel, ``feature_group_count == 1``, no ``mask``, no
    ``input_dilation`` and a padding :class:`SVDConv` supports becomes an :class:`SVDConv`
    (same strides, padding, dilation and bias); other convs (grouped/depthwise, masked,
    input-dilated, 1-D/3-D, ``'CAUSAL'``) are left as they are. With ``dense=True`` every
    ``nnx.Linear`` becomes an :class:`SVDDense`. The graph is walked generically (attributes,
    ``nnx.List`` items, nested modules), so any NNX model works; ``model`` itself is not changed
    (the result is built on ``nnx.clone(model)``, which keeps BatchNorm statistics and the
    train/eval mode). The conv's ``dtype`` / ``precision`` options are not carried over.

    Args:
      model: an NNX module.
      decomposition: ``'channel'`` or ``'spatial'`` (for the convs).
      dense: also decompose the ``nnx.Linear`` layers.
      init: ``'from_dense'``: truncated SVD of each layer's current kernel (the function of
        the model is kept **exactly**, up to rounding, at full rank); ``'random'``: the paper's
        initialisation (see :class:`SVDConv`) to train from scratch.
      rank: ``None`` (full rank), an int (``min(rank, max_rank)`` per layer) or a dict
        ``{path: rank}`` keyed by the paths of :func:`svd_layers` (others at full rank).
      rngs: ``nnx.Rngs`` for ``init='random'``.

    Returns:
      The new model.

    Raises:
      ValueError: naming ``decomposition``, ``init`` or ``rngs`` (missing for ``'random'``),
        or ``rank`` (too large for a layer in a dict).
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(
            f"decomposition={decomposition!r} is unknown; expected one of {DECOMPOSITIONS}"
        )
    if init not in ("from_dense", "random"):
        raise ValueError(f"init={init!r} is unknown; expected 'from_dense' or 'random'")
    if init == "random" and rngs is None:
        raise ValueError("rngs is required for init='random'")
    new = nnx.clone(model)
    targets = []
    for path, module in nnx.iter_modules(new):
        if not path:
            continue
        if isinstance(module, nnx.Conv) and _conv_is_supported(module):
            targets.append((path, module))
        elif dense and isinstance(module, nnx.Linear):
            targets.append((path, module))
    for path, module in targets:
        name = path_name(path)
        if isinstance(module, nnx.Conv):
            a, b = factor_shape(
                decomposition, module.in_features, module.out_features, module.kernel_size
            )
        else:
            a, b = module.in_features, module.out_features
        layer_rank = _layer_rank(rank, name, min(a, b))
        replacement = _replacement(module, decomposition, init, layer_rank, rngs)
        parent = new
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], replacement)
    return new


def svd_layers(model: nnx.Module) -> list[tuple[str, SVDLayer]]:
    """Every :class:`SVDConv` / :class:`SVDDense` of ``model`` with its path ``'a/b/c'``.

    Paths are :func:`path_name` of the NNX graph paths (``'blocks/0/conv1'``), in the order of
    ``nnx.iter_modules``; they match the paths of :func:`train.regularizers.svd_factors`.
    """
    return [
        (path_name(path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, (SVDConv, SVDDense))
    ]


__all__ = ["decompose", "svd_layers"]
