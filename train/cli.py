"""Command line of the training loop: ``python -m train``.

``python -m train --out runs [--run-dir DIR] [key=value | --config.key=value ...]`` trains
:class:`~train.config.TrainConfig` with the overrides applied (parsed and type-checked by
``ml_collections.config_flags``, see :func:`train.config.apply_overrides`), in a fresh
numbered folder under ``--out`` or in ``--run-dir`` (required with several processes), and
prints the test error and the σ_max of every conv layer. ``--run-dir DIR --resume
[key=value ...]`` continues the run in ``DIR`` with its saved ``config.json`` and the
overrides on top (:func:`train.checkpoint.resume_config`: only bookkeeping, cadence, device
and ``num_steps`` fields may change; the learning-rate schedule is rebuilt for a new
``num_steps``). Data-parallel over every device by
default; multi-host set-ups start through :func:`train.distributed.initialize`.
"""

import argparse
import pathlib
import sys

from train.lapack_workaround import avoid_cpu_lapack_deadlock


def main(argv: list[str] | None = None) -> None:
    """``python -m train [--out runs | --run-dir DIR [--resume]] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m train", description=main.__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs"),
                        help="root folder: a fresh numbered run folder is made under it")
    parser.add_argument("--run-dir", type=pathlib.Path, default=None,
                        help="an explicit run folder (must be new unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue --run-dir with its config.json, overrides on top")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    avoid_cpu_lapack_deadlock()  # Before the first JAX computation.
    import jax

    from train import distributed
    from train.checkpoint import make_run_dir
    from train.checkpoint import resume_config
    from train.config import TrainConfig
    from train.config import apply_overrides
    from train.loop import train_and_evaluate

    if args.resume:
        if args.run_dir is None:
            raise ValueError("--resume needs --run-dir: the folder of the run to continue")
        config = resume_config(args.run_dir, overrides)
    else:
        config = apply_overrides(TrainConfig(), overrides)
    distributed.initialize(config)  # Multi-host runs: before the first JAX computation.
    if args.run_dir is None and jax.process_count() > 1:
        raise ValueError(
            "--run-dir is required in a multi-process run (every process must use the same "
            "folder, on a file system that all hosts share)"
        )
    run_dir = args.run_dir if args.run_dir is not None else make_run_dir(args.out)
    result = train_and_evaluate(config, run_dir, resume=args.resume)
    if not distributed.is_main_process():
        return
    print(f"run {result['run_dir']}: step {result['step']}, test error {result['test_error']}")
    for name, value in result["sigma_max"].items():
        print(f"  σ_max {name}: {value:.4f}")
