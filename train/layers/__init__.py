"""Flax NNX layers in compressed forms: SVD-decomposed (Yang et al. 2020) and tensor-train
(Novikov et al. 2015; Garipov et al. 2016), and Garipov et al.'s naive TT conv."""

from train.layers.naive_tt import NaiveTTConv
from train.layers.svd import DECOMPOSITIONS
from train.layers.svd import FACTOR_NAMES
from train.layers.svd import SVD_CONV_PADDINGS
from train.layers.svd import SVDConv
from train.layers.svd import SVDDense
from train.layers.svd import factor_shape
from train.layers.svd import kernel_to_matrix
from train.layers.svd import matrix_to_kernel
from train.layers.svd import path_name
from train.layers.svd import select_triplets
from train.layers.svd_decompose import decompose
from train.layers.svd_decompose import svd_layers
from train.layers.tt import AUTO_CORES_COST_FACTOR
from train.layers.tt import TTConv
from train.layers.tt import TTDense
from train.layers.tt import tt_conv_flops

__all__ = [
    "AUTO_CORES_COST_FACTOR",
    "DECOMPOSITIONS",
    "FACTOR_NAMES",
    "NaiveTTConv",
    "SVDConv",
    "SVDDense",
    "SVD_CONV_PADDINGS",
    "TTConv",
    "TTDense",
    "decompose",
    "factor_shape",
    "kernel_to_matrix",
    "matrix_to_kernel",
    "path_name",
    "select_triplets",
    "svd_layers",
    "tt_conv_flops",
]
