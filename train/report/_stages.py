"""A report that does not lose work: stage errors recorded, finished stages checkpointed.

A report runs in stages: ``layers`` (the per-layer analysis), ``composition`` (the certified
bound), ``lower_bound`` (the search) and, when written, ``plots``. An exception in one stage is
caught and recorded (:func:`error_record`) in ``network['errors']``; the other stages' numbers
are still reported. With a checkpoint folder (:class:`Checkpoint`; ``python -m train.report``
uses its ``--out``), the layer stage's results are written there as soon as it finishes (before
the report waits for the lower bound), and a later run of the same network, input and options
reuses every finished stage instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

#: The lower bound search's time budget ``'layers'`` is at least this (seconds) from the report's
#: start: a network whose layers take less still gets its power iteration compiled and run.
#: Measured (ResNet-20 @32², 2-core CPU, ``benchmarks/bench_report.py``): with 3 s the ascent
#: still ran no step (its compilation took the rest of the budget) and each report took 1-2 s
#: longer (SAME 3.3-3.7 s, CIRCULAR 4.7-5.0 s); with 1 s, 2.2 s and 2.4 s, the same lower bounds
#: (the power iteration's 3.19 and 3.83).
MIN_SEARCH_SECONDS = 1.0
#: Longest wait of one ``stop()`` call of a search that computes in a share of the wall-clock
#: time (:func:`budget_stop`): an interval that held a compilation (seconds on a big network,
#: single-threaded) would otherwise make the search wait for most of the layer stage.
MAX_SHARE_WAIT_SECONDS = 3.0

#: The checkpoint folder's sub-folder (under the checkpoint / output folder).
STAGES_DIR = "stages"


def error_record(stage: str, error: BaseException) -> dict[str, str]:
    """``{'stage', 'type', 'message', 'where'}`` of an exception caught in a report stage."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return {
        "stage": stage,
        "type": type(error).__name__,
        "message": str(error)[:2000],
        "where": where,
    }


def fingerprint(*parts: Any) -> str:
    """A SHA-256 of ``parts`` (arrays by dtype, shape and bytes; the rest by ``repr``)."""
    h = hashlib.sha256()

    def add(p):
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, (list, tuple)):
            h.update(b"(")
            for q in p:
                add(q)
            h.update(b")")
        else:
            h.update(repr(p).encode())

    for p in parts:
        add(p)
    return h.hexdigest()


class Checkpoint:
    """Per-stage results of a report in ``directory/stages/``, keyed by a fingerprint.

    ``save(stage, value)`` pickles ``value`` to ``<stage>.pkl`` (written to a temporary name,
    then renamed: a crash never leaves half a file) with the fingerprint beside it;
    ``load(stage)`` returns it only when the fingerprint matches, else ``None``. Optional
    ``rows`` are also written as readable JSON (``<stage>.partial.json``). The pickles are the
    report's own records: load only checkpoint folders you wrote.
    """

    def __init__(self, directory, key: str):
        self.directory = pathlib.Path(directory) / STAGES_DIR
        self.key = key

    def _path(self, stage: str, suffix: str) -> pathlib.Path:
        return self.directory / f"{stage}{suffix}"

    def load(self, stage: str) -> Any:
        path = self._path(stage, ".pkl")
        if not path.exists():
            return None
        try:
            with path.open("rb") as f:
                saved = pickle.load(f)
        except Exception:  # A file from another version: recompute.
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        return saved["value"]

    def save(self, stage: str, value: Any, rows: Any = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(stage, ".pkl")
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as f:
            pickle.dump({"key": self.key, "value": value}, f)
        tmp.replace(path)
        if rows is not None:
            text = json.dumps({"key": self.key, "rows": rows}, indent=1, allow_nan=False)
            self._path(stage, ".partial.json").write_text(text)


def check_budget(budget: Any) -> None:
    """Raises a ``ValueError`` naming ``lower_bound_budget`` unless it is ``'layers'``, seconds
    ``>= 0`` or ``None``."""
    if not (
        budget is None
        or budget == "layers"
        or (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget >= 0)
    ):
        raise ValueError(f"lower_bound_budget={budget!r} must be 'layers', seconds >= 0 or None")


def check_share(share: Any) -> None:
    """Raises a ``ValueError`` naming ``lower_bound_share`` unless it is a number in ``(0, 1]``."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"lower_bound_share={share!r} must be a number in (0, 1]")


def budget_stop(
    budget: float | str | None,
    layers_done: threading.Event,
    layer_seconds: Callable[[], Any],
    share: float = 1.0,
) -> Callable[[], bool]:
    """The lower bound's ``stop()`` for a time budget (asked between the search's steps).

    Args:
      budget: ``'layers'``: stop once the layer stage is done (when the two overlap: the
        ``layers_done`` event), or after as long as it took (``layer_seconds()``, when the
        lower bound runs after it), but not before :data:`MIN_SEARCH_SECONDS`; a number: after
        that many seconds; ``None``: never.
      layers_done: set when the layer stage ends.
      layer_seconds: the layer stage's duration, ``None`` while it runs.
      share: while the layer stage runs (``layers_done`` not set), ``stop()`` first waits
        ``(1 - share) / share`` times the time since the previous ``stop()`` returned (the
        step just computed; at most :data:`MAX_SHARE_WAIT_SECONDS`), waking early when the layer
        stage ends: the search then computes in about ``share`` of the wall-clock time. ``1``:
        never waits.

    Raises:
      ValueError: any other ``budget``, or ``share`` outside ``(0, 1]``.
    """
    check_budget(budget)
    check_share(share)
    start = time.perf_counter()
    if budget is None:
        done = lambda: False  # noqa: E731
    elif budget == "layers":

        def done():
            elapsed = time.perf_counter() - start
            if not layers_done.is_set() or elapsed < MIN_SEARCH_SECONDS:
                return False
            seconds = layer_seconds()
            if seconds is None:  # Overlapping: the layers are done now.
                return True
            return elapsed >= seconds

    else:
        done = lambda: time.perf_counter() - start >= float(budget)  # noqa: E731
    if share >= 1:
        return done
    last = [time.perf_counter()]

    def stop():
        if not layers_done.is_set():
            wait = (time.perf_counter() - last[0]) * (1 - share) / share
            layers_done.wait(min(wait, MAX_SHARE_WAIT_SECONDS))
        result = done()
        last[0] = time.perf_counter()
        return result

    return stop
