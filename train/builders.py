"""What a :class:`~train.config.TrainConfig` builds besides its model: its data pipelines and
an example input (the model itself: :func:`train.models.registry.build_model`)."""

import numpy as np

from train import data
from train import datasets
from train.config import TrainConfig


def build_data(
    config: TrainConfig, *, process_index: int = 0, process_count: int = 1
) -> tuple[data.Pipeline, data.Pipeline, datasets.DatasetInfo]:
    """``(train pipeline, test pipeline, info)`` for ``config.data.dataset`` (:mod:`train.data`).

    Training: shuffled per epoch with ``config.seed``, normalised with the dataset's train
    statistics, full batches only; with ``config.data.augment``, random crops with 1 pixel of zero
    padding for inputs of at most 16 px (digits) and 4 otherwise (CIFAR), and horizontal flips
    except for digits. Test: the same normalisation, no augmentation, the last batch padded and
    masked (every example counts once). ``info`` is
    ``train.datasets.dataset_info(config.data.dataset)``.

    Args:
      config: the run's configuration.
      process_index: this process's index in a multi-host run (its disjoint shard of every
        batch, see :class:`train.data.Pipeline`).
      process_count: the number of processes; ``config.data.batch_size`` and
        ``config.data.eval_batch_size`` are global (split over the processes).
    """
    info = datasets.dataset_info(config.data.dataset)
    x_train, y_train = datasets.load_split(
        config.data.dataset, "train", data_dir=config.data.data_dir
    )
    x_test, y_test = datasets.load_split(config.data.dataset, "test", data_dir=config.data.data_dir)
    if config.data.image_pad:
        pad = ((0, 0), (config.data.image_pad,) * 2, (config.data.image_pad,) * 2, (0, 0))
        x_train, x_test = np.pad(x_train, pad), np.pad(x_test, pad)
    small = info.image_shape[0] <= 16
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % process_count:
            raise ValueError(
                f"config.{name}={getattr(config, name)} must be divisible by "
                f"process_count={process_count} (it is the global batch)"
            )
    shard = {}
    if process_count != 1:
        shard = dict(process_index=process_index, process_count=process_count)
    train = data.Pipeline(
        x_train,
        y_train,
        config.data.batch_size // process_count,
        shuffle=True,
        seed=config.seed,
        crop_pad=(1 if small else 4) if config.data.augment else 0,
        flip=config.data.augment and config.data.dataset != "digits",
        mean=info.mean,
        std=info.std,
        drop_remainder=True,
        **shard,
    )
    test = data.Pipeline(
        x_test, y_test, config.data.eval_batch_size // process_count, mean=info.mean, std=info.std,
        drop_remainder=False, **shard,
    )
    return train, test, info


def input_shape(config: TrainConfig) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model's input: the dataset's images with ``config.data.image_pad``."""
    h, w, c = datasets.dataset_info(config.data.dataset).image_shape
    return h + 2 * config.data.image_pad, w + 2 * config.data.image_pad, c


def example_input(config: TrainConfig) -> np.ndarray:
    """Zeros of the model's input shape, a batch of one ``(1, H, W, C)`` float32."""
    return np.zeros((1, *input_shape(config)), np.float32)


def num_classes(config: TrainConfig) -> int:
    """The number of labels of ``config.data.dataset``."""
    return datasets.dataset_info(config.data.dataset).num_classes

