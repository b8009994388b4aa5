"""Models for the training experiments, Flax NNX: CIFAR ResNets (He et al. 2016), a small CNN, and
Garipov et al.'s (2016) CIFAR-10 conv / conv-fc networks with their TT versions, and any ONNX
model imported as a pure JAX function (:func:`from_onnx`)."""

from train.layers.naive_tt import NaiveTTConv
from train.models.garipov import RELEASED_TT_CONV
from train.models.garipov import RELEASED_TT_CONV_TT_FC
from train.models.garipov import GaripovNet
from train.models.garipov import compression_ratio
from train.models.garipov import decompose_tt
from train.models.lipnet import LipResNet
from train.models.onnx import FoldedBatchNorm
from train.models.onnx import OnnxModel
from train.models.onnx import fold_batch_norm
from train.models.onnx import from_onnx
from train.models.resnet import PADDINGS
from train.models.resnet import SHORTCUTS
from train.models.resnet import BasicBlock
from train.models.resnet import ResNet
from train.models.resnet import SimpleCNN
from train.models.resnet import count_params
from train.models.resnet import resnet20
from train.models.resnet import resnet32
from train.models.resnet import resnet56
from train.models.resnet import resnet110
from train.models.resnet import shortcut_option_a

__all__ = [
    "RELEASED_TT_CONV",
    "RELEASED_TT_CONV_TT_FC",
    "GaripovNet",
    "NaiveTTConv",
    "compression_ratio",
    "decompose_tt",
    "LipResNet",
    "FoldedBatchNorm",
    "OnnxModel",
    "fold_batch_norm",
    "from_onnx",
    "PADDINGS",
    "SHORTCUTS",
    "BasicBlock",
    "ResNet",
    "SimpleCNN",
    "count_params",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "shortcut_option_a",
]
