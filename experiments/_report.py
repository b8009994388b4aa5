"""Shared helpers for experiment scripts: presets, Markdown tables, figures, result files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

PRESETS = ("quick", "paper")
DEFAULT_OUT = pathlib.Path("results")


def runs_root(preset: str, out_dir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Where run folders go: a temporary folder for quick/test (removed after), else
    ``out_dir/runs``. Returns ``(root, temporary)``."""
    if preset == "paper":
        root = pathlib.Path(out_dir) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        return root, False
    return pathlib.Path(tempfile.mkdtemp(prefix="convspectra_runs_")), True


@contextlib.contextmanager
def runs_folder(preset: str, out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """The root of an experiment's run folders (:func:`runs_root`) for a ``with`` block: a
    temporary one (quick/test presets) is removed when the block exits, even on an error;
    ``out_dir/runs`` (paper preset) is kept."""
    root, temporary = runs_root(preset, out_dir)
    try:
        yield root
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def run_variants(
    preset: str,
    out_dir: pathlib.Path,
    base: Any,
    variants: Sequence[tuple[str, dict[str, Any]]],
    seeds: Sequence[int],
    run_one: Callable[[Any, pathlib.Path, int], Any],
) -> list[tuple[str, dict[str, Any], list[Any]]]:
    """The variants × seeds skeleton of the training experiments.

    Args:
      preset: the preset's name (``'paper'`` keeps the run folders, see :func:`runs_folder`).
      out_dir: the experiment's output folder.
      base: the preset's base ``TrainConfig``.
      variants: ``(label, config changes)`` pairs, run in this order.
      seeds: the seeds each variant is run with, in this order (inner loop).
      run_one: ``run_one(config, root, seed)`` with ``config = dataclasses.replace(base,
        seed=seed, **changes)`` and ``root`` the folder for run folders; returns one result.

    Returns:
      ``[(label, changes, [result per seed]), ...]`` in the order of ``variants``.
    """
    results = []
    with runs_folder(preset, out_dir) as root:
        for label, changes in variants:
            per_seed = [
                run_one(dataclasses.replace(base, seed=seed, **changes), root, seed)
                for seed in seeds
            ]
            results.append((label, changes, per_seed))
    return results


def fmt_or_dash(value: float | None) -> str:
    """``'—'`` for ``None``, else the value with 4 significant digits (table cells)."""
    return "—" if value is None else f"{value:.4g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats are written with 4 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Saves a matplotlib figure as ``out_dir/name.png`` and closes it."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_markdown(text: str, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(text)
    return path


def cli(run: Callable[[str, pathlib.Path], str], description: str) -> None:
    """Command line of one experiment script: ``--preset quick|paper --out DIR``.

    ``run(preset, out_dir)`` writes its table and plot under ``out_dir`` and returns its
    Markdown section (which is printed).
    """
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    print(run(args.preset, args.out))


def preset_config(presets: dict, preset: str):
    """``presets[preset]``, or a ``ValueError`` naming ``preset`` and the known names."""
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is unknown; expected one of {tuple(presets)}")
    return presets[preset]
