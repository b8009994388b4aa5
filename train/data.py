"""Datasets and a NumPy input pipeline for the training experiments.

Datasets, all as ``(images, labels)`` with ``images`` float32 ``(N, H, W, C)`` in ``[0, 1]`` (NHWC)
and ``labels`` int32 ``(N,)``:

* ``'digits'``: scikit-learn's ``load_digits`` (1,797 real 8x8 grey images shipped in the wheel,
  no network), with a fixed stratified train/test split: :func:`load_digits_split`.
* ``'cifar10'`` / ``'cifar100'``: through ``tfds.data_source`` (random access over ArrayRecord
  files, no TensorFlow needed): :func:`load_tfds_split`. The data must have been prepared
  beforehand; nothing is downloaded.

:class:`Pipeline` turns arrays into batches: a shuffle that is a function of ``(seed, epoch)``,
per-channel normalisation, random crops with zero padding and horizontal flips (vectorised NumPy),
fixed-shape batches with a ``mask`` for the final partial batch, and a disjoint per-process shard
for multi-host runs. It is stateless, so ``batches(epoch, start_batch)`` resumes anywhere.

Length (~520 lines): loading and the pipeline share the dataset statistics and the
augmentation helpers; splitting them would leave two modules that always change together.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

#: Names accepted by :func:`dataset_info` and :func:`load_split`.
DATASETS = ("digits", "cifar10", "cifar100")
_TFDS_DATASETS = ("cifar10", "cifar100")
#: Fraction of each digit class held out by :func:`load_digits_split` by default.
DIGITS_TEST_FRACTION = 0.2
_STATS_CHUNK = 4096


class DatasetNotAvailableError(RuntimeError):
    """A TFDS dataset is not prepared (in a random-access format) in the given ``data_dir``."""


class DatasetInfo(NamedTuple):
    """Static description of a dataset.

    Attributes:
      name: ``'digits'``, ``'cifar10'`` or ``'cifar100'``.
      image_shape: ``(H, W, C)``.
      num_classes: number of labels.
      mean: per-channel mean of the train split's pixels in ``[0, 1]``, a ``C``-tuple.
      std: per-channel standard deviation (over examples and pixels) of the train split.
      train_size: number of training examples.
      test_size: number of test examples.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int


# The usual CIFAR statistics of the 50,000 training images (rounded to 4 decimals).
_CIFAR_INFO = {
    "cifar10": DatasetInfo(
        "cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        50_000, 10_000,
    ),
    "cifar100": DatasetInfo(
        "cifar100", (32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        50_000, 10_000,
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """Image shape, number of classes, default normalisation and split sizes of ``name``.

    For ``'digits'`` the mean/std are measured by :func:`channel_stats` (float64 sums, float32
    result) on :func:`load_digits_split`'s default train split (1,438 images; test 359). For
    CIFAR they are the customary train-split values rounded to 4 decimals (constants: reading
    them needs no data).

    Args:
      name: one of :data:`DATASETS`.

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name == "digits":
        return _digits_info()
    if name in _CIFAR_INFO:
        return _CIFAR_INFO[name]
    raise ValueError(f"name={name!r}: expected one of {DATASETS}")


@functools.lru_cache(maxsize=1)
def _digits_info() -> DatasetInfo:
    train_images, _ = load_digits_split("train")
    test_images, _ = load_digits_split("test")
    mean, std = channel_stats(train_images)
    return DatasetInfo(
        "digits",
        (8, 8, 1),
        10,
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        len(train_images),
        len(test_images),
    )


# ---------------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, np.float32) / 16.0)[..., None]
    labels = np.asarray(digits.target, np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(
    test_fraction: float = DIGITS_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` of the fixed stratified split.

    For every class ``c`` (in increasing order) the indices of its images are permuted with one
    ``np.random.default_rng(seed)`` stream and the first ``round(test_fraction * count_c)`` go to
    the test split. Both index arrays are sorted (original order kept). With the defaults the
    test split has 359 images (35-37 per class) and the train split 1,438.

    Args:
      test_fraction: fraction of each class held out, in ``(0, 1)``.
      seed: non-negative seed of the split.

    Returns:
      ``(train_indices, test_indices)``, int64, disjoint, together ``0 .. 1796``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a number in (0, 1)")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative int")
    _, labels = _digits_arrays()
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(test_fraction * len(members)))])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(len(labels)), test_indices)
    return train_indices, test_indices


def load_digits_split(
    split: str = "train", test_fraction: float = DIGITS_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 handwritten digits of scikit-learn with a fixed stratified train/test split.

    Pixel values ``0..16`` are divided by 16. The split is :func:`digits_split_indices` (sizes
    1,438 / 359 with the defaults), deterministic across runs and machines.

    Args:
      split: ``'train'`` or ``'test'``.
      test_fraction: fraction of each class in the test split.
      seed: seed of the split (the default split uses 0).

    Returns:
      ``(images, labels)``: float32 ``(N, 8, 8, 1)`` in ``[0, 1]`` and int32 ``(N,)`` in ``0..9``
      (fresh, writable arrays).

    Example:
      >>> images, labels = load_digits_split("test")
      >>> images.shape, labels.shape
      ((359, 8, 8, 1), (359,))
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    train_indices, test_indices = digits_split_indices(test_fraction, seed)
    indices = train_indices if split == "train" else test_indices
    images, labels = _digits_arrays()
    return images[indices], labels[indices]


def _not_available_message(name: str, split: str, data_dir, error: Exception) -> str:
    where = data_dir if data_dir is not None else "$TFDS_DATA_DIR or ~/tensorflow_datasets"
    return (
        f"TFDS dataset {name!r} (split {split!r}) is not prepared for random access in {where}; "
        f"nothing is downloaded here. On a machine with network run `tfds build {name} "
        f"--file_format=array_record --data_dir=DIR` (or `tfds.builder({name!r}, data_dir=DIR)"
        f".download_and_prepare(file_format='array_record')`), copy DIR to this machine and "
        f"pass data_dir=DIR (or set TFDS_DATA_DIR=DIR). TFDS said: {type(error).__name__}: "
        f"{error}"
    )


def load_tfds_split(
    name: str = "cifar10", split: str = "train", data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole CIFAR split with ``tfds.data_source`` (no TensorFlow, no download).

    The split is read at once, record by record through the random-access source, into
    memory: ``uint8`` pixels are converted to float32 in ``[0, 1]`` (CIFAR-10 train: 50,000 x
    32 x 32 x 3 float32 = 614 MB). ``label`` is the fine label (CIFAR-100's ``coarse_label`` is
    ignored). The data must be prepared in ``data_dir`` in a random-access format
    (``array_record``): see :class:`DatasetNotAvailableError`'s message.

    Args:
      name: ``'cifar10'`` or ``'cifar100'``.
      split: a TFDS split: ``'train'``, ``'test'``, or a slice such as ``'train[:45000]'``.
      data_dir: TFDS data directory; ``None`` for TFDS's default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).

    Returns:
      ``(images, labels)``: float32 ``(N, 32, 32, 3)`` in ``[0, 1]`` and int32 ``(N,)``.

    Raises:
      ValueError: for a name other than ``'cifar10'``/``'cifar100'``.
      DatasetNotAvailableError: when the split cannot be opened; the message says how to
        prepare it.
    """
    if name not in _TFDS_DATASETS:
        raise ValueError(f"name={name!r}: expected one of {_TFDS_DATASETS}")
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        num_examples = len(source)
    except (NotImplementedError, FileNotFoundError, KeyError, AssertionError, ValueError) as e:
        raise DatasetNotAvailableError(_not_available_message(name, split, data_dir, e)) from e
    shape = _CIFAR_INFO[name].image_shape
    images = np.empty((num_examples, *shape), np.uint8)
    labels = np.empty((num_examples,), np.int32)
    for i in range(num_examples):
        record = source[i]
        image = np.asarray(record["image"])
        if image.shape != shape:
            raise ValueError(f"{name} record {i} has image shape {image.shape}, expected {shape}")
        images[i] = image
        labels[i] = record["label"]
    return images.astype(np.float32) / np.float32(255.0), labels


def load_split(
    name: str, split: str, *, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_digits_split` for ``'digits'`` (``data_dir`` unused), else
    :func:`load_tfds_split`."""
    if name == "digits":
        return load_digits_split(split)
    if name in _TFDS_DATASETS:
        return load_tfds_split(name, split, data_dir)
    raise ValueError(f"name={name!r}: expected one of {DATASETS}")


# ------------------------------------------------------------------------- transformations
def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over examples and pixels (float64 sums).

    Args:
      images: ``(N, H, W, C)``.

    Returns:
      ``(mean, std)``, float32 ``(C,)``; ``std`` is the population standard deviation.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images.shape={images.shape}: expected a non-empty (N, H, W, C) array")
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


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

