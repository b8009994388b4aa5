"""Conv and dense layers trained in SVD form ``W = U diag(|s|) V^T`` (Yang et al. 2020).

"SVD training" (Yang, Tang, Wen, Yan, Li, Chen; CVPR Workshops 2020, arXiv:2004.09031) keeps
every layer as three trainable factors: ``U`` and ``V`` (pushed towards orthonormal columns by
:func:`train.regularizers.orthogonality_loss`) and a vector ``s`` (pushed towards sparsity by
:func:`train.regularizers.sparsity_loss`); the singular values whose energy is negligible are
then pruned (:mod:`train.pruning`). No SVD is computed while training.

* :class:`SVDConv`: a 2-D conv (HWIO kernels, NHWC inputs, cross-correlation as
  ``lax.conv_general_dilated`` and ``nnx.Conv``) with the kernel reshaped to a matrix either
  channel-wise or spatial-wise (see :data:`DECOMPOSITIONS`), run as two thin convs;
* :class:`SVDDense`: ``y = x @ U diag(|s|) V^T + b`` (flax ``Linear`` convention, ``(in, out)``);
* :func:`path_name`: the one path format (``'blocks/0/conv1'``) of the SVD layers.

A whole model goes to SVD form with :func:`train.layers.svd_decompose.decompose`, and
:func:`train.layers.svd_decompose.svd_layers` lists its SVD layers.

Whatever ``U`` and ``V`` are, ``to_dense()`` is the exact kernel that the layer applies; ``|s|``
are its singular values only when ``U`` and ``V`` have orthonormal columns (exactly after
``from_dense``; approximately while training with the orthogonality loss).

Length (~630 lines): one layer family. :class:`SVDConv` and :class:`SVDDense` share their
factors (``_SVDFactors``), the kernel <-> matrix views (:func:`kernel_to_matrix`,
:func:`matrix_to_kernel`, :func:`factor_shape`) and the initialisation; model-level surgery
lives in :mod:`train.layers.svd_decompose`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from spectra import normalize_padding
from spectra._spec import normalize_pair

#: Ways to view an HWIO kernel ``(kh, kw, c_in, c_out)`` as a matrix ``(a, b)``:
#: ``'channel'``: ``(c_out, kh kw c_in)``; ``'spatial'``: ``(c_in kh, c_out kw)``.
DECOMPOSITIONS = ("channel", "spatial")

#: String paddings :class:`SVDConv` accepts (the ones of ``nnx.Conv`` for 2-D convs).
SVD_CONV_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT")

#: Names of the three factor parameters of an SVD layer, ``W = U diag(|s|) V^T``.
FACTOR_NAMES = ("svd_u", "svd_s", "svd_v")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Pads = tuple[tuple[int, int], tuple[int, int]]


def factor_shape(
    decomposition: str, in_features: int, out_features: int, kernel_size: Sequence[int]
) -> tuple[int, int]:
    """``(a, b)``: the shape of the matrix view of an HWIO kernel.

    ``'channel'``: ``(c_out, kh kw c_in)``; ``'spatial'``: ``(c_in kh, c_out kw)``.

    Raises:
      ValueError: naming ``decomposition`` when it is not in :data:`DECOMPOSITIONS`.
    """
    kh, kw = kernel_size
    if decomposition == "channel":
        return out_features, kh * kw * in_features
    if decomposition == "spatial":
        return in_features * kh, out_features * kw
    raise ValueError(
        f"decomposition={decomposition!r} is unknown; expected one of {DECOMPOSITIONS}"
    )


def kernel_to_matrix(kernel: jax.typing.ArrayLike, decomposition: str) -> jax.Array | np.ndarray:
    """The ``(a, b)`` matrix view of an HWIO kernel ``(kh, kw, c_in, c_out)`` (exact reshape).

    ``'channel'``: ``M[o, (p, q, c)] = K[p, q, c, o]``; ``'spatial'``:
    ``M[(c, p), (o, q)] = K[p, q, c, o]``. Inverse: :func:`matrix_to_kernel`. A numpy array
    stays a numpy array.
    """
    if not isinstance(kernel, (np.ndarray, jax.Array)):
        kernel = jnp.asarray(kernel)
    kh, kw, c_in, c_out = kernel.shape
    factor_shape(decomposition, c_in, c_out, (kh, kw))
    if decomposition == "channel":
        return kernel.reshape(kh * kw * c_in, c_out).T
    return kernel.transpose(2, 0, 3, 1).reshape(c_in * kh, c_out * kw)


def matrix_to_kernel(
    matrix: jax.typing.ArrayLike,
    decomposition: str,
    kernel_shape: Sequence[int],
) -> jax.Array | np.ndarray:
    """Inverse of :func:`kernel_to_matrix`: the HWIO kernel of shape ``kernel_shape``."""
    if not isinstance(matrix, (np.ndarray, jax.Array)):
        matrix = jnp.asarray(matrix)
    kh, kw, c_in, c_out = kernel_shape
    if matrix.shape != factor_shape(decomposition, c_in, c_out, (kh, kw)):
        raise ValueError(
            f"matrix has shape {matrix.shape}; expected "
            f"{factor_shape(decomposition, c_in, c_out, (kh, kw))} for kernel_shape={kernel_shape}"
        )
    if decomposition == "channel":
        return matrix.T.reshape(kh, kw, c_in, c_out)
    return matrix.reshape(c_in, kh, c_out, kw).transpose(1, 3, 0, 2)


def _check_rank(rank: int | None, max_rank: int) -> int:
    if rank is None:
        return max_rank
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= max_rank:
        raise ValueError(f"rank={rank!r} must be an int in [1, {max_rank}] (min(a, b)) or None")
    return int(rank)


def _paper_init(rngs: nnx.Rngs, a: int, b: int, r: int, dtype) -> tuple[jax.Array, ...]:
    """``U ~ N(0, 2/r)`` (a, r), ``s ~ N(0, 1)`` (r,), ``V ~ N(0, 2/b)`` (b, r)."""
    u = jax.random.normal(rngs.params(), (a, r), dtype) * math.sqrt(2.0 / r)
    s = jax.random.normal(rngs.params(), (r,), dtype)
    v = jax.random.normal(rngs.params(), (b, r), dtype) * math.sqrt(2.0 / b)
    return u, s, v


def _initial_factors(
    factors: Sequence[jax.typing.ArrayLike] | None,
    rank: int | None,
    rngs: nnx.Rngs | None,
    a: int,
    b: int,
    dtype: Any,
) -> tuple[jax.Array, ...]:
    """The given ``(u, s, v)`` (checked, cast to ``dtype``) or the paper's random init."""
    if factors is None:
        r = _check_rank(rank, min(a, b))
        if rngs is None:
            raise ValueError("rngs is required unless factors are given")
        return _paper_init(rngs, a, b, r, dtype)
    try:
        u, s, v = (jnp.asarray(f, dtype) for f in factors)
    except (TypeError, ValueError) as e:
        raise ValueError("factors must be a triple of arrays (u, s, v)") from e
    r = _check_rank(s.shape[0] if rank is None and s.ndim == 1 else rank, min(a, b))
    if u.shape != (a, r) or s.shape != (r,) or v.shape != (b, r):
        raise ValueError(
            f"factors have shapes {u.shape}, {s.shape}, {v.shape}; expected ({a}, {r}), "
            f"({r},), ({b}, {r})"
        )
    return u, s, v


def select_triplets(u: Any, s: Any, v: Any, index: Any) -> tuple[Any, Any, Any]:
    """The singular triplets ``index`` of SVD factors: ``(u[:, index], s[index], v[:, index])``.

    The one place that slices the factors of an SVD layer (truncation in ``from_dense``,
    pruning in :mod:`train.pruning`).

    Args:
      u: ``(a, r)``.
      s: ``(r,)``.
      v: ``(b, r)``.
      index: a slice or an integer index array into the ``r`` triplets.

    Returns:
      The selected ``(u, s, v)``, of the input array type (NumPy stays NumPy).

    >>> import numpy as np
    >>> u, s, v = select_triplets(np.eye(3), np.arange(3.0), np.ones((4, 3)), [2, 0])
    >>> u.shape, s.tolist(), v.shape
    ((3, 2), [2.0, 0.0], (4, 2))
    """
    return u[:, index], s[index], v[:, index]


def _truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return select_triplets(u, s, vt.T, slice(rank))


def _flatten_batch(x: jax.Array, num_feature_dims: int) -> tuple[jax.Array, tuple[int, ...]]:
    batch_shape = x.shape[: x.ndim - num_feature_dims]
    return x.reshape((-1,) + x.shape[x.ndim - num_feature_dims:]), batch_shape


class _SVDFactors(nnx.Module):
    """Shared parameters of :class:`SVDConv` and :class:`SVDDense`: ``svd_u``, ``svd_s``,
    ``svd_v`` (``W = U diag(|s|) Vᵀ``) and an optional ``bias``."""

    def _set_factors(self, u, s, v, out_features: int, use_bias: bool, param_dtype) -> None:
        self.use_bias = use_bias
        self.param_dtype = param_dtype
        self.svd_u = nnx.Param(u)
        self.svd_s = nnx.Param(s)
        self.svd_v = nnx.Param(v)
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)

    def _load_bias(self, bias, features: int, dtype) -> None:
        """Sets ``bias`` (checked to be ``(features,)``); ``None`` leaves the layer as it is."""
        if bias is not None:
            bias = jnp.asarray(bias, dtype)
            if bias.shape != (features,):
                raise ValueError(f"bias has shape {bias.shape}; expected ({features},)")
            self.bias = nnx.Param(bias)

    @property
    def rank(self) -> int:
        """``r``: the current number of singular values (the length of ``svd_s``)."""
        return int(self.svd_s.shape[0])

    def keep_triplets(self, index: Any) -> None:
        """Keeps only the singular triplets ``index`` (:func:`select_triplets`): the arrays shrink.

        The parameters are replaced by new ``nnx.Param`` of shapes ``(a, k)``, ``(k,)``,
        ``(b, k)`` (the selection is done on host copies: exact).
        """
        factors = (np.asarray(getattr(self, name)[...]) for name in FACTOR_NAMES)
        for name, value in zip(FACTOR_NAMES, select_triplets(*factors, index)):
            setattr(self, name, nnx.Param(jnp.asarray(value)))


class SVDConv(_SVDFactors):
    r"""A 2-D conv whose kernel is ``U diag(|s|) V^T``, reshaped (Yang et al. 2020).

    The HWIO kernel ``K`` of shape ``(kh, kw, c_in, c_out)`` is viewed as a matrix ``W`` of shape
    ``(a, b)`` (see :func:`kernel_to_matrix`) and parameterised as

    .. math:: W = U \operatorname{diag}(|s|) V^T, \quad U \in \mathbb{R}^{a \times r},\;
       s \in \mathbb{R}^r,\; V \in \mathbb{R}^{b \times r},\; r \le \min(a, b).

    * ``decomposition='channel'``: ``W`` is ``(c_out, kh kw c_in)``. Forward: a ``kh x kw`` conv
      to ``r`` channels with kernel ``diag(sqrt|s|) V^T`` (it carries the strides, padding and
      dilation), then a ``1 x 1`` conv with ``U diag(sqrt|s|)`` (+ bias).
    * ``decomposition='spatial'``: ``W`` is ``(c_in kh, c_out kw)``. Forward: a ``kh x 1`` conv to
      ``r`` channels with ``U diag(sqrt|s|)`` (stride ``(s1, 1)``, dilation ``(d1, 1)``, padding
      along H only), then a ``1 x kw`` conv with ``V diag(sqrt|s|)`` (stride ``(1, s2)``,
      dilation ``(1, d2)``, padding along W only) (+ bias).

    Both forwards equal ``nnx.Conv`` with the kernel :meth:`to_dense` up to float rounding, for
    every padding but grouped convs. Parameters (``nnx.Param``): ``svd_u`` ``(a, r)``,
    ``svd_s`` ``(r,)``, ``svd_v`` ``(b, r)`` (+ ``bias``). Paddings and initialisation:
    ``docs/svd_layers.md``.

    Args:
      in_features: ``c_in``.
      out_features: ``c_out``.
      kernel_size: ``(kh, kw)`` or an int.
      decomposition: ``'channel'`` or ``'spatial'``.
      rank: ``r`` in ``[1, min(a, b)]``; ``None`` for full rank ``min(a, b)``.
      strides: an int or ``(s1, s2)``.
      padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, an int ``p``, a pair of
        ints or explicit ``((lo, hi), (lo, hi))`` zero padding (as ``nnx.Conv``).
      kernel_dilation: an int or ``(d1, d2)``.
      use_bias: whether to add a bias.
      param_dtype: dtype of the parameters.
      feature_group_count: must be 1 (present to reject grouped convs explicitly).
      factors: optional ``(u, s, v)`` of shapes ``(a, r)``, ``(r,)``, ``(b, r)`` used instead
        of the random initialisation (``r`` from ``s`` when ``rank`` is ``None``).
      rngs: ``nnx.Rngs`` with a ``params`` stream (required unless ``factors`` are given).

    Raises:
      ValueError: naming ``decomposition``, ``rank``, ``padding``, ``strides``,
        ``kernel_dilation``, ``kernel_size``, ``feature_group_count``, ``factors`` or ``rngs``
        when invalid or missing.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = SVDConv(3, 8, (3, 3), strides=2, rngs=nnx.Rngs(0))
      >>> layer.svd_u.shape, layer.svd_s.shape, layer.svd_v.shape
      ((8, 8), (8,), (27, 8))
      >>> layer(jnp.ones((2, 9, 9, 3))).shape
      (2, 5, 5, 8)

    References:
      H. Yang, M. Tang, W. Wen, F. Yan, D. Hu, A. Li, H. Li, Y. Chen. Learning Low-rank Deep
      Neural Networks via Singular Vector Orthogonality Regularization and Singular Value
      Sparsification. CVPR Workshops 2020, arXiv:2004.09031.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        decomposition: str = "channel",
        rank: int | None = None,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = False,
        param_dtype: Any = jnp.float32,
        feature_group_count: int = 1,
        factors: Sequence[jax.typing.ArrayLike] | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if feature_group_count != 1:
            raise ValueError(
                f"feature_group_count={feature_group_count!r}: grouped convs are not supported "
                "by SVDConv; expected 1"
            )
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features!r} and out_features={out_features!r} must be >= 1"
            )
        kernel_size = normalize_pair(kernel_size, "kernel_size")
        a, b = factor_shape(decomposition, in_features, out_features, kernel_size)
        u, s, v = _initial_factors(factors, rank, rngs, a, b, param_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.decomposition = decomposition
        self.strides = normalize_pair(strides, "strides")
        self.padding = normalize_padding(padding, SVD_CONV_PADDINGS)
        self.kernel_dilation = normalize_pair(kernel_dilation, "kernel_dilation")
        self._set_factors(u, s, v, out_features, use_bias, param_dtype)

    @property
    def max_rank(self) -> int:
        """``min(a, b)``: the largest possible rank of the matrix view."""
        return min(self.factor_shape)

    @property
    def factor_shape(self) -> tuple[int, int]:
        """``(a, b)``: the shape of the matrix view ``W``."""
        return factor_shape(
            self.decomposition, self.in_features, self.out_features, self.kernel_size
        )

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """``(kh, kw, c_in, c_out)``: the HWIO shape of :meth:`to_dense`."""
        return (*self.kernel_size, self.in_features, self.out_features)

    def to_dense(self) -> jax.Array:
        """The exact HWIO kernel ``(kh, kw, c_in, c_out)`` that this layer applies."""
        matrix = (self.svd_u[...] * jnp.abs(self.svd_s[...])) @ self.svd_v[...].T
        return matrix_to_kernel(matrix, self.decomposition, self.kernel_shape)

    @classmethod
    def from_dense(
        cls,
        kernel: jax.typing.ArrayLike,
        *,
        decomposition: str = "channel",
        rank: int | None = None,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        bias: jax.typing.ArrayLike | None = None,
        param_dtype: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> SVDConv:
        """An :class:`SVDConv` from the truncated SVD of an HWIO kernel.

        ``svd_u``, ``svd_s >= 0`` (descending), ``svd_v`` are the leading ``rank`` singular
        triplets of :func:`kernel_to_matrix` (computed in float64 with numpy on the host), so
        ``to_dense()`` is the kernel **exactly** (up to rounding) at full rank, and the best
        rank-``rank`` approximation in Frobenius norm otherwise (Eckart–Young: the error is
        ``sqrt`` of the sum of the dropped ``s**2``).

        Args:
          kernel: HWIO ``(kh, kw, c_in, c_out)`` (a concrete array, not a tracer).
          decomposition, rank, strides, padding, kernel_dilation: as for :class:`SVDConv`.
          bias: optional ``(c_out,)`` bias; ``use_bias`` is ``bias is not None``.
          param_dtype: dtype of the parameters; ``None`` for the kernel's dtype.
          rngs: unused (accepted for symmetry with the constructor).

        Raises:
          ValueError: naming ``kernel`` (not 4-D) or ``bias`` (wrong shape), and as the
            constructor.
        """
        del rngs
        kernel_np = np.asarray(kernel)
        if kernel_np.ndim != 4:
            raise ValueError(
                f"kernel must be 4-D HWIO (kh, kw, c_in, c_out); got shape {kernel_np.shape}"
            )
        kh, kw, c_in, c_out = kernel_np.shape
        dtype = kernel_np.dtype if param_dtype is None else param_dtype
        a, b = factor_shape(decomposition, c_in, c_out, (kh, kw))
        matrix = kernel_to_matrix(kernel_np.astype(np.float64), decomposition)
        factors = _truncated_svd(matrix, _check_rank(rank, min(a, b)))
        layer = cls(
            c_in,
            c_out,
            (kh, kw),
            decomposition=decomposition,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            use_bias=bias is not None,
            param_dtype=dtype,
            factors=factors,
        )
        layer._load_bias(bias, c_out, dtype)
        return layer

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
        """Spatial output size ``(H_out, W_out)`` for a spatial input ``(H, W)``."""
        _, pads = self.resolved_padding(input_shape)
        return tuple(  # type: ignore[return-value]
            (n + lo + hi - (k - 1) * d - 1) // s + 1
            for n, (lo, hi), k, d, s in zip(
                input_shape, pads, self.kernel_size, self.kernel_dilation, self.strides)
        )

    def flops(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one forward on one ``(H, W, c_in)`` input (no bias), exact.

        The count of the paper: channel-wise ``H_out W_out (kh kw c_in r + r c_out)``;
        spatial-wise ``H_1 W_1 kh c_in r + H_out W_out kw r c_out`` with ``(H_1, W_1) =
        (H_out, W)`` the output of the ``kh x 1`` stage. Compare with :meth:`dense_flops`.
        """
        h_out, w_out = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        c_in, c_out, r = self.in_features, self.out_features, self.rank
        if self.decomposition == "channel":
            return h_out * w_out * (kh * kw * c_in * r + r * c_out)
        return h_out * int(input_shape[1]) * kh * c_in * r + h_out * w_out * kw * r * c_out

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of the undecomposed conv: ``H_out W_out kh kw c_in c_out``."""
        h_out, w_out = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        return h_out * w_out * kh * kw * self.in_features * self.out_features

    def resolved_padding(self, input_shape: Sequence[int]) -> tuple[str, Pads]:
        """``(mode, ((lo, hi), (lo, hi)))`` for a spatial input ``(H, W)``.

        ``mode`` is ``'constant'`` (zero padding), ``'wrap'`` (``'CIRCULAR'``) or ``'reflect'``.
        """
        keff = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
        padding = self.padding
        if padding in ("CIRCULAR", "REFLECT"):
            mode = "wrap" if padding == "CIRCULAR" else "reflect"
            return mode, tuple(((k - 1) // 2, k // 2) for k in keff)  # type: ignore[return-value]
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(tuple(input_shape), keff, self.strides, padding)
            return "constant", tuple(tuple(p) for p in pads)  # type: ignore[return-value]
        return "constant", padding

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``(*batch, H, W, c_in) -> (*batch, H_out, W_out, c_out)`` (as ``nnx.Conv``)."""
        x, batch_shape = _flatten_batch(jnp.asarray(inputs), 3)
        u, s, v = self.svd_u[...], self.svd_s[...], self.svd_v[...]
        dtype = jnp.result_type(x.dtype, u.dtype)
        x = x.astype(dtype)
        root = jnp.sqrt(jnp.abs(s)).astype(dtype)
        left, right = (u * root).astype(dtype), (v * root).astype(dtype)
        kh, kw = self.kernel_size
        c_in, c_out = self.in_features, self.out_features
        r = s.shape[0]
        mode, (pad_h, pad_w) = self.resolved_padding(x.shape[1:3])
        d1, d2 = self.kernel_dilation
        s1, s2 = self.strides

        def conv(z, kernel, strides, pads, dilation, pad_axis):
            if mode != "constant":
                widths = [(0, 0)] * 4
                widths[pad_axis] = pads[pad_axis - 1]
                z = jnp.pad(z, widths, mode=mode)
                pads = ((0, 0), (0, 0))
            return lax.conv_general_dilated(
                z, kernel, strides, pads, rhs_dilation=dilation,
                dimension_numbers=_DIMENSION_NUMBERS,
            )

        if self.decomposition == "channel":
            first = right.reshape(kh, kw, c_in, r)
            if mode != "constant":
                x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), mode=mode)
                pads = ((0, 0), (0, 0))
            else:
                pads = (pad_h, pad_w)
            y = lax.conv_general_dilated(
                x, first, (s1, s2), pads, rhs_dilation=(d1, d2),
                dimension_numbers=_DIMENSION_NUMBERS,
            )
            y = y @ left.T
        else:
            first = left.reshape(c_in, kh, r).transpose(1, 0, 2)[:, None]
            second = right.reshape(c_out, kw, r).transpose(1, 2, 0)[None]
            y = conv(x, first, (s1, 1), (pad_h, (0, 0)), (d1, 1), 1)
            y = conv(y, second, (1, s2), ((0, 0), pad_w), (1, d2), 2)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y.reshape(batch_shape + y.shape[1:])


class SVDDense(_SVDFactors):
    r"""A dense layer ``y = x @ W + b`` with ``W = U diag(|s|) V^T`` (Yang et al. 2020).

    ``W`` has flax ``Linear``'s ``(in, out)`` orientation: ``svd_u`` ``(in, r)``, ``svd_s``
    ``(r,)``, ``svd_v`` ``(out, r)``, ``r <= min(in, out)``; ``bias`` ``(out,)`` when
    ``use_bias``. Computed as ``((x @ U) * |s|) @ V^T + b``, exactly ``x @ to_dense() + b`` up
    to rounding.

    Initialisation: the same rule as :class:`SVDConv` with ``(a, b) = (in, out)``:
    ``svd_u ~ N(0, 2 / r)``, ``svd_v ~ N(0, 2 / out)``, ``svd_s ~ N(0, 1)``, bias zeros (our
    choice for the dense layers; the paper's released code is only checked for its convs).

    Args:
      in_features: input features.
      out_features: output features.
      rank: ``r`` in ``[1, min(in, out)]``; ``None`` for full rank.
      use_bias: whether to add a bias.
      param_dtype: dtype of the parameters.
      factors: optional ``(u, s, v)`` of shapes ``(in, r)``, ``(r,)``, ``(out, r)`` used
        instead of the random initialisation.
      rngs: ``nnx.Rngs`` with a ``params`` stream (required unless ``factors`` are given).

    Raises:
      ValueError: naming ``rank`` when outside ``[1, min(in, out)]``, ``factors`` (wrong
        shapes) or ``rngs`` (missing).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> SVDDense(4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
      (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | None = None,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        factors: Sequence[jax.typing.ArrayLike] | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features!r} and out_features={out_features!r} must be >= 1"
            )
        u, s, v = _initial_factors(factors, rank, rngs, in_features, out_features, param_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self._set_factors(u, s, v, out_features, use_bias, param_dtype)

    @property
    def max_rank(self) -> int:
        """``min(in, out)``."""
        return min(self.in_features, self.out_features)

    @property
    def factor_shape(self) -> tuple[int, int]:
        """``(in, out)``: the shape of ``W``."""
        return self.in_features, self.out_features

    def flops(self) -> int:
        """Multiply-accumulates per input vector (no bias): ``r (in + out)``, exact."""
        return self.rank * (self.in_features + self.out_features)

    def dense_flops(self) -> int:
        """Multiply-accumulates of the undecomposed layer: ``in * out``."""
        return self.in_features * self.out_features

    def to_dense(self) -> jax.Array:
        """The exact ``(in, out)`` matrix ``W`` that this layer applies."""
        return (self.svd_u[...] * jnp.abs(self.svd_s[...])) @ self.svd_v[...].T

    @classmethod
    def from_dense(
        cls,
        kernel: jax.typing.ArrayLike,
        *,
        bias: jax.typing.ArrayLike | None = None,
        rank: int | None = None,
        param_dtype: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> SVDDense:
        """An :class:`SVDDense` from the truncated SVD of an ``(in, out)`` matrix.

        Exact at full rank; the best rank-``rank`` approximation (Eckart–Young) otherwise.
        ``svd_s >= 0``, descending. ``use_bias`` is ``bias is not None``; ``rngs`` is unused.

        Raises:
          ValueError: naming ``kernel`` (not 2-D), ``bias`` (wrong shape) or ``rank``.
        """
        del rngs
        kernel_np = np.asarray(kernel)
        if kernel_np.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in, out); got shape {kernel_np.shape}")
        n_in, n_out = kernel_np.shape
        dtype = kernel_np.dtype if param_dtype is None else param_dtype
        factors = _truncated_svd(
            kernel_np.astype(np.float64), _check_rank(rank, min(n_in, n_out))
        )
        layer = cls(
            n_in, n_out, use_bias=bias is not None, param_dtype=dtype, factors=factors
        )
        layer._load_bias(bias, n_out, dtype)
        return layer

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``(..., in) -> (..., out)``."""
        u, s, v = self.svd_u[...], self.svd_s[...], self.svd_v[...]
        y = ((jnp.asarray(inputs) @ u) * jnp.abs(s)) @ v.T
        if self.bias is not None:
            y = y + self.bias[...]
        return y


SVDLayer = SVDConv | SVDDense


def path_name(path: Sequence[Any]) -> str:
    """The name of a module or parameter path: its keys joined with ``'/'`` (``'blocks/0/conv1'``).

    ``jax.tree_util.keystr(path, simple=True, separator='/')``: the one path format of the SVD
    layers, :func:`train.layers.svd_decompose.svd_layers`, :func:`train.regularizers.svd_factors`
    and :mod:`train.pruning` (NNX graph paths of plain keys and pytree key paths give the same
    names).

    >>> path_name(("blocks", 0, "conv1"))
    'blocks/0/conv1'
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")
