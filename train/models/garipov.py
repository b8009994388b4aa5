"""The CIFAR-10 networks of Garipov et al. (2016), "Ultimate tensorization", with TT layers.

Layout (reference notes §4, [CODE] TensorNet-TF), every conv 3x3, stride 1, ``'SAME'`` zero
padding, no bias, followed by BatchNorm and ReLU; layers are numbered 1..6 as in the notes:

* conv layers 1-2: ``c_in -> 64 -> 64``; max-pool 3x3 / 2 (``'SAME'``: 32 -> 16);
* conv layers 3-4: ``64 -> 128 -> 128``; max-pool 3x3 / 2 (``'SAME'``: 16 -> 8);
* conv layers 5-6: ``128 -> 128 -> 128`` (at 8x8);
* ``variant='conv'``: average pool 4x4 / 4 (``head_pool='avg4'``: 8x8 -> 2x2, so 2x2x128 = 512
  features) or a global mean (``head_pool='global'``: 128 features), then FC-10 (with bias);
* ``variant='conv_fc'``: flatten the 8x8x128 = 8192 features (no pooling), FC-1536 and FC-512
  (no bias, each followed by BatchNorm and ReLU), then FC-10 (with bias).

Layer 1 (``c_in -> 64``) is never tensorised in the paper; layers 2-6 may be replaced by a
:class:`train.layers.tt.TTConv` (Garipov's TT-conv: a spatial core and ``d`` channel cores) or by
a :class:`train.layers.naive_tt.NaiveTTConv` (importable from here too), and the hidden FC
layers of ``'conv_fc'`` by a :class:`train.layers.tt.TTDense` (TT-matrix, Novikov et al. 2015).

Parameter counts (and how they fix the sizes the notes leave implicit), the naive TT-conv
reading, input sizes, initialisation and spectra: ``docs/garipov.md``.

Reference: T. Garipov, D. Podoprikhin, A. Novikov, D. Vetrov, "Ultimate tensorization:
compressing convolutional and FC layers alike", NIPS 2016 workshop, arXiv 1611.03214.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectra import ConvSpec
from train.layers.naive_tt import NaiveTTConv
from train.models.resnet import batch_norm
from train.models.resnet import count_params
from train.models.resnet import he_conv

#: Network variants: conv layers + FC-10, or conv layers + FC-1536 + FC-512 + FC-10.
VARIANTS = ("conv", "conv_fc")
#: Pooling before FC-10 in the ``'conv'`` variant: 4x4 / 4 average pool, or a global mean.
HEAD_POOLS = ("avg4", "global")
#: Output channels of the 6 conv layers.
CONV_CHANNELS = (64, 64, 128, 128, 128, 128)
#: Hidden FC layers of the ``'conv_fc'`` variant.
FC_FEATURES = (1536, 512)
#: Conv layers (1-based) followed by a 3x3 / 2 max pool.
POOL_AFTER = (2, 4)

#: The released TT-conv network (notes §4): layers 2-6 as TT-conv, ``{layer: (in_modes,
#: out_modes, ranks)}`` with ranks ``(r_0, …, r_d)`` of :class:`train.layers.tt.TTConv`.
#: Use as ``GaripovNet(**RELEASED_TT_CONV, rngs=...)``.
RELEASED_TT_CONV: dict[str, Any] = {
    "variant": "conv",
    "tt_conv": {
        2: ((4, 4, 4), (4, 4, 4), (22, 20, 20, 1)),
        3: ((4, 4, 4), (4, 8, 4), (27, 22, 22, 1)),
        4: ((4, 8, 4), (4, 8, 4), (23, 23, 23, 1)),
        5: ((4, 8, 4), (4, 8, 4), (23, 23, 23, 1)),
        6: ((4, 8, 4), (4, 8, 4), (23, 23, 23, 1)),
    },
}

#: The released TT-conv-TT-fc network (notes §4): layers 2-6 TT-conv with ranks (16, 16, 16, 1),
#: FC-1536 and FC-512 as TT-matrices ``{fc: (in_modes, out_modes, ranks)}``, dense FC-10.
RELEASED_TT_CONV_TT_FC: dict[str, Any] = {
    "variant": "conv_fc",
    "tt_conv": {
        2: ((4, 4, 4), (4, 4, 4), (16, 16, 16, 1)),
        3: ((4, 4, 4), (4, 8, 4), (16, 16, 16, 1)),
        4: ((4, 8, 4), (4, 8, 4), (16, 16, 16, 1)),
        5: ((4, 8, 4), (4, 8, 4), (16, 16, 16, 1)),
        6: ((4, 8, 4), (4, 8, 4), (16, 16, 16, 1)),
    },
    "tt_fc": {
        1: ((8, 8, 8, 16), (4, 6, 8, 8), (1, 40, 40, 40, 1)),
        2: ((4, 6, 8, 8), (4, 4, 4, 8), (1, 30, 30, 30, 1)),
    },
}


def compression_ratio(baseline: nnx.Module | int, compressed: nnx.Module | int) -> float:
    """``count_params(baseline) / count_params(compressed)`` (Garipov et al.'s compression).

    Both counts include every trainable parameter (BatchNorm scale/bias too, statistics not);
    integers are taken as parameter counts.
    """
    b = baseline if isinstance(baseline, int) else count_params(baseline)
    c = compressed if isinstance(compressed, int) else count_params(compressed)
    if b < 1 or c < 1:
        raise ValueError(f"parameter counts must be positive; got baseline={b}, compressed={c}")
    return b / c


def _tt_layers():
    from train.layers import tt

    return tt


def _check_tt_entry(name: str, value: Any, c_in: int, c_out: int) -> tuple:
    try:
        in_modes, out_modes, ranks = (tuple(int(v) for v in part) for part in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={value!r}: expected (in_modes, out_modes, ranks)") from e
    if math.prod(in_modes) != c_in or math.prod(out_modes) != c_out:
        raise ValueError(
            f"{name}: in_modes={in_modes} and out_modes={out_modes} must multiply to the layer's "
            f"{c_in} input and {c_out} output features"
        )
    return in_modes, out_modes, ranks


def _pooled(size: int) -> int:
    return -(-size // 2)  # A 3x3 / 2 'SAME' max pool: ceil(size / 2).


class GaripovNet(nnx.Module):
    """Garipov et al. (2016)'s CIFAR-10 network, optionally with TT-conv / TT-FC layers.

    See the module docstring for the layout, the parameter counts and the naive TT reading.

    Args:
      variant: ``'conv'`` (6 convs + FC-10) or ``'conv_fc'`` (6 convs + FC-1536 + FC-512 +
        FC-10).
      in_channels: channels of the input images.
      num_classes: number of logits.
      input_shape: ``(H, W)`` of the inputs; fixes the flatten size of the FC layers (and the
        conv input sizes of :meth:`conv_specs`).
      channels: output channels of the 6 convs (:data:`CONV_CHANNELS`; smaller for quick runs).
      fc_features: the 2 hidden FC layers of ``'conv_fc'`` (:data:`FC_FEATURES`).
      head_pool: ``'conv'`` variant: ``'avg4'`` (4x4 / 4 average pool, needs an input of at
        least 4x4 after the two max pools) or ``'global'`` (mean over H, W).
      tt_conv: ``{layer: (in_modes, out_modes, ranks)}`` for conv layers (1-based, as the
        notes) replaced by :class:`train.layers.tt.TTConv` (ranks ``(r_0, …, r_d)`` with
        ``r_d = 1``).
      tt_fc: ``'conv_fc'`` only: ``{fc: (in_modes, out_modes, ranks)}`` for FC layers 1, 2 (the
        hidden ones, no bias) or 3 (FC-10, with bias) replaced by
        :class:`train.layers.tt.TTDense` (ranks ``(1, r_1, …, 1)``).
      naive_tt_conv: inner ranks ``(r1, r2, r3)`` of a :class:`NaiveTTConv` for conv layers
        2-6, or ``{layer: (r1, r2, r3)}``.
      tt_impl: ``impl`` of the :class:`train.layers.tt.TTConv` layers.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> net = GaripovNet("conv", rngs=nnx.Rngs(0))
      >>> net.eval()
      >>> net(jnp.zeros((2, 32, 32, 3))).shape, count_params(net)
      ((2, 10), 561098)
    """

    def __init__(
        self,
        variant: str = "conv",
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        input_shape: Sequence[int] = (32, 32),
        channels: Sequence[int] = CONV_CHANNELS,
        fc_features: Sequence[int] = FC_FEATURES,
        head_pool: str = "avg4",
        tt_conv: Mapping[int, Any] | None = None,
        tt_fc: Mapping[int, Any] | None = None,
        naive_tt_conv: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
        tt_impl: str = "auto",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool={head_pool!r}: expected one of {HEAD_POOLS}")
        channels, fc_features = tuple(channels), tuple(fc_features)
        if len(channels) != 6 or min(channels) < 1:
            raise ValueError(f"channels={channels}: expected 6 positive ints")
        if len(fc_features) != 2 or min(fc_features) < 1:
            raise ValueError(f"fc_features={fc_features}: expected 2 positive ints")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels={in_channels}, num_classes={num_classes}: expected >= 1"
            )
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 2 or min(input_shape) < 1:
            raise ValueError(f"input_shape={input_shape}: expected (H, W) with H, W >= 1")
        tt_conv = dict(tt_conv or {})
        tt_fc = dict(tt_fc or {})
        if naive_tt_conv is None:
            naive = {}
        elif isinstance(naive_tt_conv, Mapping):
            naive = dict(naive_tt_conv)
        else:
            naive = {layer: tuple(naive_tt_conv) for layer in range(2, 7)}
        for name, table in (("tt_conv", tt_conv), ("naive_tt_conv", naive)):
            bad = sorted(k for k in table if k not in range(1, 7))
            if bad:
                raise ValueError(f"{name} layers {bad}: expected conv layer numbers 1..6")
        both = sorted(set(tt_conv) & set(naive))
        if both:
            raise ValueError(f"conv layers {both} are in both tt_conv and naive_tt_conv")
        if tt_fc and variant != "conv_fc":
            raise ValueError(f"tt_fc={tt_fc}: TT-FC layers need variant='conv_fc'")
        bad = sorted(k for k in tt_fc if k not in (1, 2, 3))
        if bad:
            raise ValueError(f"tt_fc layers {bad}: expected FC layer numbers 1, 2 or 3")

        final = tuple(_pooled(_pooled(s)) for s in input_shape)
        if variant == "conv" and head_pool == "avg4" and min(final) < 4:
            raise ValueError(
                f"input_shape={input_shape} leaves {final} before the 4x4 average pool; "
                "expected at least 4x4 (use head_pool='global' for small inputs)"
            )
        self.variant = variant
        self.head_pool = head_pool
        self.input_shape = input_shape
        self.tt_impl = tt_impl
        tt = _tt_layers() if tt_conv or tt_fc else None

        convs, bns, kinds, sizes = [], [], [], []
        c_in, size = in_channels, input_shape
        for layer, c_out in enumerate(channels, start=1):
            sizes.append(size)
            if layer in tt_conv:
                in_modes, out_modes, ranks = _check_tt_entry(
                    f"tt_conv[{layer}]", tt_conv[layer], c_in, c_out
                )
                convs.append(tt.TTConv(in_modes, out_modes, ranks, (3, 3), padding="SAME",
                                       use_bias=False, impl=tt_impl, param_dtype=param_dtype,
                                       rngs=rngs))
                kinds.append("tt")
            elif layer in naive:
                convs.append(NaiveTTConv(c_in, c_out, 3, naive[layer], padding="SAME",
                                         param_dtype=param_dtype, rngs=rngs))
                kinds.append("naive_tt")
            else:
                convs.append(he_conv(c_in, c_out, 3, 1, "SAME", param_dtype, rngs))
                kinds.append("dense")
            bns.append(batch_norm(c_out, param_dtype, rngs))
            if layer in POOL_AFTER:
                size = tuple(_pooled(s) for s in size)
            c_in = c_out
        self.convs = nnx.List(convs)
        self.bns = nnx.List(bns)
        self.conv_kinds = tuple(kinds)
        self.conv_input_shapes = tuple(sizes)

        if variant == "conv":
            if head_pool == "avg4":
                flat = (size[0] // 4) * (size[1] // 4) * c_in
            else:
                flat = c_in
            self.fcs = nnx.List([])
            self.fc_bns = nnx.List([])
            head_in = flat
        else:
            flat = size[0] * size[1] * c_in
            fcs, fc_bns = [], []
            features = flat
            for index, out in enumerate(fc_features, start=1):
                if index in tt_fc:
                    in_modes, out_modes, ranks = _check_tt_entry(
                        f"tt_fc[{index}]", tt_fc[index], features, out
                    )
                    fcs.append(tt.TTDense(in_modes, out_modes, ranks, use_bias=False,
                                          param_dtype=param_dtype, rngs=rngs))
                else:
                    fcs.append(nnx.Linear(features, out, use_bias=False,
                                          param_dtype=param_dtype, rngs=rngs))
                fc_bns.append(batch_norm(out, param_dtype, rngs))
                features = out
            self.fcs = nnx.List(fcs)
            self.fc_bns = nnx.List(fc_bns)
            head_in = features
        self.flatten_features = flat
        if 3 in tt_fc:
            in_modes, out_modes, ranks = _check_tt_entry("tt_fc[3]", tt_fc[3], head_in,
                                                         num_classes)
            self.head = tt.TTDense(in_modes, out_modes, ranks, use_bias=True,
                                   param_dtype=param_dtype, rngs=rngs)
        else:
            self.head = nnx.Linear(head_in, num_classes, param_dtype=param_dtype, rngs=rngs)
        self.fc_kinds = tuple(
            "dense" if isinstance(fc, nnx.Linear) else "tt" for fc in [*self.fcs, self.head]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels)`` images (``(H, W) = input_shape``) -> ``(N, classes)``."""
        for layer, (conv, bn) in enumerate(zip(self.convs, self.bns), start=1):
            x = nnx.relu(bn(conv(x)))
            if layer in POOL_AFTER:
                x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        if self.variant == "conv":
            if self.head_pool == "avg4":
                x = nnx.avg_pool(x, (4, 4), strides=(4, 4), padding="VALID")
            else:
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
        x = x.reshape(x.shape[0], -1)
        for fc, bn in zip(self.fcs, self.fc_bns):
            x = nnx.relu(bn(fc(x)))
        return self.head(x)

    def conv_specs(self) -> list[tuple[str, nnx.Module, ConvSpec]]:
        """``(name, layer, spec)`` of the 6 conv layers in order, ``name`` like ``'conv2'``.

        ``spec`` is the :class:`spectra.ConvSpec` of the layer's operator at its input size
        (``'SAME'`` zero padding, stride 1), for
        ``spectra.spectral_norm(kernel, spec, method=...)`` with ``kernel`` the layer's kernel
        (``layer.kernel[...]`` for a dense conv, ``layer.kernel()`` for a TT one; see
        :func:`layer_kernel`).
        """
        out = []
        for layer, (conv, size) in enumerate(zip(self.convs, self.conv_input_shapes), start=1):
            out.append((f"conv{layer}", conv, ConvSpec(input_shape=size, padding="SAME")))
        return out


def layer_kernel(layer: nnx.Module) -> jax.Array:
    """The HWIO kernel of a dense, TT or naive-TT conv layer (exact reconstruction)."""
    if isinstance(layer.kernel, nnx.Variable):
        return layer.kernel[...]
    return layer.kernel()


def layer_matrix(layer: nnx.Module) -> jax.Array:
    """The ``(in, out)`` matrix of an ``nnx.Linear`` or a TT-matrix layer (``matrix()``)."""
    if isinstance(layer, nnx.Linear):
        return layer.kernel[...]
    return layer.matrix()


def decompose_tt(
    model: GaripovNet,
    *,
    tt_conv: Mapping[int, Any] | None = None,
    tt_fc: Mapping[int, Any] | None = None,
    naive_tt_conv: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    rtol: float | None = None,
) -> GaripovNet:
    """A copy of a (trained) dense :class:`GaripovNet` with layers replaced by their TT-SVD.

    Every listed dense layer is replaced by ``TTConv.from_dense`` / ``TTDense.from_dense`` /
    :meth:`NaiveTTConv.from_dense` of its trained weights (TT-SVD truncated to the given ranks,
    or ``rtol``; an approximation of the layer, exact at full ranks); every other parameter and
    the BatchNorm statistics are copied. ``model`` is left untouched. The result starts the
    "decompose a trained network, then fine-tune" protocol.

    Args:
      model: a network whose listed layers are dense (``nnx.Conv`` / ``nnx.Linear``).
      tt_conv: ``{layer: (in_modes, out_modes, ranks)}`` as in :class:`GaripovNet`.
      tt_fc: ``{fc: (in_modes, out_modes, ranks)}`` as in :class:`GaripovNet`.
      naive_tt_conv: ``(r1, r2, r3)`` for layers 2-6, or ``{layer: (r1, r2, r3)}``.
      rtol: relative Frobenius tolerance of TT-SVD, used with (or instead of) the ranks.

    Returns:
      A new :class:`GaripovNet`.

    Raises:
      ValueError: naming a listed layer that is not dense, or a layer number out of range.
    """
    new = nnx.clone(model)
    tt = _tt_layers() if tt_conv or tt_fc else None
    kinds = list(new.conv_kinds)
    if naive_tt_conv is None:
        naive = {}
    elif isinstance(naive_tt_conv, Mapping):
        naive = dict(naive_tt_conv)
    else:
        naive = {layer: tuple(naive_tt_conv) for layer in range(2, 7)}
    for name, table in (("tt_conv", dict(tt_conv or {})), ("naive_tt_conv", naive)):
        for layer, value in table.items():
            if layer not in range(1, 7) or not isinstance(model.convs[layer - 1], nnx.Conv):
                raise ValueError(f"{name}: conv layer {layer} is not a dense conv of the model")
            kernel = model.convs[layer - 1].kernel[...]
            if name == "tt_conv":
                in_modes, out_modes, ranks = _check_tt_entry(
                    f"tt_conv[{layer}]", value, kernel.shape[2], kernel.shape[3]
                )
                new.convs[layer - 1] = tt.TTConv.from_dense(
                    kernel, in_modes, out_modes, ranks, rtol=rtol, strides=1, padding="SAME",
                    impl=new.tt_impl,
                )
                kinds[layer - 1] = "tt"
            else:
                new.convs[layer - 1] = NaiveTTConv.from_dense(kernel, value, rtol=rtol)
                kinds[layer - 1] = "naive_tt"
    fc_kinds = list(new.fc_kinds)
    for index, value in dict(tt_fc or {}).items():
        layers = [*model.fcs, model.head]
        if index not in (1, 2, 3) or index > len(layers) or not isinstance(
            layers[index - 1], nnx.Linear
        ):
            raise ValueError(f"tt_fc: FC layer {index} is not a dense FC layer of the model")
        dense = layers[index - 1]
        kernel = dense.kernel[...]
        in_modes, out_modes, ranks = _check_tt_entry(
            f"tt_fc[{index}]", value, kernel.shape[0], kernel.shape[1]
        )
        bias = None if dense.bias is None else dense.bias[...]
        layer = tt.TTDense.from_dense(kernel, in_modes, out_modes, ranks, rtol=rtol, bias=bias)
        if index == len(layers):
            new.head = layer
        else:
            new.fcs[index - 1] = layer
        fc_kinds[index - 1] = "tt"
    new.conv_kinds = tuple(kinds)
    new.fc_kinds = tuple(fc_kinds)
    return new
