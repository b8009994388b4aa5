"""Flax NNX layers in compressed forms: SVD-decomposed (Yang et al. 2020) and tensor-train
(Novikov et al. 2015; Garipov et al. 2016)."""

from train.layers.tt import AUTO_CORES_COST_FACTOR
from train.layers.tt import TTConv
from train.layers.tt import TTDense
from train.layers.tt import tt_conv_flops

__all__ = [
    "AUTO_CORES_COST_FACTOR",
    "TTConv",
    "TTDense",
    "tt_conv_flops",
]
