"""``python -m experiments [--preset quick|paper] [--out results]``: every experiment, one report.

Runs, in the order of :data:`EXPERIMENTS`, ``experiments.<name>.run(preset, out_dir)`` (each
writes ``out_dir/<name>.md`` and ``out_dir/<name>.png`` and returns its Markdown section), then
writes ``out_dir/REPORT.md``: a title, the date, the JAX version and backend, the total time and
every section. Every module is imported before anything runs: a missing or broken experiment
module is an error, never silently skipped.

Process set-up, done here once for every experiment (the experiment modules have no import-time
side effects to rely on):

* :func:`main` applies the XLA:CPU LAPACK-deadlock work-around before the first JAX computation
  (``avoid_cpu_lapack_deadlock``; it only works before the CPU backend starts) and switches
  NumPy's transparent-huge-page advice off (``set_numpy_huge_pages``: on the 2-core VMs it
  made first-touched memory ~15x slower; the arithmetic is unchanged);
* :func:`run_all` calls :func:`spectra.clear_caches` after every experiment: the compiled
  programs of one experiment are never reused by the next, and keeping them all alive made a
  ``--preset paper`` run pass the kernel's ``vm.max_map_count`` and segfault inside XLA.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import platform
import sys
import time
from types import ModuleType

import spectra
from experiments import _report

#: Experiment modules under ``experiments/``, in the order they run and appear in the report.
EXPERIMENTS = [
    "sedghi_timing",
    "yi_approximation",
    "bounds_tightness",
    "sedghi_training",
    "yi_training",
    "layer_spectra",
    "svd_training",
    "tt_compression",
    "network_report",
    "certified_robustness",
]

REPORT_NAME = "REPORT.md"


def load_experiments(names: list[str]) -> list[ModuleType]:
    """Imports ``experiments.<name>`` for every name; raises if one is missing or has no run()."""
    modules = []
    for name in names:
        try:
            module = importlib.import_module(f"experiments.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"experiments.{name}":
                raise  # The module exists but one of its own imports is missing.
            raise ModuleNotFoundError(
                f"experiment {name!r} listed in experiments.__main__.EXPERIMENTS has no module "
                f"experiments/{name}.py"
            ) from e
        if not callable(getattr(module, "run", None)):
            raise AttributeError(
                f"experiment module experiments.{name} must define run(preset, out_dir) -> str")
        modules.append(module)
    return modules


def _environment() -> str:
    import jax
    import numpy as np

    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"JAX {jax.__version__}, backend `{jax.default_backend()}` ({devices}); NumPy "
        f"{np.__version__}; Python {platform.python_version()}; {platform.platform()}"
    )


def run_all(preset: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Runs every experiment of :data:`EXPERIMENTS` and writes ``out_dir/REPORT.md``.

    Returns:
      The path of the report.
    """
    import matplotlib

    matplotlib.use("Agg")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = load_experiments(list(EXPERIMENTS))
    started = datetime.datetime.now()
    start = time.perf_counter()
    sections, durations = [], []
    for name, module in zip(EXPERIMENTS, modules):
        print(f"[experiments] {name} ({preset}) ...", flush=True)
        t0 = time.perf_counter()
        sections.append(module.run(preset, out_dir).strip())
        durations.append(time.perf_counter() - t0)
        spectra.clear_caches()  # Frees this experiment's compiled programs (see module doc).
        print(f"[experiments] {name} done in {durations[-1]:.1f} s", flush=True)
    total = time.perf_counter() - start
    contents = "\n".join(
        f"- `{name}`: {seconds:.1f} s" for name, seconds in zip(EXPERIMENTS, durations))
    report = (
        "# convspectra: experiment report\n\n"
        f"- Date: {started.isoformat(timespec='seconds')}\n"
        f"- Preset: `{preset}`\n"
        f"- Environment: {_environment()}\n"
        f"- Command: `python -m experiments --preset {preset} --out {out_dir}`\n"
        f"- Total time: {total:.1f} s\n\n"
        f"## Contents\n\n{contents}\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    path = out_dir / REPORT_NAME
    path.write_text(report)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments", description="Runs every experiment and writes REPORT.md.")
    parser.add_argument("--preset", default="quick",
                        help=f"one of {_report.PRESETS} (default: quick)")
    parser.add_argument("--out", type=pathlib.Path, default=_report.DEFAULT_OUT,
                        help="output folder (default: results)")
    args = parser.parse_args(argv)
    from train.lapack_workaround import avoid_cpu_lapack_deadlock
    from train.lapack_workaround import set_numpy_huge_pages

    avoid_cpu_lapack_deadlock()  # Before any JAX computation (XLA:CPU LAPACK deadlock).
    set_numpy_huge_pages(False)
    path = run_all(args.preset, args.out)
    print(f"[experiments] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
