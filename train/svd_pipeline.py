"""SVD training (Yang et al. 2020) as one resumable four-stage pipeline.

The stages of the paper's protocol (reference notes §3), each a run folder under one ``root``:

1. ``stage1_decomposed/``: train the decomposed network (``config.svd.decomposition``: every layer
   in SVD form ``U diag(|s|) V^T``, :func:`train.layers.svd_decompose.decompose`) from its random
   initialisation, with the orthogonality term ``λ_o`` (``config.svd.orth_weight``) and **no**
   sparsity term (``λ_s = 0``);
2. ``stage2_sparse/``: continue from stage 1's final parameters (and BatchNorm statistics) with
   the sparsity term ``λ_s = sparsity_weight`` (``config.svd.sparsity``: L1 / Hoyer /
   Hoyer-square) and ``λ_o`` kept;
3. ``stage3_prune_e<e>/`` for every energy ``e``: prune stage 2's network by energy
   (:func:`train.pruning.prune_by_energy`: per layer keep the shortest prefix of the sorted
   singular values holding at least ``1 - e`` of ``Σ s_j²``), giving a **compact** model (the
   factors truncated to the kept rank), evaluate it, re-estimate its BatchNorm running
   statistics on training batches (:func:`train.batchnorm.recalibrate_batch_stats`, see
   below), evaluate it again and save the recalibrated model (a checkpoint readable by
   :func:`train.model_io.restore_model`, and ``ranks.json`` to rebuild its architecture);
4. ``stage4_finetune_e<e>/``: fine-tune every pruned (and recalibrated) network with
   ``λ_s = 0`` (``λ_o`` kept).

Why stage 3 recalibrates: pruning removes up to the fraction ``e`` of the energy of *every*
layer, so the activations entering each BatchNorm change their mean and variance, while the
pruned model keeps stage 2's running statistics. In evaluation mode each BatchNorm then
normalises with statistics of the unpruned network, and the mismatch compounds through the
depth: for a channel-wise ResNet-8 (width 8, digits) at ``e = 0.1`` the pruned network
predicted one class for every test image (10% accuracy) while the same weights classified 48%
of them with batch statistics. Re-estimating the statistics (an exact average over
``recalibration_batches`` training batches, forward passes only: no parameter changes) removes
that part of the loss; what remains is the function change of pruning itself. Stage 3 reports
both numbers.

Each training stage is a :func:`train.loop.train_and_evaluate` run of ``config`` with
``num_steps`` (and ``sparsity_weight``) replaced; the learning-rate schedule restarts and the
**optimiser state starts fresh** in every stage (the paper starts each stage as a new training
run from the previous stage's weights: Adam's moments and the step count are not carried over),
as do the data order (the same ``config.seed``) and the model's RNG streams (taken from the
previous stage's checkpoint).

Resumption: ``root/pipeline.json`` records what defines the pipeline (``config`` except the
fields of :data:`train.checkpoint.RESUMABLE_CHANGES`, ``sparsity_weight``, the stage
lengths). A rerun with the same root checks it (a different one raises ``ValueError``:
nothing is overwritten), skips every finished stage (its ``result.json`` is read back: no
training, no evaluation) and resumes an interrupted training stage from its latest
checkpoint (bit-identical, see :func:`train.loop.train_and_evaluate`; with
``config.checkpoint_every = 0`` a stage interrupted before its end has no checkpoint and
restarts). The energies are not part of the record: a
rerun may add energies (new stage 3/4 folders) and reuses those already done.

Every stage reports its test error/accuracy (stage 3: of the saved, recalibrated model, and
``pruned_test_*`` of the pruned model with stage 2's BatchNorm statistics), trainable
parameter count, MACs per example
(:func:`train.flops.count_flops`: exact for the traced forward pass; "FLOPs" in the paper's
tables) and the rank of every SVD layer.

Length (~510 lines): one concern, the pipeline; about half of it is the documentation of its
stages and of their resumption rules.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from train import builders
from train import checkpoint
from train import distributed
from train import loop
from train import model_io
from train.batches import example_input
from train.config import TrainConfig
from train.models.registry import build_model
from train.pruning import rebuild_pruned
from train.pruning import svd_ranks

STAGE1 = "stage1_decomposed"
STAGE2 = "stage2_sparse"
STAGE3_PREFIX = "stage3_prune_"
STAGE4_PREFIX = "stage4_finetune_"
PIPELINE_FILE = "pipeline.json"
RESULT_FILE = "result.json"
RANKS_FILE = "ranks.json"


def energy_tag(energy: float) -> str:
    """The folder suffix of an energy: ``'e'`` + ``f'{energy:g}'`` (``0.01 -> 'e0.01'``)."""
    return f"e{energy:g}"


def stage_dirs(root: str | pathlib.Path, energies: Sequence[float]) -> dict[str, Any]:
    """The run folders of a pipeline: ``{'stage1': path, 'stage2': path, 'stage3': {e: path},
    'stage4': {e: path}}``."""
    root = pathlib.Path(root)
    return {
        "stage1": root / STAGE1,
        "stage2": root / STAGE2,
        "stage3": {e: root / (STAGE3_PREFIX + energy_tag(e)) for e in energies},
        "stage4": {e: root / (STAGE4_PREFIX + energy_tag(e)) for e in energies},
    }


def stage_configs(
    config: TrainConfig, sparsity_weight: float, stage_steps: tuple[int, int, int]
) -> dict[str, TrainConfig]:
    """The :class:`TrainConfig` of every stage: ``'stage1'`` (``λ_s = 0``), ``'stage2'``
    (``λ_s = sparsity_weight``) and ``'stage4'`` (``λ_s = 0``; also the config saved with the
    stage-3 pruned models), with ``num_steps`` from ``stage_steps``."""
    n1, n2, n4 = stage_steps
    return {
        "stage1": dataclasses.replace(config, sparsity_weight=0.0, num_steps=n1),
        "stage2": dataclasses.replace(config, sparsity_weight=float(sparsity_weight), num_steps=n2),
        "stage4": dataclasses.replace(config, sparsity_weight=0.0, num_steps=n4),
    }


# ------------------------------------------------------------------------------ model summaries
def model_summary(model: nnx.Module, example_input: Any) -> dict[str, Any]:
    """``{'params', 'flops', 'ranks'}``: trainable scalars, MACs per example (exact, traced:
    :func:`train.flops.count_flops`) and :func:`svd_ranks`."""
    from train import flops

    return {
        "params": int(flops.count_params(model)),
        "flops": int(flops.count_flops(model, example_input)),
        "ranks": svd_ranks(model),
    }


def _write_json(path: pathlib.Path, data: Any) -> None:
    """Writes ``data`` as JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _read_result(run_dir: pathlib.Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    result["run_dir"] = str(run_dir)  # Where it is now (the root may have been moved).
    result["trained"] = False
    return result


# ------------------------------------------------------------------------------ the manifest
def _recalibration_record(recalibration_batches: int | None) -> int | str:
    """How ``pipeline.json`` records the stage-3 recalibration (``'one epoch'`` for ``None``)."""
    return "one epoch" if recalibration_batches is None else int(recalibration_batches)


def _pipeline_record(
    config: TrainConfig,
    sparsity_weight: float,
    stage_steps: tuple[int, int, int],
    recalibration_batches: int | None = None,
) -> dict[str, Any]:
    fields = {
        k: v for k, v in config.to_flat_dict().items() if k not in checkpoint.RESUMABLE_CHANGES
    }
    return {
        "config": fields,
        "sparsity_weight": float(sparsity_weight),
        "stage_steps": list(stage_steps),
        "recalibration_batches": _recalibration_record(recalibration_batches),
    }


def _check_or_write_record(
    root: pathlib.Path, record: dict[str, Any], config: TrainConfig
) -> None:
    path = root / PIPELINE_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = []
        for key in ("sparsity_weight", "stage_steps", "recalibration_batches"):
            if saved.get(key) != record[key]:
                diffs.append(f"{key}: saved {saved.get(key)!r}, given {record[key]!r}")
        saved_config = TrainConfig.from_json(
            json.dumps({**config.to_flat_dict(), **saved.get("config", {})})
        )
        diffs += checkpoint.config_differences(saved_config, config, prefix="config.")
        if diffs:
            raise ValueError(
                f"root={str(root)!r} holds an SVD pipeline with a different set-up (use another "
                "root; nothing is overwritten): " + "; ".join(diffs)
            )
        return
    if root.exists() and any(p.name != PIPELINE_FILE for p in root.iterdir()):
        raise ValueError(
            f"root={str(root)!r} is not empty and holds no {PIPELINE_FILE}: expected a new "
            "folder or one written by run_svd_pipeline"
        )
    root.mkdir(parents=True, exist_ok=True)
    _write_json(path, record)


# --------------------------------------------------------------------------------- one stage
def _clear_unstarted(run_dir: pathlib.Path, config: TrainConfig) -> None:
    """Removes a stage folder that holds no checkpoint (a stage interrupted before its first
    checkpoint: nothing to resume) after checking that it was written for ``config``."""
    if not run_dir.exists():
        return
    config_file = run_dir / checkpoint.CONFIG_FILE
    if config_file.exists():
        checkpoint.check_resume_config(run_dir, config)  # ValueError on a different config.
    elif any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} holds files but no {checkpoint.CONFIG_FILE}: not a stage folder"
        )
    shutil.rmtree(run_dir)


def _train_stage(
    config: TrainConfig,
    run_dir: pathlib.Path,
    *,
    template: Callable[[], nnx.Module],
    initial: Callable[[], nnx.Module],
    train_data: Any,
    test_data: Any,
    example: np.ndarray,
) -> tuple[dict[str, Any], nnx.Module | None]:
    """Runs (or resumes, or reads back) one training stage; returns ``(summary, model)``.

    ``template()`` gives a model of the stage's architecture (values replaced on resumption);
    ``initial()`` the model the stage starts from. ``model`` is ``None`` when the stage was
    already finished (nothing restored).
    """
    done = _read_result(run_dir)
    if done is not None:
        checkpoint.check_resume_config(run_dir, config)
        return done, None
    if checkpoint.has_checkpoint(run_dir):
        result = loop.train_and_evaluate(
            config, run_dir, resume=True, model=template(),
            train_data=train_data, test_data=test_data,
        )
    else:
        _clear_unstarted(run_dir, config)
        result = loop.train_and_evaluate(
            config, run_dir, model=initial(), train_data=train_data, test_data=test_data
        )
    model = result["model"]
    summary = {
        "run_dir": str(run_dir),
        "step": int(result["step"]),
        "test_error": float(result["test_error"]),
        "test_accuracy": float(result["test_accuracy"]),
        "test_loss": float(result["test_loss"]),
        **model_summary(model, example),
    }
    _write_json(run_dir / RESULT_FILE, summary)
    summary["trained"] = True
    return summary, model


def _restore(run_dir: pathlib.Path, model: nnx.Module, example: np.ndarray) -> nnx.Module:
    """``model`` with the values of ``run_dir``'s latest checkpoint (training mode)."""
    restored, _, _ = model_io.restore_model(run_dir, model=model, example_input=example)
    restored.train()
    return restored


# ------------------------------------------------------------------------------ the pipeline
def _check_arguments(
    config: TrainConfig,
    sparsity_weight: float,
    energies: Sequence[float],
    stage_steps: tuple[int, int, int] | None,
    recalibration_batches: int | None = None,
) -> tuple[tuple[float, ...], tuple[int, int, int]]:
    if config.svd.decomposition is None:
        raise ValueError(
            "config.decomposition=None: the SVD pipeline needs a decomposed model "
            "('channel' or 'spatial')"
        )
    if not (isinstance(sparsity_weight, (int, float)) and sparsity_weight > 0):
        raise ValueError(f"sparsity_weight={sparsity_weight!r} must be a number > 0")
    energies = tuple(float(e) for e in energies)
    if not energies or not all(0 <= e < 1 for e in energies):
        raise ValueError(f"energies={energies!r} must be a non-empty sequence of values in [0, 1)")
    if len({energy_tag(e) for e in energies}) != len(energies):
        raise ValueError(f"energies={energies!r} must be distinct")
    if stage_steps is None:
        stage_steps = (config.num_steps,) * 3
    stage_steps = tuple(stage_steps)
    if len(stage_steps) != 3 or not all(isinstance(n, int) and n >= 1 for n in stage_steps):
        raise ValueError(
            f"stage_steps={stage_steps!r} must be three positive ints (stages 1, 2 and 4)"
        )
    if recalibration_batches is not None and not (
        isinstance(recalibration_batches, int)
        and not isinstance(recalibration_batches, bool)
        and recalibration_batches >= 0
    ):
        raise ValueError(
            f"recalibration_batches={recalibration_batches!r} must be None (one epoch) or an "
            "int >= 0 (0: no recalibration)"
        )
    return energies, stage_steps


def run_svd_pipeline(
    config: TrainConfig,
    root: str | pathlib.Path,
    *,
    sparsity_weight: float,
    energies: Sequence[float],
    stage_steps: tuple[int, int, int] | None = None,
    model: nnx.Module | None = None,
    train_data: Any = None,
    test_data: Any = None,
    recalibration_batches: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the four stages of SVD training (Yang et al. 2020) under ``root``.

    See the module docstring for the stages, the folders and the resumption rules.

    Args:
      config: the training configuration of every stage; ``config.svd.decomposition`` must be
        set (``'channel'`` or ``'spatial'``); ``config.svd.orth_weight`` (λ_o) is used in every
        training stage, ``config.svd.sparsity`` is the sparsity term of stage 2 and
        ``config.svd.sparsity_weight`` is ignored (stages 1 and 4 use 0, stage 2
        ``sparsity_weight``).
      root: the pipeline folder (new, or one written by this function with the same set-up).
      sparsity_weight: λ_s of stage 2 (> 0).
      energies: the pruning energies ``e`` of stage 3, each in ``[0, 1)`` (the removed energy
        of every layer is at most the fraction ``e`` of its ``Σ s_j²``).
      stage_steps: optimiser steps of stages 1, 2 and 4 (default: ``config.num_steps`` each).
      model: the decomposed model to train in stage 1 (instead of
        ``train.models.registry.build_model(config, ...)``); trained in place.
      train_data: a :class:`train.batches.BatchSource` (default: :func:`train.builders.build_data`).
      test_data: the test :class:`train.batches.BatchSource` (default: ``build_data``'s).
      recalibration_batches: training batches (``train_data``, from epoch 0 in its order)
        over which stage 3 re-estimates every BatchNorm's running mean and variance of a
        pruned model (:func:`train.batchnorm.recalibrate_batch_stats`: the exact average of
        the batch statistics, training-mode forward passes); ``None`` (default): one epoch;
        ``0``: no recalibration (the saved model keeps stage 2's statistics). Part of the
        set-up recorded in ``root``. A model without BatchNorm is unaffected.

    Returns:
      ``{'root', 'stage1', 'stage2', 'stage3': {e: ...}, 'stage4': {e: ...}}``; each stage's
      dict holds ``run_dir``, ``test_error``, ``test_accuracy``, ``test_loss``, ``params``
      (trainable scalars), ``flops`` (MACs per example, exact for the traced forward pass),
      ``ranks`` (``{SVD layer path: rank}``), ``trained`` (``False`` when read back from a
      finished stage), ``step`` (training stages) and, for stage 3, ``energy``,
      ``pruned_test_error``, ``pruned_test_accuracy``, ``pruned_test_loss`` (the pruned model
      with stage 2's BatchNorm statistics, before recalibration) and ``recalibrated``
      (``True`` when the statistics were re-estimated). Stage 3's ``test_*`` are those of the
      saved model, i.e. after recalibration (equal to ``pruned_test_*`` when
      ``recalibration_batches=0``).

    Raises:
      ValueError: naming the argument: ``config.svd.decomposition`` unset, ``sparsity_weight``
        not > 0, ``energies`` empty / outside ``[0, 1)``, ``stage_steps`` not three positive
        ints, ``recalibration_batches`` not ``None`` or an int ``>= 0``, or ``root`` holding a
        pipeline with a different set-up (or foreign files).
    """
    from train import batchnorm
    from train import pruning

    energies, stage_steps = _check_arguments(
        config, sparsity_weight, energies, stage_steps, recalibration_batches
    )
    root = pathlib.Path(root)
    _check_or_write_record(
        root, _pipeline_record(config, sparsity_weight, stage_steps, recalibration_batches),
        config,
    )
    configs = stage_configs(config, sparsity_weight, stage_steps)
    dirs = stage_dirs(root, energies)

    num_classes = None
    if train_data is None or test_data is None:
        built_train, built_test, info = builders.build_data(config)
        train_data = built_train if train_data is None else train_data
        test_data = built_test if test_data is None else test_data
        num_classes = info.num_classes
    example = example_input(train_data)
    # Models are built only when a stage needs one (a finished pipeline builds none).
    built: dict[str, nnx.Module] = {}

    def initial_model() -> nnx.Module:
        if "initial" not in built:
            nonlocal num_classes
            if model is not None:
                built["initial"] = model
            else:
                if num_classes is None:
                    num_classes = builders.num_classes(config)
                built["initial"] = build_model(
                    config, num_classes, example.shape[-1], example.shape[1:3]
                )
            # The architecture, kept before stage 1 trains the initial model in place.
            built["pristine"] = nnx.clone(built["initial"])
        return built["initial"]

    def fresh() -> nnx.Module:
        initial_model()
        return nnx.clone(built["pristine"])

    data = dict(train_data=train_data, test_data=test_data, example=example)
    out: dict[str, Any] = {"root": str(root)}
    out["stage1"], model1 = _train_stage(
        configs["stage1"], dirs["stage1"], template=fresh, initial=initial_model, **data
    )

    def after_stage1() -> nnx.Module:
        return model1 if model1 is not None else _restore(dirs["stage1"], fresh(), example)

    out["stage2"], model2 = _train_stage(
        configs["stage2"], dirs["stage2"], template=fresh, initial=after_stage1, **data
    )

    out["stage3"], out["stage4"] = {}, {}
    for e in energies:
        dir3, dir4 = dirs["stage3"][e], dirs["stage4"][e]
        summary3 = _read_result(dir3)
        compact = None
        if summary3 is None:
            if model2 is None:
                model2 = _restore(dirs["stage2"], fresh(), example)
            _clear_unstarted(dir3, configs["stage4"])
            compact, ranks = pruning.prune_by_energy(model2, e)
            pruned_test = model_io.evaluate_model(compact, configs["stage4"], test_data, example)
            recalibrate = recalibration_batches != 0 and bool(
                batchnorm.batch_norm_layers(compact)
            )
            test = pruned_test
            if recalibrate:
                compact = batchnorm.recalibrate_batch_stats(
                    compact, train_data, recalibration_batches,
                    mesh=distributed.make_mesh(config.distributed.num_devices),
                )
                test = model_io.evaluate_model(compact, configs["stage4"], test_data, example)
            model_io.save_model(dir3, compact, configs["stage4"], example)
            _write_json(dir3 / RANKS_FILE, {str(k): int(v) for k, v in ranks.items()})
            summary3 = {
                "run_dir": str(dir3),
                "energy": e,
                "test_error": test["error"],
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "pruned_test_error": pruned_test["error"],
                "pruned_test_accuracy": pruned_test["accuracy"],
                "pruned_test_loss": pruned_test["loss"],
                "recalibrated": recalibrate,
                **model_summary(compact, example),
            }
            _write_json(dir3 / RESULT_FILE, summary3)
            summary3["trained"] = True
        out["stage3"][e] = summary3

        def compact_template(dir3=dir3) -> nnx.Module:
            return rebuild_pruned(fresh(), json.loads((dir3 / RANKS_FILE).read_text()))

        def pruned(dir3=dir3, compact=compact) -> nnx.Module:
            if compact is not None:
                return compact
            return _restore(dir3, compact_template(), example)

        out["stage4"][e], _ = _train_stage(
            configs["stage4"], dir4, template=compact_template, initial=pruned, **data
        )
    return out


__all__ = [
    "energy_tag",
    "model_summary",
    # Re-exported: their home is train.pruning.
    "rebuild_pruned",
    "run_svd_pipeline",
    "stage_configs",
    "stage_dirs",
    "svd_ranks",
]
