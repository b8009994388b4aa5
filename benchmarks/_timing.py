"""Shared helpers of the benchmark scripts: thread limits, interleaved timing, table printing.

Imports nothing heavy: :func:`limit_threads` must run before NumPy/JAX are imported.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def limit_threads(threads: int) -> None:
    """Limits BLAS/LAPACK and XLA's CPU thread pools; must run before NumPy/JAX are imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def time_all(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median wall time of each callable; repeats are interleaved so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_time(seconds: float | None) -> str:
    """``'12.3 ms'`` / ``'1.2 s'``; ``'n/a'`` for ``None``."""
    if seconds is None:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows])
