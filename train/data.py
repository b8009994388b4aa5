"""A NumPy input pipeline for the training experiments: :class:`Pipeline`.

:class:`Pipeline` turns arrays into batches: a shuffle that is a function of ``(seed, epoch)``,
per-channel normalisation, random crops with zero padding and horizontal flips (vectorised NumPy),
fixed-shape batches with a ``mask`` for the final partial batch, and a disjoint per-process shard
for multi-host runs. It is stateless, so ``batches(epoch, start_batch)`` resumes anywhere.

The datasets themselves (``'digits'``, ``'cifar10'``, ``'cifar100'``: :func:`load_split`,
:func:`dataset_info`, ...) live in :mod:`train.datasets`; their names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from train.datasets import DATASETS
from train.datasets import DIGITS_TEST_FRACTION
from train.datasets import DatasetInfo
from train.datasets import DatasetNotAvailableError
from train.datasets import channel_stats
from train.datasets import dataset_info
from train.datasets import digits_split_indices
from train.datasets import load_digits_split
from train.datasets import load_split
from train.datasets import load_tfds_split

__all__ = [
    "DATASETS",
    "DIGITS_TEST_FRACTION",
    "Batch",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "Pipeline",
    "channel_stats",
    "dataset_info",
    "digits_split_indices",
    "load_digits_split",
    "load_split",
    "load_tfds_split",
    "random_crop",
    "random_flip",
]


# ------------------------------------------------------------------------- transformations
def random_crop(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Pads by ``pad`` zero pixels on each side and takes a random crop of the original size.

    Vectorised: one fancy-indexing gather for the whole batch. The offset ``(dy, dx)`` of each
    example is uniform in ``{0, ..., 2 pad}^2`` (drawn as ``rng.integers(0, 2 pad + 1, (N, 2))``),
    so ``out[n, i, j] = images[n, i + dy - pad, j + dx - pad]`` where in range, else 0.

    Args:
      images: ``(N, H, W, C)``.
      pad: padding in pixels (4 for CIFAR; 1 or 2 for 8x8 digits); 0 returns ``images``.
      rng: NumPy generator.

    Returns:
      ``(N, H, W, C)`` array of ``images``' dtype.
    """
    if pad < 0:
        raise ValueError(f"pad={pad}: expected a non-negative int")
    if pad == 0:
        return images
    n, height, width, _ = images.shape
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(height)  # (N, H)
    cols = offsets[:, 1:] + np.arange(width)  # (N, W)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips each example left-right (the W axis) with probability 1/2 (``rng.random(N) < .5``).

    Args:
      images: ``(N, H, W, C)``.
      rng: NumPy generator.

    Returns:
      ``(N, H, W, C)``: a new array.
    """
    flip = rng.random(images.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


# ------------------------------------------------------------------------------- pipeline
class Batch(NamedTuple):
    """One batch; always exactly ``batch_size`` examples.

    Attributes:
      images: float32 ``(batch_size, H, W, C)``; rows where ``mask`` is False are zeros.
      labels: int32 ``(batch_size,)``; 0 where ``mask`` is False.
      mask: bool ``(batch_size,)``: True for real examples, False for padding (only in the
        final batch of an epoch when ``drop_remainder=False``).
    """

    images: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


class Pipeline:
    """Deterministic, resumable batches over in-memory arrays.

    For epoch ``e`` the example order is ``np.random.default_rng([seed, e]).permutation(N)``
    (the identity when ``shuffle=False``), the same on every process. Process ``p`` of ``P``
    takes ``order[p::P]``: the shards are disjoint and together cover the data. Every process
    yields the same number of batches, :attr:`num_batches`:

    * ``drop_remainder=False`` (evaluation): ``ceil(ceil(N / P) / batch_size)``; the last batch
      (and, when ``P`` does not divide ``N``, the last batch of the shorter shards) is padded to
      ``batch_size`` with zero images, label 0 and ``mask`` False, so a jitted step sees one
      shape and the masked sums count every example exactly once;
    * ``drop_remainder=True`` (training): ``(N // P) // batch_size`` full batches; the
      examples left over change from epoch to epoch when shuffling.

    Each batch is then, in this order: cast to float32; normalised per channel,
    ``(x - mean) / std`` (if ``normalize``); randomly cropped with ``crop_pad`` zero pixels of
    padding (:func:`random_crop`); randomly flipped left-right if ``flip`` (:func:`random_flip`).
    As in He et al. (2016) the padding comes after the normalisation, so padded pixels are 0,
    i.e. the train mean. The augmentation of batch ``b`` uses
    ``np.random.default_rng([seed, epoch, process_index, b])``, so ``batches(e, start_batch=b)``
    reproduces ``list(batches(e))[b:]`` bit for bit: resuming from a checkpoint taken at step
    ``s`` is ``batches(*position(s))``. Flips are off by default (right for digits, whose
    mirror images are other symbols; turn on for CIFAR).

    Args:
      images: ``(N, H, W, C)`` (any real dtype; batches are float32).
      labels: ``(N,)`` integers.
      batch_size: examples per batch (per process).
      shuffle: reshuffle every epoch.
      seed: non-negative seed of the shuffles and augmentations.
      crop_pad: zero padding of the random crops (0 = no crop; 4 for CIFAR, 1-2 for digits).
      flip: random horizontal flips.
      normalize: subtract ``mean`` and divide by ``std``.
      mean: per-channel mean ``(C,)``; ``None`` measures it on ``images`` (pass the train
        split's statistics, e.g. ``train_pipeline.mean``, to an evaluation pipeline).
      std: per-channel standard deviation ``(C,)``; ``None`` measures it on ``images``.
      drop_remainder: drop the final partial batch instead of padding it.
      process_index: this process, ``0 <= process_index < process_count``
        (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Example:
      >>> images, labels = load_digits_split("train")
      >>> pipe = Pipeline(images, labels, 128, shuffle=True, crop_pad=1)
      >>> batch = next(pipe.batches(epoch=0))
      >>> batch.images.shape, pipe.num_batches
      ((128, 8, 8, 1), 12)
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        crop_pad: int = 0,
        flip: bool = False,
        normalize: bool = True,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        drop_remainder: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(f"images.shape={images.shape}: expected (N, H, W, C)")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels.shape={labels.shape}: expected ({images.shape[0]},) to match images"
            )
        if images.shape[0] == 0:
            raise ValueError("images is empty: expected at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive int")
        if seed < 0:
            raise ValueError(f"seed={seed}: expected a non-negative int")
        if crop_pad < 0:
            raise ValueError(f"crop_pad={crop_pad}: expected a non-negative int")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index}, process_count={process_count}: expected "
                "0 <= process_index < process_count"
            )
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.crop_pad = int(crop_pad)
        self.flip = bool(flip)
        self.normalize = bool(normalize)
        self.drop_remainder = bool(drop_remainder)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        channels = images.shape[-1]
        if mean is None or std is None:
            measured_mean, measured_std = channel_stats(images)
            mean = measured_mean if mean is None else mean
            std = measured_std if std is None else std
        self.mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).copy()
        self.std = np.broadcast_to(np.asarray(std, np.float32), (channels,)).copy()
        if self.normalize and not np.all(self.std > 0):
            raise ValueError(f"std={self.std}: expected positive per-channel values")
        if self.drop_remainder:
            self.num_batches = (self.num_examples // self.process_count) // self.batch_size
            if self.num_batches == 0:
                raise ValueError(
                    f"batch_size={batch_size} exceeds the {self.num_examples // process_count} "
                    "examples per process: drop_remainder=True would give no batch"
                )
        else:
            shard = -(-self.num_examples // self.process_count)
            self.num_batches = -(-shard // self.batch_size)

    @property
    def num_examples(self) -> int:
        """Examples in the data set (all processes)."""
        return int(self.images.shape[0])

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, start_batch)`` of global step ``step`` (``divmod(step, num_batches)``)."""
        if step < 0:
            raise ValueError(f"step={step}: expected a non-negative int")
        return divmod(int(step), self.num_batches)

    def indices(self, epoch: int = 0) -> np.ndarray:
        """This process's example indices for ``epoch``, in batch order (before padding)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: expected a non-negative int")
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        return order[self.process_index :: self.process_count]

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Yields batches ``start_batch, ..., num_batches - 1`` of ``epoch``.

        Args:
          epoch: non-negative epoch number (selects the shuffle and the augmentation).
          start_batch: first batch to yield, ``0 <= start_batch <= num_batches``.

        Yields:
          :class:`Batch` es of exactly ``batch_size`` examples.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(
                f"start_batch={start_batch}: expected 0 <= start_batch <= {self.num_batches}"
            )
        shard = self.indices(epoch)
        for b in range(start_batch, self.num_batches):
            yield self._batch(shard[b * self.batch_size : (b + 1) * self.batch_size], epoch, b)

    def __iter__(self) -> Iterator[Batch]:
        """Batches of epoch 0."""
        return self.batches(0)

    def __len__(self) -> int:
        return self.num_batches

    def _batch(self, index: np.ndarray, epoch: int, b: int) -> Batch:
        x = self.images[index].astype(np.float32)
        if self.normalize:
            x = (x - self.mean) / self.std
        if self.crop_pad or self.flip:
            rng = np.random.default_rng([self.seed, epoch, self.process_index, b])
            x = random_crop(x, self.crop_pad, rng)
            if self.flip:
                x = random_flip(x, rng)
        count = len(index)
        images = np.zeros((self.batch_size, *x.shape[1:]), np.float32)
        images[:count] = x
        labels = np.zeros((self.batch_size,), np.int32)
        labels[:count] = self.labels[index]
        mask = np.zeros((self.batch_size,), bool)
        mask[:count] = True
        return Batch(images, labels, mask)

