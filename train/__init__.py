"""convspectra.train: control the spectrum of conv layers while training (Flax NNX + optax).

* :func:`find_convs` / :func:`find_convs_nnx`: trace a model once and get a pytree of
  :class:`spectra.ConvSpec` (``None`` for non-conv leaves), with the structure of its params.
* :func:`project_conv_operator_norm`: an optax transform, last in the chain, that projects every
  conv kernel onto ``{σ_max <= max_norm}`` (Sedghi et al. 2019; certified by default).
* :func:`certify_conv_operator_norm`: a certified projection (every layer's certified upper
  bound <= max_norm) for final parameters and checkpoints, with a JSON-able report.
* :func:`spectral_penalty`: a differentiable sum (or max) of per-layer σ_max upper bounds, the
  regulariser of Yi (2020); :func:`orthogonality_loss` and :func:`sparsity_loss` of SVD
  training (Yang et al. 2020).
* :func:`train_and_evaluate`: the training loop of a :class:`TrainConfig` (checkpoints,
  metrics, exact per-layer σ_max); :func:`restore_model`, :func:`save_model`,
  :func:`evaluate_model` for run folders; :func:`run_svd_pipeline` (the four stages of SVD
  training), :func:`prune_by_energy`, :func:`recalibrate_batch_stats`, :func:`count_flops`.
* Submodules: :mod:`train.models` (CIFAR ResNets, a small CNN, Garipov et al.'s conv / conv-fc
  nets and their TT versions; :mod:`train.models.registry`; ONNX import:
  :func:`from_onnx`, :func:`fold_batch_norm`), :mod:`train.layers` (SVD and TT
  layers), :mod:`train.datasets` (digits / tfds loading), :mod:`train.data` (a seeded,
  resumable pipeline), and the
  parts of the loop: :mod:`train.config`, :mod:`train.optim`, :mod:`train.steps`,
  :mod:`train.certify`, :mod:`train.model_io`,
  :mod:`train.checkpoint`, :mod:`train.metrics`, :mod:`train.builders`,
  :mod:`train.conv_norms`, :mod:`train.batches`, :mod:`train.cli`; :mod:`train.report` (the
  spectral report of a whole network with its Lipschitz bracket, ``python -m train.report``);
  :mod:`train.lipschitz_layers` (1-Lipschitz blocks) and :func:`certified_accuracy`
  (:mod:`train.robustness`: the ℓ2 certificate margin > sqrt(2) ε L).
"""

from train import certify
from train import data
from train import datasets
from train import layers
from train import models
from train import report
from train import robustness
from train.batchnorm import recalibrate_batch_stats
from train.builders import build_data
from train.certify import CertificationReport
from train.certify import certify_conv_operator_norm
from train.checkpoint import make_run_dir
from train.config import TrainConfig
from train.config import apply_overrides
from train.conv_norms import layer_spectral_norms
from train.data import Pipeline
from train.discovery import find_convs
from train.discovery import find_convs_nnx
from train.flops import count_flops
from train.loop import train_and_evaluate
from train.model_io import evaluate_model
from train.model_io import restore_model
from train.model_io import save_model
from train.models.onnx import FoldedBatchNorm
from train.models.onnx import OnnxModel
from train.models.onnx import fold_batch_norm
from train.models.onnx import from_onnx
from train.models.registry import build_model
from train.optim import learning_rate_schedule
from train.optim import make_optimizer
from train.pruning import prune_by_energy
from train.regularizers import orthogonality_loss
from train.regularizers import sparsity_loss
from train.regularizers import spectral_penalty
from train.robustness import certified_accuracy
from train.svd_pipeline import run_svd_pipeline
from train.transforms import ProjectConvOperatorNormState
from train.transforms import project_conv_operator_norm

__all__ = [
    "CertificationReport",
    "FoldedBatchNorm",
    "OnnxModel",
    "Pipeline",
    "ProjectConvOperatorNormState",
    "TrainConfig",
    "apply_overrides",
    "build_data",
    "build_model",
    "certify",
    "certified_accuracy",
    "certify_conv_operator_norm",
    "count_flops",
    "data",
    "datasets",
    "evaluate_model",
    "find_convs",
    "find_convs_nnx",
    "fold_batch_norm",
    "from_onnx",
    "layers",
    "layer_spectral_norms",
    "learning_rate_schedule",
    "make_optimizer",
    "make_run_dir",
    "models",
    "orthogonality_loss",
    "project_conv_operator_norm",
    "prune_by_energy",
    "recalibrate_batch_stats",
    "report",
    "restore_model",
    "robustness",
    "run_svd_pipeline",
    "save_model",
    "sparsity_loss",
    "spectral_penalty",
    "train_and_evaluate",
]
