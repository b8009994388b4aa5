"""The batch protocol that the training loop, evaluation and BatchNorm recalibration read.

A *batch source* (e.g. :class:`train.data.Pipeline`) yields the batches of an epoch; a *batch*
is a dict with ``'image'`` ``(B, H, W, C)``, ``'label'`` ``(B,)`` int and optionally ``'mask'``
``(B,)`` (1 for real examples, 0 for padding), or a tuple ``(image, label[, mask])``.
"""

from collections.abc import Iterator
from typing import Any
from typing import Protocol

import numpy as np


class BatchSource(Protocol):
    """What the loop needs from a data pipeline (e.g. ``train.data.Pipeline``).

    ``batches(epoch, start_batch)`` yields the batches of one epoch from ``start_batch`` on, in an
    order fixed by the pipeline's seed and ``epoch`` (so a resumed run sees the same data).
    """

    num_batches: int

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Any]: ...


def unpack_batch(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, label, mask)`` of a batch dict or tuple; ``mask`` is all ones when absent.

    Example:
      >>> image, label, mask = unpack_batch((np.zeros((2, 4, 4, 1)), np.array([1, 2])))
      >>> mask
      array([1., 1.], dtype=float32)
    """
    if isinstance(batch, dict):
        image, label, mask = batch["image"], batch["label"], batch.get("mask")
    else:
        image, label, *more = batch
        mask = more[0] if more else None
    if mask is None:
        mask = np.ones(np.shape(label)[0], np.float32)
    return image, label, mask


def count_batches(source: Any) -> int:
    """Batches per epoch of a source: its ``num_batches`` / ``steps_per_epoch`` /
    ``batches_per_epoch`` (attribute or method), else ``len(source)``."""
    for name in ("num_batches", "steps_per_epoch", "batches_per_epoch"):
        if hasattr(source, name):
            value = getattr(source, name)
            return int(value() if callable(value) else value)
    return len(source)


def example_input(source: Any) -> np.ndarray:
    """The first image of epoch 0 of ``source`` as a float32 batch of one ``(1, H, W, C)``."""
    image, _, _ = unpack_batch(next(iter(source.batches(0))))
    return np.asarray(image[:1], np.float32)
