"""CIFAR ResNets (He et al. 2016, Section 4.2) and a small CNN, in Flax NNX.

The CIFAR ResNet of depth ``6n + 2``: a 3x3 conv with ``width`` channels, three stages of ``n``
BasicBlocks (two 3x3 convs each) with ``width``, ``2 width`` and ``4 width`` channels and a
stride-2 first block in stages 2 and 3, global average pooling and a linear classifier. With
``width=16`` this is ResNet-20/32/56/110 for ``n = 3/5/9/18``.

Every conv is a plain ``nnx.Conv(..., use_bias=False)`` followed by ``nnx.BatchNorm``, so that
:func:`train.find_convs_nnx` finds every conv kernel by tracing. All 3x3 convs (and the 1x1
projection convs of option B) use the model's ``padding``: ``'SAME'`` (zero padding; for a stride-2
3x3 conv on an even input XLA pads ``(0, 1)``) or ``'CIRCULAR'`` (periodic, the operator whose
singular values :func:`spectra.frequency_matrices` gives exactly; the exact circular spectrum
needs every stride to divide its input, e.g. sizes divisible by 4 for the two stride-2 stages).
For a 1x1 conv both paddings are the same operator (no padding).

Shortcuts (He et al. 2016, Section 3.3), used where a block changes the shape (the first block
of stages 2 and 3); elsewhere the shortcut is the identity:

* option ``'A'`` (the paper's CIFAR choice): parameter-free, ``x[:, ::2, ::2, :]`` followed by
  zero padding of the channels, ``(c_out - c_in) // 2`` zero channels before and the rest after;
* option ``'B'``: a projection, 1x1 conv with stride 2 (``use_bias=False``) + BatchNorm.

Initialisation: conv kernels ``N(0, 2 / fan_in)`` (He et al. 2015, "kaiming normal", untruncated,
``fan_in = kh * kw * c_in``); BatchNorm scale 1, bias 0; the classifier keeps Flax's default
(LeCun normal kernel, zero bias). BatchNorm uses ``momentum=0.9`` (PyTorch's 0.1) and
``epsilon=1e-5``; as for any ``nnx.BatchNorm`` a fresh model is in training mode (batch
statistics, running averages updated): call ``model.eval()`` for inference with the running
averages and ``model.train()`` to go back.

Trainable parameter counts (``nnx.Param`` only: BatchNorm running statistics are
``nnx.BatchStat`` and not counted), 10 classes, 3 input channels, ``width=16``, exact:

============  ==========  ==========
model         option A    option B
============  ==========  ==========
ResNet-20     269,722     272,474
ResNet-32     464,154     466,906
ResNet-56     853,018     855,770
ResNet-110    1,727,962   1,730,714
============  ==========  ==========

(Option B adds the two projections, ``16*32 + 2*32 + 32*64 + 2*64 = 2,752`` parameters; the
figure 0.27M of the paper's Table 6 is ResNet-20 with either.)

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

#: Paddings a model's convs may use.
PADDINGS = ("SAME", "CIRCULAR")
#: Shortcut options of He et al. (2016): ``'A'`` zero-pad identity, ``'B'`` 1x1 projection.
SHORTCUTS = ("A", "B")
#: Normalisation after each conv of the ResNets: ``nnx.BatchNorm`` (the paper's), the mean-only
#: :class:`train.batchnorm.BatchCentering` (a translation in evaluation mode: 1-Lipschitz),
#: none (the identity), or :class:`train.capped_batchnorm.CappedBatchNorm` (``'capped'``: the
#: folded conv + BatchNorm operator capped at ``σ_max <= cap`` in the forward pass).
NORMS = ("batchnorm", "centering", "none", "capped")

#: He et al. (2015) initialisation, ``N(0, 2 / fan_in)`` (not truncated).
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r}: expected one of {PADDINGS}")
    return padding


def he_conv(
    c_in: int, c_out: int, kernel_size: int, strides: int, padding: str, param_dtype, rngs
) -> nnx.Conv:
    """A square ``kernel_size`` ``nnx.Conv`` without bias, He-initialised
    (:data:`conv_kernel_init`): the convs of the ResNets and of :mod:`train.models.garipov`."""
    return nnx.Conv(
        c_in,
        c_out,
        (kernel_size, kernel_size),
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_init=conv_kernel_init,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def batch_norm(features: int, param_dtype, rngs) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` with ``momentum=0.9``, ``epsilon=1e-5`` (scale 1, bias 0): the
    BatchNorm of the ResNets and of :mod:`train.models.garipov`. Its running statistics have
    ``param_dtype`` too (``nnx.BatchNorm`` makes them float32 always: a float64 model in
    training mode would write float64 batch statistics into them, which JAX deprecates)."""
    bn = nnx.BatchNorm(
        features,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    if jnp.dtype(param_dtype) != bn.mean.dtype:
        bn.mean = nnx.BatchStat(jnp.asarray(bn.mean[...], param_dtype))
        bn.var = nnx.BatchStat(jnp.asarray(bn.var[...], param_dtype))
    return bn


def norm_layer(
    norm: str, features: int, param_dtype, rngs, capped: dict | None = None
) -> nnx.Module | None:
    """The normalisation after a conv: :func:`batch_norm` for ``'batchnorm'``, a
    :class:`train.batchnorm.BatchCentering` (``momentum=0.9``, learned bias) for
    ``'centering'``, ``None`` (nothing) for ``'none'``, a
    :class:`train.capped_batchnorm.CappedBatchNorm` (``momentum=0.9``, ``epsilon=1e-5``; its
    ``cap``, ``spec``, ``kernel_shape``, ``estimate`` from ``capped``) for ``'capped'``."""
    if norm == "capped":
        from train.capped_batchnorm import CappedBatchNorm

        if capped is None:
            raise ValueError("norm='capped' needs capped=dict(cap, spec, kernel_shape, ...)")
        return CappedBatchNorm(
            features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, param_dtype=param_dtype,
            rngs=rngs, **capped,
        )
    if norm == "batchnorm":
        return batch_norm(features, param_dtype, rngs)
    if norm == "centering":
        from train.batchnorm import BatchCentering

        return BatchCentering(
            features, momentum=_BN_MOMENTUM, param_dtype=param_dtype, rngs=rngs
        )
    if norm == "none":
        return None
    raise ValueError(f"norm={norm!r}: expected one of {NORMS}")


def _apply_norm(layer: nnx.Module | None, x: jax.Array) -> jax.Array:
    return x if layer is None else layer(x)


def _conv_norm(conv: nnx.Conv, layer: nnx.Module | None, x: jax.Array) -> jax.Array:
    """``layer(conv(x))``; a capped BatchNorm also gets the conv's kernel."""
    from train.capped_batchnorm import CappedBatchNorm

    if isinstance(layer, CappedBatchNorm):
        return layer(conv(x), conv.kernel[...])
    return _apply_norm(layer, conv(x))


def _capped(cap, estimate, size, kernel, stride, padding, c_in, c_out) -> dict | None:
    """The :class:`train.capped_batchnorm.CappedBatchNorm` arguments of a conv on a
    ``size`` input (``None`` when ``cap`` is ``None``: not capped)."""
    if cap is None:
        return None
    from spectra import ConvSpec

    return dict(
        cap=cap, estimate=estimate, kernel_shape=(kernel, kernel, c_in, c_out),
        spec=ConvSpec(tuple(size), strides=stride, padding=padding),
    )


def _out_size(size, stride: int) -> tuple[int, int]:
    return tuple(-(-n // stride) for n in size)


def _check_capped(norm: str, cap, input_size, cap_estimate: str = "circulant") -> tuple | None:
    from train.capped_batchnorm import ESTIMATES
    from train.capped_batchnorm import check_cap

    if cap_estimate not in ESTIMATES:
        raise ValueError(f"cap_estimate={cap_estimate!r}: expected one of {ESTIMATES}")
    if norm != "capped":
        if cap is not None:
            raise ValueError(f"cap={cap!r} is only used with norm='capped' (norm={norm!r})")
        return None
    check_cap(cap)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if (
        input_size is None
        or len(tuple(input_size)) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in input_size)
    ):
        raise ValueError(
            f"input_size={input_size!r}: norm='capped' needs the input's (H, W) (ints >= 1)"
        )
    return tuple(input_size)


def shortcut_option_a(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
    """Parameter-free shortcut (option A): spatial subsampling and zero channels.

    Args:
      x: ``(N, H, W, C_in)`` activations.
      out_channels: ``C_out >= C_in``.
      stride: spatial subsampling, ``x[:, ::stride, ::stride, :]``.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), C_out)``: ``(C_out - C_in) // 2`` zero channels,
      then ``x``'s channels, then the remaining zero channels.
    """
    in_channels = x.shape[-1]
    if out_channels < in_channels:
        raise ValueError(
            f"out_channels={out_channels} must be >= the input's {in_channels} channels"
        )
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_channels - in_channels
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs.

    Args:
      in_channels: channels of the input.
      out_channels: channels of the output (and of both convs).
      stride: stride of ``conv1`` (and of the shortcut when it is not the identity).
      padding: ``'SAME'`` or ``'CIRCULAR'``, for every conv of the block.
      shortcut: ``'A'`` or ``'B'``; only used when ``stride != 1`` or the channels change.
      norm: the normalisation after each conv, one of :data:`NORMS` (``bn1``, ``bn2`` and
        ``proj_bn`` are ``None`` for ``'none'``).
      cap, input_size, cap_estimate: for ``norm='capped'``: the cap ``c``, the block input's
        ``(H, W)`` and the :class:`train.capped_batchnorm.CappedBatchNorm` ``estimate``.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        padding: str = "SAME",
        shortcut: str = "A",
        norm: str = "batchnorm",
        cap: float | None = None,
        input_size: int | Sequence[int] | None = None,
        cap_estimate: str = "circulant",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_padding(padding)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r}: expected one of {SHORTCUTS}")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
        size = _check_capped(norm, cap, input_size, cap_estimate)
        cap = cap if size is not None else None
        mid = None if size is None else _out_size(size, stride)
        c1 = _capped(cap, cap_estimate, size, 3, stride, padding, in_channels, out_channels)
        c2 = _capped(cap, cap_estimate, mid, 3, 1, padding, out_channels, out_channels)
        self.conv1 = he_conv(in_channels, out_channels, 3, stride, padding, param_dtype, rngs)
        self.bn1 = nnx.data(norm_layer(norm, out_channels, param_dtype, rngs, c1))
        self.conv2 = he_conv(out_channels, out_channels, 3, 1, padding, param_dtype, rngs)
        self.bn2 = nnx.data(norm_layer(norm, out_channels, param_dtype, rngs, c2))
        self.out_channels = out_channels
        self.stride = stride
        self.identity = stride == 1 and in_channels == out_channels
        self.shortcut = shortcut
        if not self.identity and shortcut == "B":
            self.proj = he_conv(in_channels, out_channels, 1, stride, padding, param_dtype, rngs)
            cp = _capped(cap, cap_estimate, size, 1, stride, padding, in_channels, out_channels)
            self.proj_bn = nnx.data(norm_layer(norm, out_channels, param_dtype, rngs, cp))
        else:
            self.proj = nnx.data(None)
            self.proj_bn = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, C_in) -> (N, H / stride, W / stride, C_out)`` (ceil for SAME)."""
        out = nnx.relu(_conv_norm(self.conv1, self.bn1, x))
        out = _conv_norm(self.conv2, self.bn2, out)
        if self.identity:
            residual = x
        elif self.proj is not None:
            residual = _conv_norm(self.proj, self.proj_bn, x)
        else:
            residual = shortcut_option_a(x, self.out_channels, self.stride)
        return nnx.relu(out + residual)


class ResNet(nnx.Module):
    """CIFAR ResNet of He et al. (2016): depth ``6n + 2``, three stages of ``n`` BasicBlocks.

    Layout: conv3x3(``in_channels -> width``) + BN + ReLU; stage 1 (``width`` channels), stage 2
    (``2 width``), stage 3 (``4 width``), each of ``n`` blocks whose first block has stride
    ``stage_strides[stage]`` (``(1, 2, 2)`` in the paper); global average pooling over H, W;
    ``nnx.Linear(4 width, num_classes)``. See the module docstring for the shortcut options,
    initialisation and parameter counts (which do not depend on ``stage_strides``).

    Small inputs: on 8x8 digits the paper's strides leave stage 3 at 2x2, which the layers
    handle, but :class:`spectra.ConvSpec` (hence :func:`train.find_convs_nnx`) rejects a 3x3 conv
    on an input smaller than 3x3; ``stage_strides=(1, 2, 1)`` keeps every conv input of an 8x8
    image at least 4x4.

    Args:
      depth: ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, ...).
      num_classes: number of logits.
      in_channels: channels of the input images (3 for CIFAR, 1 for 8x8 digits).
      padding: ``'SAME'`` (zero) or ``'CIRCULAR'`` (periodic) padding of every conv.
      shortcut: ``'A'`` (zero-pad identity, parameter-free) or ``'B'`` (1x1 conv + BN projection).
      width: channels of the first stage (16 in the paper).
      stage_strides: strides of the first block of each of the 3 stages, each 1 or 2.
      norm: the normalisation after every conv, one of :data:`NORMS`: ``'batchnorm'`` (the
        paper's, default), ``'centering'`` (:class:`train.batchnorm.BatchCentering`, mean-only:
        1-Lipschitz in evaluation mode, so the network's certified bound is that of its convs,
        shortcuts and classifier), ``'none'`` or ``'capped'``
        (:class:`train.capped_batchnorm.CappedBatchNorm`: every conv + BatchNorm folded
        operator capped at ``σ_max <= cap`` in the forward pass, training and evaluation mode).
      cap: ``c > 0`` for ``norm='capped'`` (else ``None``).
      input_size: the input images' ``(H, W)`` (or one int) for ``norm='capped'`` (the power
        vectors' sizes); :func:`train.models.registry.build_model` passes the dataset's.
      cap_estimate: the ``estimate`` of the capped layers (``'circulant'``: the circulant
        embedding's σ_max, the quantity the certification bounds; or ``'padded'``).
      param_dtype: dtype of the parameters (float32 by default).
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = ResNet(20, 10, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        in_channels: int = 3,
        padding: str = "SAME",
        shortcut: str = "A",
        width: int = 16,
        stage_strides: Sequence[int] = (1, 2, 2),
        norm: str = "batchnorm",
        cap: float | None = None,
        input_size: int | Sequence[int] | None = None,
        cap_estimate: str = "circulant",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
        size = _check_capped(norm, cap, input_size, cap_estimate)
        stage_strides = tuple(stage_strides)
        if len(stage_strides) != 3 or any(s not in (1, 2) for s in stage_strides):
            raise ValueError(f"stage_strides={stage_strides}: expected 3 strides, each 1 or 2")
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r}: expected 6n + 2 with n >= 1 (20, 32, 56, 110, ...)")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: expected >= 1")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}: expected >= 1")
        if width < 1:
            raise ValueError(f"width={width}: expected >= 1")
        _check_padding(padding)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r}: expected one of {SHORTCUTS}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.padding = padding
        self.shortcut = shortcut
        self.stage_strides = stage_strides
        self.norm = norm
        self.conv = he_conv(in_channels, width, 3, 1, padding, param_dtype, rngs)
        self.bn = nnx.data(norm_layer(norm, width, param_dtype, rngs, _capped(
            cap, cap_estimate, size, 3, 1, padding, in_channels, width)))
        blocks = []
        channels = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for index in range(n):
                stride = stage_strides[stage] if index == 0 else 1
                blocks.append(
                    BasicBlock(
                        channels,
                        stage_width,
                        stride,
                        padding=padding,
                        shortcut=shortcut,
                        norm=norm,
                        cap=cap,
                        input_size=size,
                        cap_estimate=cap_estimate,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
                channels = stage_width
                if size is not None:
                    size = _out_size(size, stride)
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(channels, num_classes, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels)`` images -> ``(N, num_classes)`` logits."""
        x = nnx.relu(_conv_norm(self.conv, self.bn, x))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def resnet20(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-20 (``n = 3``); ``kwargs`` go to :class:`ResNet` (``rngs`` is required)."""
    return ResNet(20, num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-32 (``n = 5``); ``kwargs`` go to :class:`ResNet` (``rngs`` is required)."""
    return ResNet(32, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-56 (``n = 9``); ``kwargs`` go to :class:`ResNet` (``rngs`` is required)."""
    return ResNet(56, num_classes, **kwargs)


def resnet110(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-110 (``n = 18``); ``kwargs`` go to :class:`ResNet` (``rngs`` is required)."""
    return ResNet(110, num_classes, **kwargs)


class SimpleCNN(nnx.Module):
    """A small CNN for fast tests and quick presets (no BatchNorm).

    ``len(features)`` 3x3 convs (``use_bias=True``, He-normal kernels) with ReLU, the first with
    stride 1 and the others with stride 2, then global average pooling and a linear classifier.
    With the default ``features=(16, 32, 32)`` and 10 classes it has
    ``9 * in_channels * 16 + 16 + 9*16*32 + 32 + 9*32*32 + 32 + 32*10 + 10`` parameters
    (14,378 for ``in_channels=1``, 14,666 for 3), exactly.

    Args:
      num_classes: number of logits.
      in_channels: channels of the input images.
      padding: ``'SAME'`` or ``'CIRCULAR'``, for every conv.
      features: output channels of the convs (at least one).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> SimpleCNN(10, in_channels=1, rngs=nnx.Rngs(0))(jnp.zeros((4, 8, 8, 1))).shape
      (4, 10)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        padding: str = "SAME",
        features: Sequence[int] = (16, 32, 32),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_padding(padding)
        features = tuple(features)
        if not features or min(features) < 1:
            raise ValueError(f"features={features}: expected a non-empty sequence of positive ints")
        convs = []
        channels = in_channels
        for index, out in enumerate(features):
            convs.append(
                nnx.Conv(
                    channels,
                    out,
                    (3, 3),
                    strides=1 if index == 0 else 2,
                    padding=padding,
                    kernel_init=conv_kernel_init,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            )
            channels = out
        self.convs = nnx.List(convs)
        self.head = nnx.Linear(channels, num_classes, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels)`` images -> ``(N, num_classes)`` logits."""
        for conv in self.convs:
            x = nnx.relu(conv(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (``nnx.Param`` leaves; BatchNorm statistics excluded)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
