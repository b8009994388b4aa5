"""Metrics of a run: ``metrics.csv`` (one row per logged step) and TensorBoard scalars.

TensorBoard files are written with ``tensorboardX`` (no TensorFlow needed) to
``run_dir/tensorboard``.
"""

import csv
import pathlib
from typing import Any

import numpy as np

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
