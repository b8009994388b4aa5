"""The datasets of the training experiments: loading and their static description.

All as ``(images, labels)`` with ``images`` float32 ``(N, H, W, C)`` in ``[0, 1]`` (NHWC) and
``labels`` int32 ``(N,)``:

* ``'digits'``: scikit-learn's ``load_digits`` (1,797 real 8x8 grey images shipped in the wheel,
  no network), with a fixed stratified train/test split: :func:`load_digits_split`.
* ``'cifar10'`` / ``'cifar100'``: through ``tfds.data_source`` (random access over ArrayRecord
  files, no TensorFlow needed): :func:`load_tfds_split`. The data must have been prepared
  beforehand; nothing is downloaded.

:func:`dataset_info` gives shapes, sizes and per-channel statistics (:func:`channel_stats`)
without loading a split where they are known. Every name here is also importable from
:mod:`train.data`, whose :class:`train.data.Pipeline` turns the arrays into batches.
"""

from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------------- statistics
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
