"""Run folders and their orbax checkpoints: layout, save / restore, the resume check.

A run folder holds ``config.json`` (:data:`CONFIG_FILE`), ``metrics.csv`` and ``tensorboard/``
(:mod:`train.metrics`) and ``checkpoints/`` (:data:`CHECKPOINT_DIR`: an orbax
``CheckpointManager`` whose every step holds the train state and a JSON ``meta`` with the step
and the data position ``(epoch, batch)``, and optionally the item :data:`CERTIFIED_ITEM`: the
certified model (parameters and BatchNorm statistics) when its parameters differ from the
state's training parameters, see
:func:`train.loop.train_and_evaluate`). Typed PRNG keys are stored as their ``uint32`` data
and re-wrapped on restore (:func:`to_storable`, :func:`from_storable`).
"""

import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from train.config import TrainConfig
from train.config import apply_overrides

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
#: The checkpoint item holding the certified model ``{'params', 'rest'}`` saved beside the
#: train state.
CERTIFIED_ITEM = "certified_params"

#: Config fields that may differ between a run and its resumption without changing what it
#: trains: bookkeeping, the cadence of logs, σ_max, evaluations and checkpoints (they only read
#: the state), and the device set-up (a run written on N devices resumes on M; data-parallel
#: runs differ only in the order of floating-point additions, see :mod:`train.distributed`).
RESUMABLE_CHANGES = frozenset({
    "progress", "log_every", "sigma_every", "eval_every", "checkpoint_every", "max_to_keep",
    "data_dir", "num_devices", "fsdp", "multi_host", "coordinator_address", "num_processes",
    "process_id",
})
#: Config fields that may also change on resume, and change the run: ``num_steps`` (extend a
#: run, or shorten one not yet past the new end). The learning-rate schedule is a function of
#: the step and ``num_steps`` (:func:`train.optim.learning_rate_schedule`), rebuilt from the
#: new value: the steps after the checkpoint follow the schedule of a ``num_steps`` run (a
#: cosine is stretched to end at the new ``num_steps``; a run that had finished a cosine at
#: learning rate 0 restarts at the stretched cosine's value at its step), so the continued run
#: differs from a fresh run of the new length unless the schedule does not depend on
#: ``num_steps`` (``'constant'``, warm-up included: then it is bit-identical).
SCHEDULE_CHANGES = frozenset({"num_steps"})


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


def has_checkpoint(run_dir: str | pathlib.Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds at least one step."""
    ckpt = pathlib.Path(run_dir) / CHECKPOINT_DIR
    return ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())


def config_differences(
    saved: TrainConfig,
    given: TrainConfig,
    prefix: str = "",
    allowed: frozenset[str] = RESUMABLE_CHANGES,
) -> list[str]:
    """``'<prefix><field>: saved <value>, given <value>'`` for every field (by its flat name,
    :data:`train.config.FLAT_NAMES`) that differs between ``saved`` and ``given``, except the
    ``allowed`` ones (flat names; default :data:`RESUMABLE_CHANGES`; the one resume check of
    runs and of :mod:`train.svd_pipeline`)."""
    old, new = saved.flat(), given.flat()
    return [
        f"{prefix}{name}: saved {old[name]!r}, given {new[name]!r}"
        for name in old
        if name not in allowed and old[name] != new[name]
    ]


def check_resume_config(run_dir: str | pathlib.Path, config: TrainConfig) -> None:
    """Checks that ``config`` may continue the run in ``run_dir``.

    Raises:
      ValueError: naming every field whose value differs from the one in
        ``run_dir/config.json`` (with both values), except :data:`RESUMABLE_CHANGES` and
        :data:`SCHEDULE_CHANGES`.
    """
    run_dir = pathlib.Path(run_dir)
    allowed = RESUMABLE_CHANGES | SCHEDULE_CHANGES
    diffs = config_differences(TrainConfig.load(run_dir / CONFIG_FILE), config, allowed=allowed)
    if diffs:
        raise ValueError(
            f"config differs from the one of the run in {run_dir} (only {sorted(allowed)} may "
            f"change on resume): " + "; ".join(diffs)
        )


def resume_config(run_dir: str | pathlib.Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config that continues the run in ``run_dir``: its ``config.json`` with ``overrides``
    (``key=value``, as :func:`train.config.apply_overrides`) applied on top.

    What ``python -m train --run-dir DIR --resume [key=value ...]`` trains. Only
    :data:`RESUMABLE_CHANGES` and :data:`SCHEDULE_CHANGES` (``num_steps``: the learning-rate
    schedule is rebuilt for the new value, see there) may change; an override that repeats
    the saved value is no change. Files written before a field existed load with its default.

    Args:
      run_dir: a run folder holding ``config.json``.
      overrides: ``key=value`` or ``--config.key=value`` strings.

    Returns:
      The run's config with the overrides.

    Raises:
      FileNotFoundError: when ``run_dir`` holds no ``config.json``.
      ValueError: naming every field that may not change and both its values, or a bad
        override.
    """
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} holds no {CONFIG_FILE}: not a run")
    config = apply_overrides(TrainConfig.load(path), overrides)
    check_resume_config(run_dir, config)
    return config


def to_storable(tree: Any) -> Any:
    """``tree`` with typed PRNG keys replaced by their ``uint32`` data (what orbax writes)."""

    def convert(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x

    return jax.tree.map(convert, tree)


def from_storable(restored: Any, template: Any) -> Any:
    """Inverse of :func:`to_storable`: key data re-wrapped where ``template`` holds keys."""

    def convert(x, t):
        if isinstance(t, jax.Array) and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
        return x

    return jax.tree.map(convert, restored, template)


def checkpoint_manager(run_dir: str | pathlib.Path, config: TrainConfig):
    """The ``orbax.checkpoint.CheckpointManager`` of ``run_dir/checkpoints`` (created if
    missing; keeps ``config.checkpoint.max_to_keep`` steps). Close it after use."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.max_to_keep, create=True)
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        CERTIFIED_ITEM: ocp.StandardCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        (pathlib.Path(run_dir) / CHECKPOINT_DIR).absolute(), options=options,
        item_handlers=handlers,
    )


def save_checkpoint(
    manager, state: Any, meta: dict[str, Any], certified: Any = None
) -> None:
    """Saves ``state`` and the JSON ``meta`` at step ``meta['step']`` (asynchronously; nothing
    when that step is already saved), and ``certified`` (the certified model's
    ``{'params', 'rest'}``) as the item :data:`CERTIFIED_ITEM` when given."""
    import orbax.checkpoint as ocp

    step = int(meta["step"])
    if step in manager.all_steps():
        return
    items = {"state": ocp.args.StandardSave(to_storable(state)), "meta": ocp.args.JsonSave(meta)}
    if certified is not None:
        items[CERTIFIED_ITEM] = ocp.args.StandardSave(to_storable(certified))
    manager.save(step, args=ocp.args.Composite(**items))


def restore_checkpoint(manager, template: Any, step: int | None = None) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step`` (default: the latest), with the structure,
    dtypes and shardings of ``template`` (arrays or ``jax.ShapeDtypeStruct``)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_storable(template))
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return from_storable(out["state"], template), out["meta"]


def restore_certified(
    manager, params: Any, rest: Any, step: int, meta: dict[str, Any]
) -> tuple[Any, Any]:
    """``(params, rest)`` of the certified model saved as the item :data:`CERTIFIED_ITEM` of
    checkpoint ``step`` (whose JSON ``meta`` is given), with the structure, dtypes and
    shardings of ``params`` and ``rest``. Checkpoints of versions that saved only the certified
    parameters (no ``"certified_batch_stats_recalibrated"`` in ``meta``) give ``rest`` back as
    it is (the training statistics).

    Raises:
      ValueError: when that checkpoint has no such item.
    """
    import orbax.checkpoint as ocp

    if manager.item_metadata(step).get(CERTIFIED_ITEM) is None:
        raise ValueError(f"checkpoint step={step} holds no {CERTIFIED_ITEM!r} item")
    both = "certified_batch_stats_recalibrated" in meta
    template = {"params": params, "rest": rest} if both else params
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_storable(template))
    out = manager.restore(
        step, args=ocp.args.Composite(**{CERTIFIED_ITEM: ocp.args.StandardRestore(abstract)})
    )
    restored = from_storable(out[CERTIFIED_ITEM], template)
    return (restored["params"], restored["rest"]) if both else (restored, rest)
