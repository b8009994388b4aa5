"""The conv operator itself, its transpose, and its dense matrix: the ground truth."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from spectra._spec import ConvSpec


def conv(kernel: jax.typing.ArrayLike, x: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    """Applies the conv layer described by ``spec`` (no bias).

    Exactly ``flax.nnx.Conv`` / ``lax.conv_general_dilated`` (cross-correlation), computed at
    ``Precision.HIGHEST``.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      x: input ``(H, W, c_in)`` or batched ``(N, H, W, c_in)`` with ``(H, W) = spec.input_shape``.
      spec: the layer.

    Returns:
      ``(H_out, W_out, c_out)`` (or ``(N, H_out, W_out, c_out)``).
    """
    kshape = spec.validate(kernel)
    x = jnp.asarray(x)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != (*spec.input_shape, spec.channels(kshape)[0]):
        raise ValueError(
            f"x must have shape (N?, {spec.input_shape[0]}, {spec.input_shape[1]}, "
            f"{spec.channels(kshape)[0]}); got {x.shape}"
        )
    pads = spec.pads(kshape)
    if spec.is_circular:
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="wrap")
        pads = ((0, 0), (0, 0))
    y = lax.conv_general_dilated(
        x,
        jnp.asarray(kernel, dtype=x.dtype),
        window_strides=spec.strides,
        padding=pads,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=spec.feature_group_count,
        precision=lax.Precision.HIGHEST,
    )
    return y[0] if unbatched else y


def conv_transpose(
    kernel: jax.typing.ArrayLike, y: jax.typing.ArrayLike, spec: ConvSpec
) -> jax.Array:
    """Applies the transpose (adjoint) of :func:`conv` to ``y`` of shape ``(H_out, W_out, c_out)``.

    Exact: obtained with ``jax.linear_transpose`` of the real conv.
    """
    kernel = jnp.asarray(kernel)
    kshape = spec.validate(kernel)
    y = jnp.asarray(y, dtype=kernel.dtype)
    x_shape = jax.ShapeDtypeStruct((*spec.input_shape, spec.channels(kshape)[0]), kernel.dtype)
    (x,) = jax.linear_transpose(functools.partial(conv, kernel, spec=spec), x_shape)(y)
    return x


def dense_operator(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    """The matrix of the layer, ``(out_dim, in_dim)``, built from the real ``lax`` conv.

    Rows index the output flattened in ``(H_out, W_out, c_out)`` row-major order, columns the
    input flattened in ``(H, W, c_in)`` order, so ``dense_operator(k, s) @ x.ravel() ==
    conv(k, x, s).ravel()``. Exact; memory ``out_dim * in_dim``, for small layers and tests.
    """
    kernel = jnp.asarray(kernel)
    kshape = spec.validate(kernel)
    c_in = spec.channels(kshape)[0]
    in_dim = spec.in_dim(kshape)
    eye = jnp.eye(in_dim, dtype=kernel.dtype).reshape(in_dim, *spec.input_shape, c_in)
    columns = conv(kernel, eye, spec).reshape(in_dim, -1)
    return columns.T
