"""Metrics of a run: ``metrics.csv`` (one row per logged step) and TensorBoard scalars.

TensorBoard files are written with ``tensorboardX`` (no TensorFlow needed) to
``run_dir/tensorboard``.
"""

import csv
import pathlib
from typing import Any

import jax
import numpy as np

from train.steps import SVD_SUM_KEYS

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends one CSV row per logged step and the same scalars to TensorBoard.

    Args:
      path: the CSV file (``run_dir/metrics.csv``); TensorBoard goes to its sibling
        :data:`TENSORBOARD_DIR`.
      columns: the CSV header.
      resume_step: when resuming, the checkpoint's step: rows after it are dropped (they are
        recomputed); ``None`` starts a new file.
    """

    def __init__(self, path: pathlib.Path, columns: list[str], resume_step: int | None):
        self.path = path
        self.columns = columns
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._rewrite(rows)
        else:
            self._rewrite([])
        import tensorboardX

        self.tb = tensorboardX.SummaryWriter(str(path.parent / TENSORBOARD_DIR))

    def _rewrite(self, rows):
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        """Appends ``row`` (``{'step': int, column: float}``; missing columns stay empty)."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(
                {k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                 for k, v in row.items()}
            )
        for k, v in row.items():
            if k != "step" and isinstance(v, (float, int, np.floating)):
                self.tb.add_scalar(k, float(v), int(row["step"]))
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_history(run_dir: str | pathlib.Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.csv`` as dicts of floats (empty cells left out)."""
    with (pathlib.Path(run_dir) / METRICS_FILE).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class PendingRows:
    """Metric rows waiting for the next host synchronisation of the loop.

    ``at(step)`` is the row of ``step`` (``{column: value}``; values may be device arrays, read
    by :meth:`flush`; the key ``'_sigmas'`` holds the per-layer σ_max array of the columns
    ``sigma_cols``); :meth:`flush` reads them and writes them with ``writer`` (``None``: read
    only, e.g. on processes other than 0).
    """

    def __init__(self, writer: MetricsWriter | None, steps_per_epoch: int, sigma_cols):
        self.writer, self.steps_per_epoch, self.sigma_cols = writer, steps_per_epoch, sigma_cols
        self.pending: dict[int, dict[str, Any]] = {}

    def at(self, step: int) -> dict[str, Any]:
        return self.pending.setdefault(step, {"step": step, "epoch": step / self.steps_per_epoch})

    def flush(self) -> None:
        for s in sorted(self.pending):
            values = jax.device_get(self.pending[s])
            sigmas = values.pop("_sigmas", None)
            row = {k: (v if k == "step" else float(v)) for k, v in values.items()}
            if sigmas is not None:
                row.update(zip(self.sigma_cols, (float(v) for v in sigmas)))
            if self.writer is not None:
                self.writer.write(row)
        self.pending.clear()


def columns(svd_terms: bool, layers) -> tuple[list[str], list[str], list[str]]:
    """``(all columns, SVD-term columns, σ_max columns)`` of ``metrics.csv`` for the conv
    ``layers`` (``(name, spec)``, see :func:`train.conv_norms.conv_layers`)."""
    sigma_cols = [f"sigma/{name}" for name, _ in layers]
    svd_cols = list(SVD_SUM_KEYS) if svd_terms else []
    all_cols = ["step", "epoch", "lr", "loss", "penalty", *svd_cols, "accuracy", "step_time_s",
                "test_loss", "test_accuracy", *sigma_cols]
    return all_cols, svd_cols, sigma_cols


def log_sums(sums: dict[str, Any], row: dict[str, Any], lr, step_time: float, svd_cols) -> float:
    """Adds the means of a train state's metric ``sums`` to ``row`` (one host
    synchronisation); returns the mean training loss."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    num = max(float(sums["steps"]), 1.0)
    loss = float(sums["loss"]) / count
    row.update(
        lr=lr,
        loss=loss,
        penalty=float(sums["penalty"]) / num,
        accuracy=float(sums["correct"]) / count,
        step_time_s=step_time,
        **{k: float(sums[k]) / num for k in svd_cols},
    )
    return loss


def sigma_dict(layers, sigmas) -> dict[str, float]:
    """``{layer name: σ_max}`` from the conv ``layers`` and their σ_max array."""
    return {name: float(v) for (name, _), v in zip(layers, jax.device_get(sigmas))}
