"""Energy-based pruning of the singular values of SVD layers (Yang et al. 2020).

After SVD training with a sparsity term, each :class:`train.layers.svd.SVDConv` /
:class:`train.layers.svd.SVDDense` keeps the shortest prefix of its singular values (sorted by
``|s|``, descending) whose energy ``sum s_j^2`` reaches ``(1 - e)`` of the layer's total:

* :func:`energy_rank`: that prefix length for one vector ``s``;
* :func:`prune_by_energy`: a new, **compact** model whose factors are sliced to the kept rank
  (the arrays shrink, so do the FLOPs);
* :func:`mask_by_energy`: a new model of the same size with the dropped ``s`` set to ``0`` (the
  same function as the compact model, up to rounding);
* :func:`kept_energy`: the fraction of each layer's energy that a pruned model keeps;
* :func:`svd_ranks` and :func:`rebuild_pruned`: the ranks of a pruned model, and a model of
  those ranks to restore its checkpoint into.

The energy here is that of ``s``; it is the energy of the layer's matrix view
(``||W||_F^2``) when ``U`` and ``V`` have orthonormal columns.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.layers.svd import SVDConv
from train.layers.svd import SVDDense
from train.layers.svd_decompose import svd_layers

EnergyLike = float | Mapping[str, float]


def _check_energy(energy: float, name: str = "energy") -> float:
    try:
        value = float(energy)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={energy!r} must be a float in [0, 1)") from e
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={energy!r} must be in [0, 1)")
    return value


def energy_rank(s: jax.typing.ArrayLike, energy: float) -> int:
    r"""Number of singular values to keep so that at most a fraction ``energy`` is removed.

    With ``s`` sorted by ``|s|`` descending, the smallest ``k >= 1`` such that

    .. math:: \sum_{j \ge k} s_j^2 \le e \sum_j s_j^2
       \quad\Longleftrightarrow\quad \sum_{j < k} s_j^2 \ge (1 - e) \sum_j s_j^2,

    i.e. the shortest prefix whose cumulative energy reaches ``(1 - e)`` of the total (the
    dropped tail is summed directly, so ``e = 0`` keeps exactly the nonzero values even when
    some are below rounding of the total). Exact (host-side numpy in float64).

    Conventions: the result is at least 1, so an all-zero ``s`` keeps rank 1 (a layer never
    becomes empty; its one kept value is 0). Monotone: a larger ``energy`` never keeps more.

    Args:
      s: ``(r,)`` singular values (any sign: ``|s|`` is what the layers use), concrete.
      energy: ``e`` in ``[0, 1)``.

    Returns:
      ``k`` in ``[1, r]``.

    Raises:
      ValueError: naming ``energy`` when outside ``[0, 1)``, ``s`` when not a non-empty vector.

    Example:
      >>> energy_rank([3.0, 0.0, 4.0, 1.0], 0.05)  # 16 + 9 = 25 >= 0.95 * 26.
      2
    """
    e = _check_energy(energy)
    values = np.asarray(s, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"s must be a non-empty vector; got shape {values.shape}")
    squares = np.sort(np.square(values))[::-1]
    total = float(np.sum(squares))
    # tail[k] = sum_{j >= k} s_j^2, summed from the smallest value up; tail[r] = 0.
    tail = np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])
    admissible = np.nonzero(tail <= e * total)[0]
    return max(1, int(admissible[0]))


def _layer_energy(energy: EnergyLike, path: str) -> float:
    if isinstance(energy, Mapping):
        if path not in energy:
            raise ValueError(
                f"energy has no entry for the SVD layer {path!r}; its keys are {sorted(energy)}"
            )
        return _check_energy(energy[path], f"energy[{path!r}]")
    return _check_energy(energy)


def _kept_indices(layer: SVDConv | SVDDense, energy: float) -> np.ndarray:
    s = np.asarray(layer.svd_s[...])
    order = np.argsort(-np.abs(s), kind="stable")
    return order[: energy_rank(s, energy)]


def _check_energy_keys(model: nnx.Module, energy: EnergyLike) -> None:
    if isinstance(energy, Mapping):
        paths = {path for path, _ in svd_layers(model)}
        unknown = sorted(set(energy) - paths)
        if unknown:
            raise ValueError(f"energy has keys {unknown} that are not SVD layers of the model")


def prune_by_energy(
    model: nnx.Module, energy: EnergyLike
) -> tuple[nnx.Module, dict[str, int]]:
    """A compact copy of ``model`` with every SVD layer cut to its :func:`energy_rank`.

    For each :class:`~train.layers.svd.SVDConv` / :class:`~train.layers.svd.SVDDense`, the
    kept singular triplets (largest ``|s|`` first) become the new ``svd_u``, ``svd_s``,
    ``svd_v`` of shapes ``(a, k)``, ``(k,)``, ``(b, k)``: the arrays really shrink. The result
    computes the same function as :func:`mask_by_energy` (up to float rounding), and keeps at
    least ``(1 - e)`` of each layer's energy ``sum s^2`` (exact, see :func:`kept_energy`).
    Other modules (BatchNorm statistics, train/eval mode) are copied; ``model`` is unchanged.
    The parameter structure changes, so a new optimizer state is needed to fine-tune.

    Args:
      model: an NNX model with SVD layers.
      energy: ``e`` in ``[0, 1)`` for every layer, or ``{path: e}`` with an entry for every
        path of :func:`train.layers.svd_decompose.svd_layers`.

    Returns:
      ``(compact_model, {path: kept_rank})``.

    Raises:
      ValueError: naming ``energy`` (outside ``[0, 1)``, missing or unknown paths).
    """
    _check_energy_keys(model, energy)
    new = nnx.clone(model)
    ranks = {}
    for path, layer in svd_layers(new):
        keep = _kept_indices(layer, _layer_energy(energy, path))
        layer.keep_triplets(keep)
        ranks[path] = len(keep)
    return new, ranks


def mask_by_energy(model: nnx.Module, energy: EnergyLike) -> nnx.Module:
    """A copy of ``model`` with the singular values that :func:`prune_by_energy` drops set to 0.

    Same shapes as ``model`` ("masked model"); same function as the compact model. ``energy``
    as for :func:`prune_by_energy`; ``model`` is unchanged.

    Raises:
      ValueError: naming ``energy`` (outside ``[0, 1)``, missing or unknown paths).
    """
    _check_energy_keys(model, energy)
    new = nnx.clone(model)
    for path, layer in svd_layers(new):
        keep = _kept_indices(layer, _layer_energy(energy, path))
        s = np.asarray(layer.svd_s[...])
        masked = np.zeros_like(s)
        masked[keep] = s[keep]
        layer.svd_s = nnx.Param(jnp.asarray(masked))
    return new


def layer_energies(model: nnx.Module) -> dict[str, float]:
    """``{path: sum s^2}`` for every SVD layer of ``model`` (float64, host-side)."""
    return {
        path: float(np.sum(np.square(np.asarray(layer.svd_s[...], dtype=np.float64))))
        for path, layer in svd_layers(model)
    }


def kept_energy(model_before: nnx.Module, model_after: nnx.Module) -> dict[str, float]:
    """``{path: energy_after / energy_before}`` for the SVD layers of ``model_before``.

    The fraction of each layer's energy ``sum s^2`` that a pruned (compact or masked) model
    keeps; ``1.0`` for a layer whose energy was 0. After pruning with ``e`` it is ``>= 1 - e``
    in every layer (up to rounding).

    Raises:
      ValueError: naming ``model_after`` when it lacks an SVD layer of ``model_before``.
    """
    before, after = layer_energies(model_before), layer_energies(model_after)
    missing = sorted(set(before) - set(after))
    if missing:
        raise ValueError(f"model_after has no SVD layers at {missing}")
    return {
        path: (after[path] / total if total > 0 else 1.0) for path, total in before.items()
    }


def svd_ranks(model: nnx.Module) -> dict[str, int]:
    """``{layer path: rank}`` of every SVD layer of ``model`` (the length of its ``svd_s``)."""
    return {path: layer.rank for path, layer in svd_layers(model)}


def rebuild_pruned(model: nnx.Module, ranks: dict[str, int]) -> nnx.Module:
    """A model with the architecture of a pruned model (e.g. a stage-3 model of
    :func:`train.svd_pipeline.run_svd_pipeline`), for restoring its checkpoint.

    A copy of ``model`` (a decomposed model of the pipeline's architecture, e.g. a fresh
    ``train.models.registry.build_model(config, ...)``) with the factors of every SVD layer
    at ``path`` cut to their first ``ranks[path]`` triplets (``keep_triplets(slice(r))``:
    ``svd_u[:, :r]``, ``svd_s[:r]``, ``svd_v[:, :r]``); layers not in ``ranks`` are kept. Only
    the shapes matter: the values are those of ``model``, to be replaced by
    :func:`train.model_io.restore_model`.

    Raises:
      ValueError: naming ``ranks`` when a path is not an SVD layer of ``model`` or a rank is
        not in ``[1, current rank]``.
    """
    new = nnx.clone(model)
    layers = dict(svd_layers(new))
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise ValueError(f"ranks has paths {unknown} that are not SVD layers of the model")
    for path, rank in ranks.items():
        layer = layers[path]
        if not (isinstance(rank, int) and 1 <= rank <= layer.rank):
            raise ValueError(f"ranks[{path!r}]={rank!r} must be an int in [1, {layer.rank}]")
        layer.keep_triplets(slice(rank))
    return new
