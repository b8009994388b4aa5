"""Tiny training configs shared by the tests (one place to change them).

Every config trains on the scikit-learn digits (8x8, or zero padded) in seconds on a CPU. They
are built with the flat ``TrainConfig`` keywords. Tests that need a variant use
``dataclasses.replace(CONFIG, ...)`` or :func:`tiny_config` with their changes. Tests that share
a config's step-relevant fields compile their jitted steps once per test process.
"""

from __future__ import annotations

from typing import Any

from train.config import TrainConfig

#: The fields every tiny config shares: the digits data set, no progress bar.
TINY_FIELDS: dict[str, Any] = dict(dataset="digits", progress=False)


def tiny_config(**fields: Any) -> TrainConfig:
    """A ``TrainConfig`` on the digits without a progress bar, with ``fields`` changed.

    Args:
      **fields: flat ``TrainConfig`` keywords.

    Returns:
      The frozen config.
    """
    return TrainConfig(**{**TINY_FIELDS, **fields})


#: ResNet-8 of width 4 (BatchNorm) on 12x12 digits, no augmentation, logged every step: the
#: multi-device runs (``distributed_worker.py``; a dict, the workers add their own fields).
RESNET8_DISTRIBUTED_FIELDS: dict[str, Any] = dict(
    **TINY_FIELDS, model="resnet8", width=4, image_pad=2, augment=False, batch_size=32,
    eval_batch_size=128, num_steps=6, lr=0.1, log_every=1,
)

#: ResNet-8 of width 8 (BatchNorm: the state has running statistics) on 12x12 digits, 12
#: steps, σ_max every 6: the training loop's tests.
RESNET8 = tiny_config(
    model="resnet8", width=8, image_pad=2, batch_size=64, eval_batch_size=128, num_steps=12,
    lr=0.1, log_every=4, sigma_every=6,
)

#: ResNet-8 of width 2, 2 steps: a run folder for the report's command line.
RESNET8_TWO_STEPS = tiny_config(
    model="resnet8", width=2, image_pad=2, batch_size=32, eval_batch_size=128, num_steps=2,
    lr=0.05, log_every=1,
)

#: A channel-decomposed SimpleCNN (no BatchNorm, cheap) on the 8x8 digits with the Hoyer
#: sparsity and orthogonality terms: the SVD-training pipeline.
SVD_SIMPLE_CNN = tiny_config(
    model="simple_cnn", width=4, batch_size=64, eval_batch_size=512, optimizer="adam", lr=1e-2,
    weight_decay=0.0, schedule="constant", log_every=3, decomposition="channel", orth_weight=1.0,
    sparsity="hoyer",
)

#: A tiny Garipov conv net's layout with TT conv layers 2-3 on 16x16 digits (``image_pad=4``),
#: as the TT experiment builds them.
GARIPOV_NET = dict(variant="conv", channels=(4, 4, 8, 8, 8, 8), fc_features=(16, 8))
GARIPOV_TT = {"tt_conv": {2: ((2, 2), (2, 2), (4, 4, 1)), 3: ((2, 2), (2, 4), (4, 4, 1))}}
GARIPOV_TT_CONFIG = tiny_config(
    image_pad=4, model="garipov", model_kwargs={**GARIPOV_NET, **GARIPOV_TT}, batch_size=32,
    eval_batch_size=512, num_steps=2, log_every=1, lr=0.01,
)
