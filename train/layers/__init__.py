"""Flax NNX layers in compressed forms: SVD-decomposed (Yang et al. 2020) and tensor-train
(Novikov et al. 2015; Garipov et al. 2016)."""
