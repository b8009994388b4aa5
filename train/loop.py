"""Training and evaluation of Flax NNX models with optax: :func:`train_and_evaluate`.

The loop composes the parts of :mod:`train`: a config (:mod:`train.config`), its data and model
(:mod:`train.builders`, :mod:`train.models.registry`), the jitted steps and their state
(:mod:`train.steps`, optimiser in :mod:`train.optim`), checkpoints and run folders
(:mod:`train.checkpoint`) and metrics (:mod:`train.metrics`).

Design notes (host synchronisation, run folders, certified checkpoints, devices,
resuming): ``docs/training_loop.md``. Command line: :mod:`train.cli`.

Example::

    from train import loop
    from train.checkpoint import make_run_dir
    from train.config import TrainConfig

    config = TrainConfig(dataset="digits", image_pad=2, model="resnet8", width=8,
                         num_steps=300, project_max_norm=1.0, project_every=10)
    result = loop.train_and_evaluate(config, make_run_dir("runs"))
    result["test_error"], result["sigma_max"]
"""

import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from train import batches
from train import bn_aware
from train import builders
from train import checkpoint
from train import distributed
from train import lipschitz_target
from train import metrics
from train.batches import count_batches
from train.batches import unpack_batch
from train.certify import batch_stats_recalibrator
from train.certify import certify_train_state
from train.config import TrainConfig
from train.conv_norms import conv_layers
from train.models.registry import build_model
from train.steps import Steps
from train.steps import TrainState
from train.steps import evaluate
from train.steps import init_train_state
from train.steps import make_steps
from train.steps import split_model
from train.steps import step_hyperparameters
from train.steps import svd_terms_on
from train.steps import zero_sums


def _check_run_dir(
    run_dir: pathlib.Path, config: TrainConfig, resume: bool, until_step: int | None
) -> None:
    if resume:
        if not (run_dir / checkpoint.CHECKPOINT_DIR).exists():
            raise FileNotFoundError(f"resume=True but {run_dir} holds no checkpoint")
        checkpoint.check_resume_config(run_dir, config)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run_dir={str(run_dir)!r} exists and is not empty; pass resume=True to continue it "
            "or use train.checkpoint.make_run_dir(root) for a fresh folder"
        )
    if until_step is not None and not 0 < until_step <= config.num_steps:
        raise ValueError(f"until_step={until_step} must be in [1, num_steps={config.num_steps}]")


def _data_and_model(config: TrainConfig, model, train_data, test_data):
    """The run's data sources (this process's shard) and model (built from ``config`` where
    not given)."""
    num_classes = None
    if train_data is None or test_data is None:
        built_train, built_test, info = builders.build_data(
            config, process_index=jax.process_index(), process_count=jax.process_count()
        )
        train_data = built_train if train_data is None else train_data
        test_data = built_test if test_data is None else test_data
        num_classes = info.num_classes
    example = batches.example_input(train_data)
    if model is None:
        if num_classes is None:
            num_classes = builders.num_classes(config)
        model = build_model(config, num_classes, example.shape[-1], example.shape[1:3])
    if count_batches(train_data) < 1:
        raise ValueError("train_data yields no full batch per epoch")
    return model, train_data, test_data, example


def _meta(step: int, steps_per_epoch: int, config: TrainConfig) -> dict[str, Any]:
    epoch, batch = divmod(step, steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch": batch, "seed": config.seed}


def _progress_bar(config: TrainConfig, initial: int, total: int):
    if not config.log.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=False)


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
        overwritten; see :func:`train.checkpoint.make_run_dir` for a fresh one).
      resume: continue the run in ``run_dir`` from its latest checkpoint (its ``config.json``
        must match ``config`` except for :data:`train.checkpoint.RESUMABLE_CHANGES`, after
        which the continuation is bit-identical to an uninterrupted run, and ``num_steps``, at
        least the checkpoint's step: the learning-rate schedule is rebuilt for it, see
        :data:`train.checkpoint.SCHEDULE_CHANGES`); ``config.json`` is rewritten with
        ``config``. :func:`train.checkpoint.resume_config` gives the saved config with
        overrides.
      until_step: stop (with a checkpoint) after this many total steps, before
        ``config.num_steps`` (the schedule still spans ``num_steps``); for preemptible jobs and
        tests of resumption.
      model: a model to train instead of ``build_model(config, ...)`` (a fresh one, built the
        same way on resumption: its values are replaced by the checkpoint's).
      train_data: a :class:`train.batches.BatchSource` instead of the one from
        :func:`train.builders.build_data`.
      test_data: a :class:`train.batches.BatchSource` (one pass, masked) instead of
        :func:`train.builders.build_data`'s.

    Returns:
      A dict: ``run_dir``, ``step``, ``test_accuracy``, ``test_error``, ``test_loss``,
      ``test_count`` (``None`` when stopped early by ``until_step``), ``train_loss`` (mean over
      the last log interval), ``sigma_max`` ``{layer name: σ_max}`` (exact, see
      :func:`train.conv_norms.layer_spectral_norms`, of the returned model), ``history`` (the
      rows of ``metrics.csv``; ``None`` on processes other than 0), ``compile_s`` (time of the
      first step of this call, compile included),
      ``step_time_s`` (median per-step time of the log intervals), ``model`` (the trained
      model, its state updated in place, in training mode: with ``project_max_norm``, its
      certified parameters and recalibrated BatchNorm statistics, as saved in the last
      checkpoint), ``specs`` (its
      :func:`train.find_convs_nnx` specs) and ``certification`` (the last checkpoint's
      certification metadata, see the module docstring).

    Raises:
      FileExistsError: when ``run_dir`` is not empty and ``resume`` is false.
      FileNotFoundError: when ``resume`` is true and ``run_dir`` holds no checkpoint.
      ValueError: naming ``config`` fields that differ from the resumed run's and may not
        change, or when ``num_steps`` is below the checkpoint's step.
    """
    run_dir = pathlib.Path(run_dir)
    distributed.initialize(config)
    _check_run_dir(run_dir, config, resume, until_step)
    distributed.barrier("train_and_evaluate: run folder checked")  # Before any process writes.
    mesh = distributed.make_mesh(config.distributed.num_devices)
    distributed.check_batch_sizes(
        mesh, batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size
    )
    stop = config.num_steps if until_step is None else until_step
    model, train_data, test_data, example = _data_and_model(config, model, train_data, test_data)
    steps_per_epoch = count_batches(train_data)

    model.train()
    specs, graphdef_train, graphdef_eval, params, rest = split_model(model, example)
    layers = conv_layers(specs)
    # BatchNorm-aware projection / Lipschitz target (train.bn_aware): `user_config` is what
    # config.json holds; `config` may carry the radius derived from lipschitz_target.
    user_config = config
    config, folds, dense = bn_aware.resolve_config(config, model, example, specs)
    steps = make_steps(graphdef_train, graphdef_eval, specs, config, mesh, folds=folds,
                       dense=dense)
    state = distributed.place_state(
        init_train_state(config, specs, params, rest, folds=folds, dense=dense), mesh,
        config.distributed.fsdp,
    )

    main = distributed.is_main_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.checkpoint_manager(run_dir, config)
    resume_step = None
    if resume:
        if manager.latest_step() is None:
            raise FileNotFoundError(
                f"resume=True but {run_dir / checkpoint.CHECKPOINT_DIR} is empty"
            )
        if manager.latest_step() > config.num_steps:
            raise ValueError(
                f"num_steps={config.num_steps} is below the step {manager.latest_step()} of the "
                f"latest checkpoint in {run_dir}: a resumed run may end later, not earlier"
            )
        state, meta = checkpoint.restore_checkpoint(manager, state)
        resume_step = int(meta["step"])
    if main:  # On resume: the config that continues the run (e.g. a new num_steps).
        (run_dir / checkpoint.CONFIG_FILE).write_text(user_config.to_json())
    if main:
        distributed.record_mesh(run_dir, mesh, config.distributed.fsdp, int(state.step))

    columns, svd_cols, sigma_cols = metrics.columns(svd_terms_on(config), layers)
    writer = None
    if main:
        writer = metrics.MetricsWriter(run_dir / metrics.METRICS_FILE, columns, resume_step)
    rows = metrics.PendingRows(writer, steps_per_epoch, sigma_cols)
    progress = _progress_bar(config, int(state.step), stop) if main else None
    try:
        state, out = _train(
            config, steps, state, train_data, test_data, stop, rows, progress, manager,
            layers, svd_cols, mesh, specs,
            batch_stats_recalibrator(config, graphdef_train, train_data, mesh), (folds, dense),
        )
        manager.wait_until_finished()
    finally:
        manager.close()
        if writer is not None:
            writer.close()
        if progress is not None:
            progress.close()

    test = out["test"] if out["step"] == config.num_steps else None
    nnx.update(model, out["params"], out["rest"])
    lipschitz = None
    if config.project.lipschitz_target is not None and out["step"] == config.num_steps:
        lipschitz = lipschitz_target.certify_run_target(config, model, example, run_dir, main)
    return {
        "run_dir": str(run_dir),
        "step": out["step"],
        "test_accuracy": None if test is None else test["accuracy"],
        "test_error": None if test is None else test["error"],
        "test_loss": None if test is None else test["loss"],
        "test_count": None if test is None else test["count"],
        "train_loss": out["train_loss"],
        "sigma_max": out["sigma_max"],
        "history": metrics.read_history(run_dir) if main else None,
        "compile_s": out["compile_s"],
        "step_time_s": out["step_time_s"],
        "model": model,
        "specs": specs,
        "certification": out["certification"],
        "lipschitz": lipschitz,
    }


def _train(
    config: TrainConfig, steps: Steps, state: TrainState, train_data, test_data, stop: int,
    rows: metrics.PendingRows, progress, manager, layers, svd_cols, mesh, specs, recalibrate,
    folded=((), ()),
) -> tuple[TrainState, dict[str, Any]]:
    """The step loop of :func:`train_and_evaluate` from ``state.step`` to ``stop``."""
    certified_at: dict[int, tuple[Any, Any, Any, dict[str, Any]]] = {}

    def certified(step: int) -> tuple[Any, Any, Any, dict[str, Any]]:  # Once per step.
        if step not in certified_at:
            certified_at.clear()
            certify = (bn_aware.certify_folded_train_state
                       if any(folded) and config.project.max_norm is not None
                       else certify_train_state)
            certified_at[step] = certify(config, specs, state, mesh, recalibrate, *folded)
        return certified_at[step]

    def save(step: int) -> None:
        _, _, separate, certification = certified(step)
        meta = {**_meta(step, steps_per_epoch, config), **certification}
        checkpoint.save_checkpoint(manager, state, meta, separate)

    steps_per_epoch = count_batches(train_data)
    hyper = distributed.place_state(step_hyperparameters(config), mesh)
    step = int(state.step)
    epoch, batch_index = divmod(step, steps_per_epoch)
    iterator = iter(train_data.batches(epoch, start_batch=batch_index))
    interval_times, compile_s, t_last, steps_since = [], None, time.perf_counter(), 0
    last_train_loss, test, final_sigmas = math.nan, None, {}
    while step < stop:
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            iterator = iter(train_data.batches(epoch))
            batch = next(iterator)
        image, label, mask = unpack_batch(batch)
        image, label, mask = distributed.shard_batch(
            mesh, np.asarray(image, np.float32), label, np.asarray(mask, np.float32)
        )
        state, lr = steps.train_step(state, image, label, mask, hyper)
        step += 1
        steps_since += 1
        if progress is not None:
            progress.update(1)
        if compile_s is None:  # One synchronisation, to time the compilation.
            jax.block_until_ready(state.step)
            compile_s = time.perf_counter() - t_last
            t_last, steps_since = time.perf_counter(), 0
        if config.log.sigma_every and step % config.log.sigma_every == 0:
            rows.at(step)["_sigmas"] = steps.sigmas(state.params)  # Read at the next flush.
        if step % config.log.every == 0 or step == config.num_steps:
            now = time.perf_counter()
            step_time = (now - t_last) / steps_since if steps_since else math.nan
            if steps_since:
                interval_times.append(step_time)
            t_last, steps_since = now, 0
            last_train_loss = metrics.log_sums(state.sums, rows.at(step), lr, step_time, svd_cols)
            state = state._replace(sums=distributed.place_state(zero_sums(config), mesh))
            if progress is not None:
                progress.set_postfix(loss=f"{last_train_loss:.4f}", refresh=False)
        final = step == config.num_steps
        # The final evaluation and σ_max are those of the final (certified) parameters.
        params, rest = certified(step)[:2] if final else (state.params, state.rest)
        if (config.log.eval_every and step % config.log.eval_every == 0) or final:
            test = evaluate(steps, params, rest, test_data, mesh)
            rows.at(step).update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        if final:
            final_sigmas = metrics.sigma_dict(layers, steps.sigmas(params))
            rows.at(step).update({f"sigma/{name}": v for name, v in final_sigmas.items()})
        if step % config.log.every == 0 or step == stop:
            rows.flush()
        if config.checkpoint.every and step % config.checkpoint.every == 0:
            rows.flush()
            save(step)
    rows.flush()
    save(step)
    params, rest, _, certification = certified(step)
    if not final_sigmas:
        final_sigmas = metrics.sigma_dict(layers, steps.sigmas(params))
    if step == config.num_steps and test is None:
        test = evaluate(steps, params, rest, test_data, mesh)
    return state, {
        "params": params,
        "rest": rest,
        "certification": certification,
        "step": step,
        "test": test,
        "train_loss": last_train_loss,
        "sigma_max": final_sigmas,
        "compile_s": compile_s,
        "step_time_s": float(np.median(interval_times)) if interval_times else math.nan,
    }
