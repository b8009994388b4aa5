r"""1-Lipschitz building blocks in Flax NNX: norm-preserving activations, a residual block bounded
as one operator, a normalised last layer.

A network is ``L``-Lipschitz in ℓ2 when every map it composes is; these layers make each map's
constant at most 1 by construction (activations, last layer) or keep it at most 1 with the
certified projection of the conv kernels, ``train.project_conv_operator_norm(1.0, specs,
method='certified')`` (zero-padded convs included: the exact σ_max of the real layer, see the
README section "Projection onto an operator-norm ball"):

* :class:`MaxMin` (Anil et al. 2019; "MinMax" in LiResNet): the channels split in two halves
  ``a, b``; the output is ``(max(a, b), min(a, b))``. :class:`GroupSort`: the channels in
  groups of ``group_size`` consecutive channels, each group sorted (ascending). Both permute
  the coordinates of each group, so at every point where no two compared entries are equal
  (almost everywhere) the Jacobian is a permutation matrix: orthogonal, **gradient-norm
  preserving**; and both are **exactly 1-Lipschitz** in ℓ2 (sorting a vector is 1-Lipschitz
  in every ℓp: the rearrangement inequality).
* :class:`LipResidualBlock`: ``y = act(K ⋆ x + b)`` with ``K = I + W`` **one** conv kernel (the
  identity tap added to the centre of the residual kernel ``W``), as in LiResNet (Hu et al.
  2023): the block's linear part ``x + W ⋆ x`` is a single conv operator, whose exact σ_max the
  certified projection keeps ≤ 1. The kernel parameter *is* ``K`` (initialised at the identity
  tap plus a small residual ``W``), so :func:`train.find_convs` sees the operator that the
  block applies, not ``W`` alone (for which ``1 + σ_max(W)`` would be the only bound).
* :class:`OrthogonalConv`: a conv whose kernel is computed in the forward pass from a params
  matrix ``M`` (``k² C_in x C_out``): its polar factor ``U Vᵀ`` (every singular value 1) over
  ``ceil(k / stride)``. Its σ_max is at most 1 (proven: see the class), and it is
  gradient-norm preserving where the bound is tight: a non-overlapping stride ``= k``
  (space-to-depth then an orthogonal ``1x1``: every singular value of the operator is 1), or
  stride 1 with ``C_out >= k² C_in`` (an isometry on inputs zero within ``k // 2`` pixels of
  the border).
* :class:`NormalizedDense`: a dense layer whose weight is normalised in the forward pass:
  ``'rows'`` divides each logit's weight vector by its ℓ2 norm (each logit 1-Lipschitz; the
  logit vector then has constant ``||W_n||_2 <= sqrt(num_classes)``), ``'spectral'`` divides
  the matrix by ``max(1, σ_max(W))`` (exact SVD: the logit vector is 1-Lipschitz).

The activation constants that :func:`train.report.network_report` certifies: ReLU and
``abs`` exactly 1; :class:`MaxMin` (written as ``reduce_max`` / ``reduce_min`` over the pair
axis, then a concatenation) and :class:`GroupSort` (a ``sort``) exactly 1, in both the
composition and the midpoint bound: per-group sorting is 1-Lipschitz by the rearrangement
inequality (:data:`train.report._lipschitz.SORTING_LIPSCHITZ`); a max and a min of different
values or over different axes keep the concatenation's ``sqrt(1 + 1)``.

References:
  C. Anil, J. Lucas, R. Grosse, "Sorting out Lipschitz function approximation", ICML 2019.
  K. Hu, A. Zou, Z. Wang, K. Leino, M. Fredrikson, "Unlocking Deterministic Robustness
  Certification on ImageNet" (LiResNet), NeurIPS 2023.
  Y. Tsuzuku, I. Sato, M. Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

#: Activations of the 1-Lipschitz models, each with ℓ2 Lipschitz constant 1 (proven):
#: ``'maxmin'``, ``'groupsort<k>'`` (e.g. ``'groupsort4'``), ``'abs'``, ``'relu'``.
ACTIVATIONS = ("maxmin", "groupsort<k>", "abs", "relu")
#: Normalisations of :class:`NormalizedDense`.
NORMALIZATIONS = ("rows", "spectral", "orthogonal")


def _check_channels(x: jax.Array, group_size: int, name: str) -> int:
    channels = x.shape[-1]
    if channels % group_size:
        raise ValueError(
            f"{name}: the input's last axis ({channels} channels) must be divisible by "
            f"{group_size}"
        )
    return channels


def max_min(x: jax.Array) -> jax.Array:
    """MaxMin over the last axis: halves ``a = x[..., :C/2]``, ``b = x[..., C/2:]`` ->
    ``concat(max(a, b), min(a, b))``.

    Exactly 1-Lipschitz in ℓ2 and gradient-norm preserving (a.e. a permutation of each pair).
    Written with ``reduce_max`` / ``reduce_min`` over a pair axis so that a network report can
    read it.

    Args:
      x: ``(..., C)`` with ``C`` even.

    Returns:
      ``(..., C)``.
    """
    channels = _check_channels(x, 2, "MaxMin")
    pairs = x.reshape(*x.shape[:-1], 2, channels // 2)
    return jnp.concatenate([jnp.max(pairs, axis=-2), jnp.min(pairs, axis=-2)], axis=-1)


def group_sort(x: jax.Array, group_size: int) -> jax.Array:
    """GroupSort over the last axis: groups of ``group_size`` consecutive channels, each sorted
    ascending. Exactly 1-Lipschitz in ℓ2, gradient-norm preserving (a.e. a permutation).

    Args:
      x: ``(..., C)`` with ``C`` divisible by ``group_size``.
      group_size: ``>= 1`` (1: the identity).

    Returns:
      ``(..., C)``.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: expected an int >= 1")
    channels = _check_channels(x, group_size, "GroupSort")
    if group_size == 1:
        return x
    groups = x.reshape(*x.shape[:-1], channels // group_size, group_size)
    return jnp.sort(groups, axis=-1).reshape(x.shape)


class MaxMin(nnx.Module):
    """The MaxMin activation (:func:`max_min`): 1-Lipschitz, gradient-norm preserving.

    Example:
      >>> import jax.numpy as jnp
      >>> MaxMin()(jnp.array([1.0, -2.0, 3.0, 5.0]))
      Array([ 3.,  5.,  1., -2.], dtype=float32)
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_min(x)


class GroupSort(nnx.Module):
    """The GroupSort activation (:func:`group_sort`): 1-Lipschitz, gradient-norm preserving.

    Args:
      group_size: channels per sorted group (2 sorts pairs of consecutive channels).

    Example:
      >>> import jax.numpy as jnp
      >>> GroupSort(2)(jnp.array([1.0, -2.0, 5.0, 3.0]))
      Array([-2.,  1.,  3.,  5.], dtype=float32)
    """

    def __init__(self, group_size: int = 2):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r}: expected an int >= 1")
        self.group_size = group_size

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_sort(x, self.group_size)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The 1-Lipschitz activation named ``name`` (one of :data:`ACTIVATIONS`)."""
    key = name.lower()
    if key == "maxmin":
        return max_min
    if key == "abs":
        return jnp.abs
    if key == "relu":
        return jax.nn.relu
    if key.startswith("groupsort") and key[len("groupsort"):].isdigit():
        size = int(key[len("groupsort"):])
        if size >= 1:
            return lambda x: group_sort(x, size)
    raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS}")


def identity_kernel(kernel_size: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """The HWIO kernel of the identity map: ``1`` on the centre tap, channel ``i`` -> ``i``.

    With SAME (zero) or circular padding and stride 1, its conv is the identity operator
    (σ_max exactly 1) for an odd ``kernel_size``.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size}: expected an odd int >= 1")
    c = kernel_size // 2
    kernel = jnp.zeros((kernel_size, kernel_size, channels, channels), dtype)
    return kernel.at[c, c].set(jnp.eye(channels, dtype=dtype))


class LipResidualBlock(nnx.Module):
    r"""A residual block bounded as one operator: ``y = act((I + W) ⋆ x + b)``.

    The conv kernel ``conv.kernel`` is ``K = I + W`` itself (:func:`identity_kernel` plus the
    residual ``W``, initialised ``N(0, init_scale² / fan_in)``), a ``channels -> channels``
    conv with stride 1 and the block's ``padding``. The map ``x -> x + W ⋆ x`` is exactly the
    conv with ``K``, so its Lipschitz constant is ``σ_max(K)`` (exact, the operator at the
    layer's real input size and padding), not the triangle inequality's ``1 + σ_max(W)``.
    Trained with ``train.project_conv_operator_norm(1.0, specs, method='certified')``
    (``TrainConfig(project_max_norm=1.0)``), ``σ_max(K) <= 1`` after every projected update,
    and the block is 1-Lipschitz (the bias adds a constant; the activation is 1-Lipschitz).

    Args:
      channels: input and output channels.
      kernel_size: odd spatial size of ``K`` (3).
      padding: ``'SAME'`` (zeros) or ``'CIRCULAR'``.
      activation: one of :data:`ACTIVATIONS`, or ``None`` (the linear block).
      init_scale: standard deviation of the residual ``W`` times ``sqrt(fan_in)``.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> block = LipResidualBlock(4, init_scale=0.0, activation=None, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(64.0).reshape(1, 4, 4, 4)
      >>> bool(jnp.allclose(block(x), x))  # K = I at init_scale 0: the identity.
      True
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 3,
        padding: str = "SAME",
        activation: str | None = "maxmin",
        init_scale: float = 0.1,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels < 1:
            raise ValueError(f"channels={channels}: expected >= 1")
        if padding not in ("SAME", "CIRCULAR"):
            raise ValueError(f"padding={padding!r}: expected 'SAME' or 'CIRCULAR'")
        if init_scale < 0:
            raise ValueError(f"init_scale={init_scale}: expected >= 0")
        eye = identity_kernel(kernel_size, channels, param_dtype)
        residual = nnx.initializers.variance_scaling(init_scale**2, "fan_in", "normal")

        def kernel_init(key, shape, dtype=param_dtype):
            return eye.astype(dtype) + residual(key, shape, dtype)

        self.conv = nnx.Conv(
            channels,
            channels,
            (kernel_size, kernel_size),
            padding=padding,
            use_bias=True,
            kernel_init=kernel_init,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.kernel_size = kernel_size
        if activation is not None:
            activation_fn(activation)  # Checks the name.
        self.activation = activation

    @property
    def residual_kernel(self) -> jax.Array:
        """``W = K - I``: the residual branch's kernel."""
        kernel = self.conv.kernel[...]
        return kernel - identity_kernel(self.kernel_size, kernel.shape[-1], kernel.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, C) -> (N, H, W, C)``."""
        y = self.conv(x)
        return y if self.activation is None else activation_fn(self.activation)(y)


def normalized_weight(kernel: jax.Array, normalize: str) -> jax.Array:
    """The weight :class:`NormalizedDense` applies (flax ``(in, out)`` layout).

    ``'rows'``: each output's weight vector (a column of ``kernel``) divided by its ℓ2 norm;
    ``'spectral'``: ``kernel / max(1, σ_max(kernel))`` (exact largest singular value);
    ``'orthogonal'``: the polar factor ``U Vᵀ`` of ``kernel = U S Vᵀ`` (thin SVD; every singular
    value 1: gradient-norm preserving on its row space, σ_max exactly 1 up to rounding).
    """
    if normalize == "rows":
        norms = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0, keepdims=True))
        return kernel / jnp.maximum(norms, jnp.finfo(kernel.dtype).tiny)
    if normalize == "spectral":
        sigma = jnp.linalg.svd(kernel, compute_uv=False)[0]
        return kernel / jnp.maximum(sigma, 1.0)
    if normalize == "orthogonal":
        # The polar factor U Vᵀ of kernel = U S Vᵀ: every singular value 1 (orthonormal
        # columns for in >= out), the nearest such matrix to ``kernel`` in Frobenius norm.
        u, _, vt = jnp.linalg.svd(kernel, full_matrices=False)
        return u @ vt
    raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")


class OrthogonalConv(nnx.Module):
    r"""A norm-1 conv whose kernel is an orthogonal matrix, reshaped: gradient-norm preserving.

    The parameter is a matrix ``M`` of shape ``(k² C_in, C_out)`` (taps and input channels ×
    output channels); the conv applies the HWIO kernel ``K = polar(M) (1 - 2⁻¹⁶) / n`` (the
    factor absorbs the float32 SVD's rounding) reshaped to
    ``(k, k, C_in, C_out)``, with ``polar(M) = U Vᵀ`` (``M = U S Vᵀ``, thin SVD: every singular
    value 1) and ``n = ceil(k / stride)``, zero (``'SAME'``) padding. Each output pixel is
    ``Kᵀ`` applied to its input patch, and each input pixel lies in at most ``n²`` patches, so
    ``||conv(x)||² <= ||polar(M)||² / n² · n² ||x||² = ||x||²``: **σ_max <= 1** (proven;
    :func:`train.report.network_report` computes the exact norm of the applied kernel, the SVD's
    rounding included). Where every pixel lies in exactly ``n²`` patches the bound is reached
    on the row space of ``polar(M)``:

    * ``stride = k`` (non-overlapping patches, ``n = 1``; image sides divisible by ``k``): the
      operator is block diagonal with blocks ``polar(M)ᵀ``, every nonzero singular value is
      exactly 1 (space-to-depth followed by an orthogonal ``1x1`` conv): a co-isometry when
      ``C_out <= k² C_in``, an isometry when ``C_out >= k² C_in``;
    * ``stride = 1`` and ``C_out >= k² C_in`` (``polar(M)`` has orthonormal rows): an isometry
      on the inputs that are zero within ``k // 2`` pixels of the border (zero padded images),
      and at most 1 elsewhere.

    Args:
      in_channels: ``C_in``.
      out_channels: ``C_out``.
      kernel_size: ``k`` (odd for ``stride = 1``, so that ``'SAME'`` is centred).
      stride: ``1`` or ``kernel_size``.
      use_bias: add a bias (does not change the Lipschitz constant).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> conv = OrthogonalConv(2, 8, kernel_size=2, stride=2, use_bias=False, rngs=nnx.Rngs(0))
      >>> conv.kernel().shape
      (2, 2, 2, 8)
      >>> x = jnp.arange(32.0).reshape(1, 4, 4, 2)  # 8 = 2² · 2 channels: an isometry.
      >>> bool(jnp.allclose(jnp.linalg.norm(conv(x)), jnp.linalg.norm(x), rtol=1e-4))
      True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels={in_channels}, out_channels={out_channels}: expected >= 1")
        if kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size}: expected >= 1")
        if stride not in (1, kernel_size):
            raise ValueError(f"stride={stride}: expected 1 or kernel_size ({kernel_size})")
        if stride == 1 and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}: expected odd with stride 1")
        # Not an orthogonal init: the SVD's derivative divides by s_i² - s_j², infinite at
        # equal singular values (the polar factor of a Gaussian matrix is already orthogonal).
        init = nnx.initializers.lecun_normal()
        rows = kernel_size * kernel_size * in_channels
        self.weight = nnx.Param(init(rngs.params(), (rows, out_channels), param_dtype))
        self.bias = (
            nnx.Param(jnp.zeros((out_channels,), param_dtype)) if use_bias else nnx.data(None)
        )
        self.kernel_size = kernel_size
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels

    def kernel(self) -> jax.Array:
        """The HWIO kernel applied: ``polar(M) (1 - 2⁻¹⁶) / ceil(k / stride)``,
        ``(k, k, C_in, C_out)``."""
        k, s = self.kernel_size, self.stride
        # (1 - 2⁻¹⁶): the float32 SVD's polar factor has singular values 1 ± a few ulps; the
        # margin keeps the applied kernel's exact norm <= 1 (measured 1 + 1.7e-6 without it).
        q = normalized_weight(self.weight[...], "orthogonal") * ((1 - 2.0**-16) / (-(-k // s)))
        return q.reshape(k, k, self.in_channels, self.out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, C_in) -> (N, H / stride, W / stride, C_out)`` (``'SAME'`` padding)."""
        y = jax.lax.conv_general_dilated(
            x, self.kernel().astype(x.dtype), (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else y + self.bias[...]


class NormalizedDense(nnx.Module):
    r"""A dense layer ``y = x W_n + b`` with its weight normalised in the forward pass.

    * ``normalize='rows'`` (last-layer normalisation): each logit ``y_j = <w_j, x> / ||w_j|| +
      b_j`` is 1-Lipschitz, and a difference of two logits is at most
      ``||w_i/||w_i|| - w_j/||w_j|| || <= 2``-Lipschitz; the logit vector's ℓ2 constant is
      ``||W_n||_2 <= ||W_n||_F = sqrt(out_features)``, computed exactly by
      :func:`train.report.network_report` (an SVD of the normalised weight), and that is the
      ``L`` of the certificate ``margin > sqrt(2) ε L`` (:func:`train.certified_accuracy`).
    * ``normalize='spectral'``: ``W_n = W / max(1, σ_max(W))`` (exact SVD, differentiable):
      the logit vector is 1-Lipschitz, so a network of 1-Lipschitz layers ending with it has
      ``L <= 1``.
    * ``normalize='orthogonal'``: ``W_n = U Vᵀ``, the polar factor of ``W = U S Vᵀ`` (all
      singular values 1): 1-Lipschitz like ``'spectral'`` (up to the SVD's rounding, which the
      report's exact norm of the applied weight accounts for), and no logit direction is
      shrunk, so the realised Jacobian norm can reach the bound.

    Args:
      in_features: inputs.
      out_features: outputs (logits).
      normalize: one of :data:`NORMALIZATIONS`.
      use_bias: add a bias (it does not change the Lipschitz constant).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = NormalizedDense(3, 2, rngs=nnx.Rngs(0))
      >>> w = normalized_weight(layer.kernel[...], 'spectral')
      >>> bool(jnp.linalg.norm(w, 2) <= 1.0 + 1e-6)
      True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        normalize: str = "spectral",
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features}, out_features={out_features}: expected >= 1"
            )
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)
        )
        self.normalize = normalize

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., in_features) -> (..., out_features)``."""
        y = x @ normalized_weight(self.kernel[...], self.normalize)
        if self.bias is not None:
            y = y + self.bias[...]
        return y
