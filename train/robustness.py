r"""Certified ℓ2 robustness from a Lipschitz constant: :func:`certified_accuracy`.

If the logit map ``f: R^d -> R^K`` is ``L``-Lipschitz in ℓ2 and ``x`` is classified as ``y``
with margin ``M(x) = f_y(x) - max_{j != y} f_j(x)``, then no ``x'`` with
``||x' - x||_2 <= ε`` is classified otherwise as long as ``M(x) > sqrt(2) ε L``:
each difference ``f_y - f_j = (e_y - e_j)ᵀ f`` is ``sqrt(2) L``-Lipschitz
(``||e_y - e_j||_2 = sqrt(2)``), so it stays positive on the ball (Tsuzuku, Sato, Sugiyama,
"Lipschitz-Margin Training: Scalable Certification of Perturbation Invariance for Deep Neural
Networks", NeurIPS 2018, Proposition 1). The certificate is **proven** given a proven ``L``
(e.g. ``network['lipschitz_upper']`` of :func:`train.report.network_report`); with an estimate
of ``L`` (a lower bound, an uncertified value) it proves nothing.

Inputs: ``ε`` is measured in the space of ``data``. When the model normalises its input (or the
data was normalised, ``(x - mean) / std``), the map from raw pixels has constant ``L / min(std)``
(:func:`normalized_lipschitz`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _apply_fn(model_or_apply: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``x -> logits`` for an NNX module (its current state, not modified) or a
    function."""
    if isinstance(model_or_apply, nnx.Module):
        graphdef, state = nnx.split(model_or_apply)

        @jax.jit
        def apply(state, x):
            return nnx.merge(graphdef, state)(x)

        return lambda x: apply(state, x)
    if not callable(model_or_apply):
        raise ValueError(
            f"model_or_apply must be an nnx.Module or a function x -> logits; got "
            f"{type(model_or_apply).__name__}"
        )
    return jax.jit(model_or_apply)


def logits_of(
    model_or_apply: Any, images: jax.typing.ArrayLike, *, batch_size: int = 512
) -> np.ndarray:
    """``(N, K)`` logits of ``model_or_apply`` on ``images`` ``(N, ...)``, in batches."""
    images = np.asarray(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    apply = _apply_fn(model_or_apply)
    out = [
        np.asarray(apply(jnp.asarray(images[i:i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def margins(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> np.ndarray:
    """``f_y - max_{j != y} f_j`` per example (negative when misclassified), ``(N,)``.

    Args:
      logits: ``(N, K)`` with ``K >= 2``.
      labels: ``(N,)`` integer labels in ``[0, K)``.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2; got {logits.shape}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},); got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return true - others.max(axis=1)


def certified_radii(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, lipschitz: float
) -> np.ndarray:
    """The certified ℓ2 radius ``M(x) / (sqrt(2) L)`` of every example (``0`` when
    misclassified or tied): a proven radius when ``lipschitz`` is a proven upper bound."""
    lipschitz = _check_lipschitz(lipschitz)
    return np.maximum(margins(logits, labels), 0.0) / (math.sqrt(2.0) * lipschitz)


def _check_lipschitz(lipschitz) -> float:
    if lipschitz is None or not np.isfinite(lipschitz) or lipschitz <= 0:
        raise ValueError(f"lipschitz={lipschitz!r}: expected a finite proven bound > 0")
    return float(lipschitz)


def certified_accuracy(
    model_or_apply: Any,
    data: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike],
    eps: float | jax.typing.ArrayLike,
    *,
    lipschitz: float,
    batch_size: int = 512,
) -> float | np.ndarray:
    r"""The fraction of ``data`` classified correctly with margin ``> sqrt(2) ε L``.

    The standard ℓ2 certificate for a network whose logit map is ``L``-Lipschitz (Tsuzuku et
    al. 2018; see the module docstring): every counted example is classified correctly at
    every point of the closed ℓ2 ball of radius ``ε`` around it. A **proven** robust accuracy
    when ``lipschitz`` is a proven upper bound on the ℓ2 Lipschitz constant of
    ``model_or_apply`` (in the space of ``data``); ``ε = 0`` gives the clean accuracy with
    ties counted as errors.

    Args:
      model_or_apply: an NNX module (in eval mode) or a function ``x -> (N, K)`` logits.
      data: ``(images (N, ...), labels (N,))``.
      eps: a radius ``>= 0`` or an array of radii.
      lipschitz: ``L > 0``, an upper bound on the ℓ2 Lipschitz constant of the logit map.
      batch_size: examples per forward pass.

    Returns:
      A float for a scalar ``eps``, else an array of ``eps``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, -1.0]])  # f(x) = x W: 2 logits, ||W||_2 = sqrt(2).
      >>> x, y = jnp.array([[1.0], [-0.1]]), jnp.array([0, 1])
      >>> certified_accuracy(lambda x: x @ w, (x, y), [0.0, 0.5, 1.0], lipschitz=2**0.5)
      array([1. , 0.5, 0. ])
    """
    lipschitz = _check_lipschitz(lipschitz)
    images, labels = data
    eps_arr = np.asarray(eps, np.float64)
    if np.any(~np.isfinite(eps_arr)) or np.any(eps_arr < 0):
        raise ValueError(f"eps={eps!r}: expected finite radii >= 0")
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("data holds no examples")
    m = margins(logits_of(model_or_apply, images, batch_size=batch_size), labels)
    threshold = math.sqrt(2.0) * lipschitz * eps_arr
    accuracy = np.mean(m[:, None] > threshold.reshape(1, -1), axis=0).reshape(eps_arr.shape)
    return float(accuracy) if eps_arr.ndim == 0 else accuracy


def normalized_lipschitz(lipschitz: float, std: Any) -> float:
    """The constant of ``x -> f((x - mean) / std)`` from ``L`` of ``f``: ``L / min(std)``."""
    std = np.asarray(std, np.float64)
    if std.size == 0 or np.any(std <= 0):
        raise ValueError(f"std={std!r}: expected positive standard deviations")
    return float(lipschitz) / float(std.min())
