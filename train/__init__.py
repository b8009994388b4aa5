"""convspectra.train: control the spectrum of conv layers while training (Flax NNX + optax).

* :func:`find_convs` / :func:`find_convs_nnx`: trace a model once and get a pytree of
  :class:`spectra.ConvSpec` (``None`` for non-conv leaves), with the structure of its params.
* :func:`project_conv_operator_norm`: an optax transform, last in the chain, that projects every
  conv kernel onto ``{σ_max <= max_norm}`` (Sedghi et al. 2019; certified by default).
* :func:`spectral_penalty`: a differentiable sum (or max) of per-layer σ_max upper bounds, the
  regulariser of Yi (2020).
* :mod:`train.models` (CIFAR ResNets, a small CNN, Garipov et al.'s conv / conv-fc nets) and
  :mod:`train.data` (digits / tfds ``data_source`` loading and a seeded, resumable pipeline).
* :mod:`train.layers`: SVD-decomposed layers (Yang et al. 2020: :class:`~train.layers.SVDConv`,
  :class:`~train.layers.SVDDense`, :func:`~train.layers.decompose`) and tensor-train layers
  (:class:`~train.layers.TTConv`, :class:`~train.layers.TTDense`); their regularisers
  (:func:`orthogonality_loss`, :func:`sparsity_loss`), energy pruning to a compact model
  (:mod:`train.pruning`), the four-stage pipeline (:func:`run_svd_pipeline`), and a MACs counter
  read from the jaxpr (:func:`count_flops`).
"""

from train import batchnorm
from train import data
from train import flops
from train import layers
from train import models
from train import pruning
from train import svd_pipeline
from train.batchnorm import batch_norm_layers
from train.batchnorm import recalibrate_batch_stats
from train.config import DECOMPOSITIONS
from train.config import SPARSITIES
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
from train.flops import OpCount
from train.flops import count_flops
from train.flops import flops_by_op
from train.loop import TrainState
from train.loop import avoid_cpu_lapack_deadlock
from train.loop import evaluate_model
from train.loop import layer_spectral_norms
from train.loop import learning_rate_schedule
from train.loop import make_optimizer
from train.loop import make_run_dir
from train.loop import restore_model
from train.loop import save_model
from train.loop import svd_terms_on
from train.loop import train_and_evaluate
from train.pruning import energy_rank
from train.pruning import kept_energy
from train.pruning import layer_energies
from train.pruning import mask_by_energy
from train.pruning import prune_by_energy
from train.regularizers import PENALTY_REDUCTIONS
from train.regularizers import SPARSITY
from train.regularizers import factor_orthogonality
from train.regularizers import orthogonality_loss
from train.regularizers import singular_value_sparsity
from train.regularizers import sparsity_loss
from train.regularizers import spectral_penalty
from train.regularizers import svd_factors
from train.svd_pipeline import model_summary
from train.svd_pipeline import rebuild_pruned
from train.svd_pipeline import run_svd_pipeline
from train.svd_pipeline import svd_ranks
from train.transforms import PROJECT_METHODS
from train.transforms import ProjectConvOperatorNormState
from train.transforms import project_conv_operator_norm

__all__ = [
    "batchnorm",
    "batch_norm_layers",
    "recalibrate_batch_stats",
    "flops",
    "layers",
    "pruning",
    "svd_pipeline",
    "DECOMPOSITIONS",
    "SPARSITIES",
    "OpCount",
    "count_flops",
    "flops_by_op",
    "evaluate_model",
    "save_model",
    "svd_terms_on",
    "energy_rank",
    "kept_energy",
    "layer_energies",
    "mask_by_energy",
    "prune_by_energy",
    "SPARSITY",
    "factor_orthogonality",
    "orthogonality_loss",
    "singular_value_sparsity",
    "sparsity_loss",
    "svd_factors",
    "rebuild_pruned",
    "run_svd_pipeline",
    "svd_ranks",
    "model_summary",
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
    "PROJECT_METHODS",
    "ProjectConvOperatorNormState",
    "find_convs",
    "find_convs_nnx",
    "project_conv_operator_norm",
    "spectral_penalty",
]
