"""Exact σ_max of every conv layer of a params tree (what the loop logs and reports).

Layer names are the dotted parameter paths (``jax.tree_util.keystr(path, simple=True,
separator='.')``, e.g. ``'blocks.0.conv1.kernel'``).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectra import ConvSpec
from spectra import spectral_norm
from train import discovery

#: Zero-padded layers whose dense operator has both dims at most this use ``'dense'`` for σ_max
#: under ``method='auto'`` (exact); larger ones use ``'lanczos'`` (exact to a tolerance).
MAX_DENSE_SIGMA_DIM = 1024


def conv_layers(specs: Any) -> list[tuple[str, ConvSpec]]:
    """``(name, spec)`` of the conv leaves of ``specs``, in params-leaf order.

    Names are the dotted parameter paths, e.g. ``'blocks.0.conv1.kernel'``.

    Example:
      >>> spec = ConvSpec(input_shape=(8, 8))
      >>> conv_layers({'conv': {'kernel': spec, 'bias': None}})[0][0]
      'conv.kernel'
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(
        nnx.as_pure(specs), is_leaf=discovery.is_spec_or_none
    )
    return [
        (jax.tree_util.keystr(path, simple=True, separator="."), spec)
        for path, spec in with_path
        if spec is not None
    ]


def sigma_method(spec: ConvSpec, kernel_shape: tuple[int, ...], method: str = "auto") -> str:
    """The ``spectra.spectral_norm`` method that ``method='auto'`` uses for one layer.

    ``'fft'`` for circular layers whose input size divides by the strides, ``'dense'`` for
    layers whose dense operator has both dims at most :data:`MAX_DENSE_SIGMA_DIM`,
    ``'lanczos'`` otherwise; any other ``method`` is returned as it is.
    """
    if method != "auto":
        return method
    if spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides)):
        return "fft"
    if max(spec.in_dim(kernel_shape), spec.out_dim(kernel_shape)) <= MAX_DENSE_SIGMA_DIM:
        return "dense"
    return "lanczos"


def layer_spectral_norms(params: Any, specs: Any, method: str = "auto") -> jax.Array:
    """σ_max of every conv layer, ``(num_convs,)`` float32 in :func:`conv_layers` order.

    With ``method='auto'`` every value is exact (:func:`sigma_method`): ``'fft'``
    (per-frequency SVD) for circular layers, ``'dense'`` (SVD of the dense operator) for
    zero-padded layers with both dims at most ``MAX_DENSE_SIGMA_DIM``, ``'lanczos'`` (exact to
    its tolerance) for larger ones. Jit-able (specs static).
    """
    leaves = jax.tree.leaves(nnx.as_pure(params), is_leaf=discovery.is_leaf_or_hole)
    aligned = discovery.align_with_params(params, specs, "specs")
    values = []
    for leaf, spec in zip(leaves, aligned):
        if spec is None:
            continue
        kernel = jnp.asarray(leaf)
        if values:
            # One layer after the other (a data dependence): XLA:CPU in jax 0.10 can deadlock
            # when several batched LAPACK calls run concurrently on a small thread pool.
            _, kernel = jax.lax.optimization_barrier((values[-1], kernel))
        values.append(
            spectral_norm(kernel, spec, sigma_method(spec, kernel.shape, method)).astype(
                jnp.float32
            )
        )
    return jnp.stack(values) if values else jnp.zeros([0], jnp.float32)
