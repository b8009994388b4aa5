"""Models for the training experiments: CIFAR ResNets (He et al. 2016) and a small CNN, Flax NNX."""

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
