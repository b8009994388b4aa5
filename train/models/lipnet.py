"""A small 1-Lipschitz residual CNN (LiResNet-style), Flax NNX: :class:`LipResNet`.

Every map of the network has ℓ2 Lipschitz constant at most 1 once its convs have σ_max <= 1
(which ``TrainConfig(model='lipresnet', project_max_norm=1.0)`` keeps with the certified
projection, zero-padded convs included), so the logit map is 1-Lipschitz by construction:

``stem conv -> act -> stage 1: n₁ LipResidualBlocks -> stride-2 conv -> act ->
stage 2: n₂ LipResidualBlocks -> flatten -> NormalizedDense``

* convs: plain ``nnx.Conv`` kernels (the stem, the stride-2 transition) and the blocks' one
  kernel ``K = I + W`` (:class:`train.lipschitz_layers.LipResidualBlock`), every one a
  params leaf that :func:`train.find_convs` finds and the projection keeps at σ_max <= 1;
* activations: 1-Lipschitz and gradient-norm preserving
  (:data:`train.lipschitz_layers.ACTIVATIONS`):
  ``'abs'`` by default; :func:`train.report.network_report` certifies ``'abs'``, ``'maxmin'``
  and ``'groupsort<k>'`` as exactly 1 (see :mod:`train.lipschitz_layers`; MaxMin is ``abs`` between
  orthogonal maps: ``MaxMin(a, b) = Qᵀ(u, |v|)`` with ``(u, v) = Q(a, b)``, ``Q`` the 45°
  rotation of each pair);
* flatten: a reshape, norm 1 (no average pooling, which would divide the constant by
  ``sqrt(H W)`` and the margins with it);
* head: :class:`train.lipschitz_layers.NormalizedDense` (``'spectral'``: σ_max <= 1).

No BatchNorm: eval-mode BatchNorm rescales channels after the projection, so the folded
operator can exceed 1 (see the network report experiment).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from train import lipschitz_layers as ll

#: The stem and transition convs: He-normal (the first projected update brings them to
#: σ_max <= 1). A centre-tap orthogonal start was tried and trained far worse: the stem's
#: channels are then all multiples of the one input channel, identical after ``abs``.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class LipResNet(nnx.Module):
    """A 1-Lipschitz residual CNN for small images (digits 8x8 / 12x12, CIFAR 32x32).

    Args:
      num_classes: logits.
      in_channels: channels of the images.
      input_shape: ``(H, W)`` of the images (the head's input size depends on it).
      width: channels of stage 1 (stage 2 has ``2 width``; MaxMin needs them even).
      depths: residual blocks of stage 1 and stage 2.
      activation: one of :data:`train.lipschitz_layers.ACTIVATIONS` (default ``'abs'``).
      head: ``'spectral'`` (1-Lipschitz logits) or ``'rows'`` (each logit 1-Lipschitz).
      padding: ``'SAME'`` (zeros) or ``'CIRCULAR'``, every conv.
      init_scale: scale of the residual kernels ``W`` at initialisation.
      orthogonal: the stem and the transition as
        :class:`train.lipschitz_layers.OrthogonalConv` (gradient-norm preserving: the stem a
        3x3 conv, an isometry on zero-bordered images when ``width >= 9 in_channels``; the
        transition a 2x2 stride-2 conv whose nonzero singular values are all 1) instead of
        projected ``nnx.Conv`` s; zero padding only. Their σ_max <= 1 holds by construction (the
        projection does not see them: their kernels are computed from params).
      lipschitz: ``L > 0``, a constant the logits are multiplied by: the network's constant
        is then ``L`` by construction. A logit scale is the usual temperature of the
        cross-entropy of 1-Lipschitz networks (the logits of a 1-Lipschitz map of normalised
        images are too close for the loss to train them); it does not change the certified
        radii ``margin / (sqrt(2) L)``, which scale with it.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = LipResNet(10, in_channels=1, input_shape=(8, 8), width=4, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        input_shape: Sequence[int] = (32, 32),
        width: int = 16,
        depths: Sequence[int] = (2, 2),
        activation: str = "abs",
        head: str = "spectral",
        padding: str = "SAME",
        init_scale: float = 0.1,
        orthogonal: bool = False,
        lipschitz: float = 1.0,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        depths = tuple(int(d) for d in depths)
        if len(depths) != 2 or min(depths) < 0:
            raise ValueError(f"depths={depths}: expected two block counts >= 0")
        if width < 1 or width % 2:
            raise ValueError(f"width={width}: expected an even int >= 2")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes={num_classes}, in_channels={in_channels}: expected >= 1")
        h, w = (int(s) for s in input_shape)
        if min(h, w) < 3:
            raise ValueError(f"input_shape={tuple(input_shape)}: expected at least 3x3")
        if padding not in ("SAME", "CIRCULAR"):
            raise ValueError(f"padding={padding!r}: expected 'SAME' or 'CIRCULAR'")
        if orthogonal and padding != "SAME":
            raise ValueError(f"padding={padding!r}: orthogonal=True expects 'SAME'")
        ll.activation_fn(activation)  # Checks the name.
        if not lipschitz > 0:
            raise ValueError(f"lipschitz={lipschitz!r}: expected > 0")
        self.activation = activation
        self.lipschitz = float(lipschitz)

        def conv(c_in, c_out, stride):
            return nnx.Conv(
                c_in, c_out, (3, 3), strides=stride, padding=padding, use_bias=True,
                kernel_init=_conv_init, param_dtype=param_dtype, rngs=rngs,
            )

        def blocks(channels, n):
            return nnx.List([
                ll.LipResidualBlock(
                    channels, padding=padding, activation=activation, init_scale=init_scale,
                    param_dtype=param_dtype, rngs=rngs,
                )
                for _ in range(n)
            ])

        if orthogonal:
            self.stem = ll.OrthogonalConv(
                in_channels, width, kernel_size=3, stride=1, param_dtype=param_dtype, rngs=rngs)
        else:
            self.stem = conv(in_channels, width, 1)
        self.stage1 = blocks(width, depths[0])
        if orthogonal:
            self.down = ll.OrthogonalConv(
                width, 2 * width, kernel_size=2, stride=2, param_dtype=param_dtype, rngs=rngs)
        else:
            self.down = conv(width, 2 * width, 2)
        self.stage2 = blocks(2 * width, depths[1])
        features = -(-h // 2) * -(-w // 2) * 2 * width
        self.head = ll.NormalizedDense(
            features, num_classes, normalize=head, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels)`` images -> ``(N, num_classes)`` logits."""
        act = ll.activation_fn(self.activation)
        x = act(self.stem(x))
        for block in self.stage1:
            x = block(x)
        x = act(self.down(x))
        for block in self.stage2:
            x = block(x)
        logits = self.head(x.reshape(x.shape[0], -1))
        return logits if self.lipschitz == 1.0 else self.lipschitz * logits
