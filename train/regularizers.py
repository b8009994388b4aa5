"""Differentiable spectral-norm penalties on the conv layers of a model (Yi 2020)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spectra._bounds import UPPER_BOUNDS
from spectra._exact import spectral_norm
from spectra._spec import ConvSpec
from train import discovery

PENALTY_REDUCTIONS = ("sum", "max")


def spectral_penalty(
    params: Any, specs: Any, bound: str = "gram_iteration", reduce: str = "sum"
) -> jax.Array:
    r"""Sum (or max) over the conv layers of an upper bound on each layer's σ_max.

    The regulariser of Yi (2020): add ``λ * spectral_penalty(params, specs)`` to the task loss,

    .. math::

       R(\theta) = \sum_{\ell \in \text{convs}} B(K_\ell, \text{spec}_\ell)
       \quad\text{or}\quad \max_\ell B(K_\ell, \text{spec}_\ell),

    with ``B = spectra._bounds.UPPER_BOUNDS[bound]`` (a certified **upper bound** on the exact
    σ_max of the layer, for its padding: circular or zero) or, for ``bound='exact'``,
    ``spectra.spectral_norm(kernel, spec)`` (the **exact** σ_max: per-frequency SVD for circular
    layers, matrix-free Lanczos otherwise). Differentiable in the kernels and jit-able (specs
    are static); non-conv leaves (``None`` specs) contribute nothing.

    Args:
      params: the parameters (a pytree; ``nnx.Variable`` wrappers and ``optax.MaskedNode`` are
        allowed).
      specs: a pytree with the structure of ``params``: a :class:`spectra.ConvSpec` per conv
        kernel (HWIO), ``None`` elsewhere (e.g. from :func:`train.find_convs`).
      bound: a key of ``UPPER_BOUNDS`` (e.g. ``'gram_iteration'``, ``'singla_feizi'``,
        ``'l1_matrix'``, ``'symbol_grid'``) or ``'exact'``.
      reduce: ``'sum'`` or ``'max'`` over the conv layers.

    Returns:
      A scalar (``0`` when there is no conv leaf), in the dtype of the kernels.

    Raises:
      ValueError: naming ``bound`` or ``reduce`` when unknown, ``specs`` when its structure
        differs from ``params``'s.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> params = {'w': jnp.ones((3, 3, 1, 1)), 'b': jnp.zeros(1)}
      >>> specs = {'w': spectra.ConvSpec((8, 8), padding='CIRCULAR'), 'b': None}
      >>> float(spectral_penalty(params, specs, bound='exact'))  # All-ones 3x3: σ_max = 9.
      9.0
      >>> grads = jax.grad(spectral_penalty)(params, specs)

    References:
      X. Yi. Asymptotic Singular Value Distribution of Linear Convolutional Layers.
      arXiv:2006.07117, 2020.
    """
    if bound == "exact":
        bound_fn = spectral_norm
    elif bound in UPPER_BOUNDS:
        bound_fn = UPPER_BOUNDS[bound]
    else:
        raise ValueError(
            f"bound={bound!r} is unknown; expected 'exact' or one of {sorted(UPPER_BOUNDS)}"
        )
    if reduce not in PENALTY_REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is unknown; expected one of {PENALTY_REDUCTIONS}")
    leaves = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
    aligned = discovery.align_with_params(params, specs, "specs")
    values = []
    for leaf, spec in zip(leaves, aligned):
        if discovery.is_leaf_or_hole(leaf) or spec is None:
            continue
        if not isinstance(spec, ConvSpec):
            raise ValueError(f"specs must hold spectra.ConvSpec or None; got {spec!r}")
        values.append(bound_fn(leaf, spec))
    if not values:
        return jnp.zeros([])
    stacked = jnp.stack([jnp.asarray(v) for v in values])
    return jnp.sum(stacked) if reduce == "sum" else jnp.max(stacked)
