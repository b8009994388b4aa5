"""convspectra.train: control the spectrum of conv layers while training (Flax NNX + optax).

* :func:`find_convs` / :func:`find_convs_nnx`: trace a model once and get a pytree of
  :class:`spectra.ConvSpec` (``None`` for non-conv leaves), with the structure of its params.
* :func:`project_conv_operator_norm`: an optax transform, last in the chain, that projects every
  conv kernel onto ``{σ_max <= max_norm}`` (Sedghi et al. 2019; certified by default).
* :func:`spectral_penalty`: a differentiable sum (or max) of per-layer σ_max upper bounds, the
  regulariser of Yi (2020).
* :mod:`train.models` (CIFAR ResNets, a small CNN) and :mod:`train.data` (digits / tfds
  ``data_source`` loading and a seeded, resumable input pipeline).
"""

from train import data
from train import models
from train.config import TrainConfig
from train.config import apply_overrides
from train.data import Batch
from train.data import DatasetInfo
from train.data import DatasetNotAvailableError
from train.data import Pipeline
from train.data import dataset_info
from train.data import load_digits_split
from train.data import load_split
from train.data import load_tfds_split
from train.discovery import find_convs
from train.discovery import find_convs_nnx
from train.loop import TrainState
from train.loop import avoid_cpu_lapack_deadlock
from train.loop import layer_spectral_norms
from train.loop import learning_rate_schedule
from train.loop import make_optimizer
from train.loop import make_run_dir
from train.loop import restore_model
from train.loop import train_and_evaluate
from train.regularizers import PENALTY_REDUCTIONS
from train.regularizers import spectral_penalty
from train.transforms import ProjectConvOperatorNormState
from train.transforms import project_conv_operator_norm

__all__ = [
    "TrainConfig",
    "TrainState",
    "apply_overrides",
    "avoid_cpu_lapack_deadlock",
    "layer_spectral_norms",
    "learning_rate_schedule",
    "make_optimizer",
    "make_run_dir",
    "restore_model",
    "train_and_evaluate",
    "Batch",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "Pipeline",
    "dataset_info",
    "data",
    "load_digits_split",
    "load_split",
    "load_tfds_split",
    "models",
    "PENALTY_REDUCTIONS",
    "ProjectConvOperatorNormState",
    "find_convs",
    "find_convs_nnx",
    "project_conv_operator_norm",
    "spectral_penalty",
]
