"""Differentiable regularisers on a model's parameters.

* :func:`spectral_penalty`: spectral-norm penalties on the conv layers (Yi 2020).
* :func:`orthogonality_loss`, :func:`sparsity_loss` (with :func:`svd_factors`): the losses of
  SVD training (Yang et al. 2020) on the factors of :class:`train.layers.svd.SVDConv` /
  :class:`train.layers.svd.SVDDense` layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectra import UPPER_BOUNDS
from spectra import ConvSpec
from spectra import spectral_norm
from train import discovery
from train.layers.svd import FACTOR_NAMES
from train.layers.svd import path_name

PENALTY_REDUCTIONS = ("sum", "max")
#: Kinds of :func:`sparsity_loss`.
SPARSITY = ("l1", "hoyer", "hoyer_square")


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


def _unwrap(leaf: Any) -> jax.Array:
    if isinstance(leaf, nnx.Variable):
        return leaf[...]
    if hasattr(leaf, "value") and not isinstance(leaf, jax.Array):  # e.g. nnx.VariableState
        return leaf.value
    return leaf


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(node, Mapping):
        return list(node.items())
    if hasattr(node, "items") and callable(node.items) and not isinstance(node, jax.Array):
        return list(node.items())
    if isinstance(node, (list, tuple)) and not isinstance(node, nnx.Variable):
        return list(enumerate(node))
    return None


def _sum(terms: list[jax.Array]) -> jax.Array:
    return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros([])


def svd_factors(params: Any) -> list[tuple[str, jax.Array, jax.Array, jax.Array]]:
    """Every ``(path, u, s, v)`` of a parameter tree: the nodes with ``svd_u, svd_s, svd_v``.

    Args:
      params: a parameter tree: ``nnx.State`` (e.g. ``nnx.split(model, nnx.Param, ...)[1]``),
        its pure form (``nnx.to_pure_dict`` / ``nnx.as_pure``: nested dicts of arrays) or any
        nest of mappings and lists; ``nnx.Variable`` leaves are unwrapped.

    Returns:
      ``[(path, u, s, v)]`` in tree order, ``path`` the keys joined with ``'/'``
      (:func:`train.layers.svd.path_name`, the paths of
      :func:`train.layers.svd_decompose.svd_layers`),
      ``u`` ``(a, r)``, ``s`` ``(r,)``, ``v`` ``(b, r)``.
    """
    found = []

    def visit(node: Any, path: tuple[Any, ...]) -> None:
        items = _children(node)
        if items is None:
            return
        keys = {k for k, _ in items}
        if all(name in keys for name in FACTOR_NAMES):
            u, s, v = (_unwrap(node[name]) for name in FACTOR_NAMES)
            found.append((path_name(path), u, s, v))
        for key, child in items:
            if key not in FACTOR_NAMES:
                visit(child, path + (key,))

    visit(params, ())
    return found


def factor_orthogonality(factor: jax.typing.ArrayLike) -> jax.Array:
    r"""``L_o(A) = ||G - I||_F^2 / r^2`` for one factor ``A`` of shape ``(m, r)``.

    ``G = A^T A`` (``r x r``) when ``m >= r`` and ``G = A A^T`` (``m x m``) otherwise: the
    paper's rule (Gram of the smaller side) restated for our ``(m, r)`` orientation; for the
    factors of an SVD layer ``m >= r`` always. Zero exactly when the columns of ``A`` (rows when
    ``m < r``) are orthonormal.
    """
    a = jnp.asarray(factor)
    m, r = a.shape
    gram = a.T @ a if m >= r else a @ a.T
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    return jnp.sum(jnp.square(gram - eye)) / r**2


def orthogonality_loss(params: Any) -> jax.Array:
    r"""Orthogonality regulariser of SVD training (Yang et al. 2020), summed over the layers.

    .. math:: L_o = \sum_{\ell} L_o(U_\ell) + L_o(V_\ell), \qquad
       L_o(A) = \lVert A^T A - I \rVert_F^2 / r^2 \quad (A \in \mathbb{R}^{m \times r},\;
       m \ge r;\ A A^T \text{ when } m < r)

    (see :func:`factor_orthogonality`). ``0`` when there is no SVD layer. Differentiable and
    jit-able.

    Args:
      params: a parameter tree holding SVD layers (see :func:`svd_factors`).

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"layer": {"svd_u": jnp.eye(3, 2), "svd_s": jnp.ones(2),
      ...                     "svd_v": 2 * jnp.eye(4, 2)}}
      >>> float(orthogonality_loss(params))  # U orthonormal; V^T V = 4 I: 2 * 3^2 / 2^2.
      4.5
    """
    terms = [
        factor_orthogonality(u) + factor_orthogonality(v) for _, u, _, v in svd_factors(params)
    ]
    return _sum(terms)


def singular_value_sparsity(s: jax.typing.ArrayLike, kind: str = "hoyer") -> jax.Array:
    r"""Sparsity measure of one vector ``s`` (see :func:`sparsity_loss`).

    ``'l1'``: ``||s||_1``; ``'hoyer'``: ``||s||_1 / ||s||_2``; ``'hoyer_square'``:
    ``||s||_1^2 / ||s||_2^2``. Hoyer and Hoyer-square are scale invariant, in ``[1, sqrt(r)]``
    and ``[1, r]`` for ``s != 0``; at ``s = 0`` both are defined as ``0`` with zero gradient (no
    NaN).

    Raises:
      ValueError: naming ``kind`` when not in :data:`SPARSITY`.
    """
    if kind not in SPARSITY:
        raise ValueError(f"kind={kind!r} is unknown; expected one of {SPARSITY}")
    s = jnp.asarray(s)
    l1 = jnp.sum(jnp.abs(s))
    if kind == "l1":
        return l1
    squares = jnp.sum(jnp.square(s))
    nonzero = squares > 0
    safe = jnp.where(nonzero, squares, jnp.ones_like(squares))
    ratio = l1**2 / safe if kind == "hoyer_square" else l1 / jnp.sqrt(safe)
    return jnp.where(nonzero, ratio, jnp.zeros_like(ratio))


def sparsity_loss(params: Any, kind: str = "hoyer") -> jax.Array:
    r"""Sparsity regulariser of SVD training (Yang et al. 2020) on every layer's ``s``, summed.

    .. math::
       L_1 = \sum_\ell \lVert s_\ell \rVert_1, \quad
       L_H = \sum_\ell \frac{\lVert s_\ell \rVert_1}{\lVert s_\ell \rVert_2}, \quad
       L_{H^2} = \sum_\ell \frac{\lVert s_\ell \rVert_1^2}{\lVert s_\ell \rVert_2^2}.

    The paper writes Hoyer and Hoyer-square with an offset ``- 1`` per layer; the offsets are
    **dropped** here (a constant: same gradients, so the same training). A layer with
    ``s = 0`` contributes ``0`` with a zero gradient for the Hoyer kinds (no NaN) and the
    subgradient of ``|.|`` at 0 for L1. Differentiable and jit-able.

    Args:
      params: a parameter tree holding SVD layers (see :func:`svd_factors`).
      kind: ``'l1'``, ``'hoyer'`` or ``'hoyer_square'``.

    Returns:
      A scalar (``0`` when there is no SVD layer).

    Raises:
      ValueError: naming ``kind`` when not in :data:`SPARSITY`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"layer": {"svd_u": jnp.eye(2), "svd_s": jnp.array([3.0, 4.0]),
      ...                     "svd_v": jnp.eye(2)}}
      >>> float(sparsity_loss(params, "l1")), round(float(sparsity_loss(params, "hoyer")), 6)
      (7.0, 1.4)
    """
    if kind not in SPARSITY:
        raise ValueError(f"kind={kind!r} is unknown; expected one of {SPARSITY}")
    return _sum([singular_value_sparsity(s, kind) for _, _, s, _ in svd_factors(params)])
