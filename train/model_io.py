"""Models in and out of run folders, and one evaluation of a model outside the loop.

* :func:`restore_model`: the trained (certified, when the run has it) model of a run folder
  written by :func:`train.loop.train_and_evaluate` or :func:`save_model`;
* :func:`save_model`: a model made outside the loop (e.g. a pruned SVD model) written as a run
  folder in the loop's format;
* :func:`evaluate_model`: the loop's jitted, data-parallel test evaluation of any model.

The run folder's format (``config.json``, orbax checkpoints, the certified item) is that of
:mod:`train.checkpoint`. These functions are also importable from :mod:`train` (and the report,
:mod:`train.report`, imports :func:`restore_model` from here: it does not depend on the loop).
"""

import pathlib
from typing import Any

from flax import nnx

from train import batches
from train import builders
from train import checkpoint
from train import distributed
from train.config import TrainConfig
from train.models.registry import build_model
from train.steps import evaluate
from train.steps import init_train_state
from train.steps import make_steps
from train.steps import split_model


def restore_model(
    run_dir: str | pathlib.Path,
    step: int | None = None,
    *,
    model: nnx.Module | None = None,
    example_input: Any = None,
    mesh_devices: int | None = None,
) -> tuple[nnx.Module, TrainConfig, dict[str, Any]]:
    """The trained model of a run folder (latest checkpoint, or ``step``), in eval mode.

    Args:
      run_dir: a folder written by :func:`train.loop.train_and_evaluate` or :func:`save_model`.
      step: the checkpoint step (``None``: the latest).
      model: a fresh model of the run's architecture (as passed to
        :func:`train.loop.train_and_evaluate`); built from ``config.json`` by the model registry
        (:func:`train.models.registry.build_model`) when ``None``.
      example_input: one input batch ``(1, H, W, C)``; zeros of the run's dataset shape when
        ``None``.
      mesh_devices: the devices to restore onto (:func:`train.distributed.make_mesh`; default
        the config's ``num_devices``); any device count reads any checkpoint.

    Returns:
      ``(model, config, meta)`` with ``meta`` the checkpoint's ``{step, epoch, batch, seed}``
      and its certification (see :func:`train.loop.train_and_evaluate`: ``"certified"``, and
      for runs with the projection ``"certified_max_upper_bound"``, ``"certify_method"``,
      ``"certify_tolerance"``, ...; absent in checkpoints of older versions). The model holds
      the checkpoint's certified parameters (and their BatchNorm statistics) when it has them.

    Raises:
      FileNotFoundError: when ``run_dir`` holds no checkpoint.
    """
    run_dir = pathlib.Path(run_dir)
    config = TrainConfig.load(run_dir / checkpoint.CONFIG_FILE)
    if example_input is None:
        example_input = builders.example_input(config)
    if model is None:
        model = build_model(
            config, builders.num_classes(config), example_input.shape[-1],
            example_input.shape[1:3],
        )
    model.train()
    specs, _, _, params, rest = split_model(model, example_input)
    mesh = distributed.make_mesh(
        config.distributed.num_devices if mesh_devices is None else mesh_devices
    )
    from train.bn_aware import resolve_config  # The run's optimiser state (folded projection).

    run_config, folds, dense = resolve_config(config, model, example_input, specs)
    template = distributed.place_state(
        init_train_state(run_config, specs, params, rest, folds=folds, dense=dense), mesh,
        config.distributed.fsdp,
    )
    manager = checkpoint.checkpoint_manager(run_dir, config)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(
                f"{run_dir / checkpoint.CHECKPOINT_DIR} holds no checkpoint"
            )
        state, meta = checkpoint.restore_checkpoint(manager, template, step)
        params, rest = state.params, state.rest
        if meta.get("certified_params_separate"):
            params, rest = checkpoint.restore_certified(
                manager, params, rest, int(meta["step"]), meta
            )
    finally:
        manager.close()
    nnx.update(model, params, rest)
    model.eval()
    return model, config, meta


def evaluate_model(
    model: nnx.Module, config: TrainConfig, test_data: Any, example_input: Any = None
) -> dict[str, float]:
    """Test loss / accuracy / error of ``model`` on one pass of ``test_data`` (eval mode).

    The same jitted evaluation as the end of :func:`train.loop.train_and_evaluate` (BatchNorm
    running averages, every masked-in example counted once), for a model that was not trained
    by the loop (e.g. a pruned one). Data-parallel over the mesh of
    ``config.distributed.num_devices`` (``test_data`` batches must divide by its device count).

    Args:
      model: the model (left in training mode afterwards, as the loop leaves it).
      config: a configuration (only :func:`train.steps.step_program` of it matters).
      test_data: a :class:`train.batches.BatchSource` (one pass, masked).
      example_input: one input batch ``(1, H, W, C)`` (default: ``test_data``'s first example).

    Returns:
      ``{'loss', 'accuracy', 'error', 'count'}`` (see :func:`train.steps.evaluate`).
    """
    example = batches.example_input(test_data) if example_input is None else example_input
    specs, graphdef_train, graphdef_eval, params, rest = split_model(model, example)
    mesh = distributed.make_mesh(config.distributed.num_devices)
    steps = make_steps(graphdef_train, graphdef_eval, specs, config, mesh)
    params, rest = distributed.place_state((params, rest), mesh, config.distributed.fsdp)
    return evaluate(steps, params, rest, test_data, mesh)


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
    optimiser state of :func:`train.optim.make_optimizer` (``config``); its ``meta`` says
    ``"certified": false`` (the parameters are saved as they are). For models made outside
    the loop, e.g. a pruned SVD model (:mod:`train.svd_pipeline`).

    Raises:
      FileExistsError: when ``run_dir`` exists and is not empty.
    """
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run_dir={str(run_dir)!r} exists and is not empty")
    specs, _, _, params, rest = split_model(model, example_input)
    mesh = distributed.make_mesh(config.distributed.num_devices)
    from train.bn_aware import resolve_config

    run_config, folds, dense = resolve_config(config, model, example_input, specs)
    state = distributed.place_state(
        init_train_state(run_config, specs, params, rest, step, folds=folds, dense=dense),
        mesh, config.distributed.fsdp,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        (run_dir / checkpoint.CONFIG_FILE).write_text(config.to_json())
    manager = checkpoint.checkpoint_manager(run_dir, config)
    try:
        checkpoint.save_checkpoint(
            manager, state,
            {"step": int(step), "epoch": 0, "batch": 0, "seed": config.seed, "certified": False},
        )
        manager.wait_until_finished()
    finally:
        manager.close()


__all__ = [
    "evaluate_model",
    "restore_model",
    "save_model",
]
