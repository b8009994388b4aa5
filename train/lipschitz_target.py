"""Certify a run's ``lipschitz_target``: the network certifier at the end of training.

``TrainConfig.lipschitz_target = L`` trains under the BatchNorm-aware projection
(:mod:`train.bn_aware`) and, at the end, :func:`certify_run_target` checks that the evaluation
network's sound bound (:func:`train.report.network_report_nnx`'s ``network['lipschitz_upper']``:
the tightest proven or probabilistic bound, its kind and δ recorded) is ``<= L``. This module is
the training loop's only door into ``train.report`` (``tests/test_imports.py`` allows exactly
this edge): certifying a constant needs the network certifier, training does not.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx


class LipschitzTargetError(ValueError):
    """The evaluation network cannot be certified ``<= lipschitz_target`` (names the blocking
    op or the largest layer)."""


def lipschitz_certificate(
    model: nnx.Module, example: Any, target: float, *, tolerance: float | None = None
) -> dict[str, Any]:
    """The certified bound of ``model``'s evaluation network, compared with ``target``.

    Runs :func:`train.report.network_report_nnx` on a copy of ``model`` in evaluation mode and
    reads ``network['lipschitz_upper']``: a **certified** upper bound on the ℓ2 Lipschitz
    constant of the logits w.r.t. one input example (composition over the jaxpr of exact
    per-layer norms, BatchNorm folded into its conv), ``None`` when an op blocks the
    composition (``lipschitz_upper_note`` says which).

    Args:
      model: the trained model (its parameters and running statistics are used).
      example: an input batch (its first example fixes the shape).
      target: ``L > 0``.
      tolerance: relative rounding allowance (default
        :data:`train.certify.CERTIFY_TOLERANCE`, as the per-layer certificates): certified when
        ``bound <= L (1 + tolerance)``.

    Returns:
      ``{"lipschitz_target", "lipschitz_upper", "lipschitz_upper_kind" (the report's note: the
      kind of bound, or the blocking op), "lipschitz_lower" (Jacobian power iteration at one
      random point: a lower bound), "largest_layer", "largest_layer_sigma_max" (exact, BatchNorm
      folded where one follows), "lipschitz_tolerance", "lipschitz_certified", "error"
      (``None`` or the reason it is not certified)}``.
    """
    from train.certify import CERTIFY_TOLERANCE
    from train.report import network_report_nnx

    tol = CERTIFY_TOLERANCE if tolerance is None else float(tolerance)
    work = nnx.clone(model)
    work.eval()
    x = jnp.asarray(np.asarray(example)[:1])
    report = network_report_nnx(
        work, x, num_points=1, power_iterations=10, compute_spectra=False
    )
    net = report.network
    upper = net["lipschitz_upper"]
    largest, largest_sigma = None, None
    for layer in report.layers:
        sigma = layer.sigma_max
        if getattr(layer, "bn_folded_sigma_max", None) is not None:
            sigma = layer.bn_folded_sigma_max
        if largest_sigma is None or sigma > largest_sigma:
            largest, largest_sigma = layer.name, float(sigma)
    error = None
    if upper is None:
        error = (
            f"lipschitz_target={target}: the network's Lipschitz constant cannot be certified: "
            f"{net['lipschitz_upper_note']}"
        )
    elif not (math.isfinite(upper) and upper <= target * (1 + tol)):
        error = (
            f"lipschitz_target={target}: the certified bound of the evaluation network is "
            f"{upper:.6g} > {target}; its largest layer is {largest} (σ_max "
            f"{largest_sigma:.6g}, BatchNorm folded where one follows); lower "
            "project_max_norm (the per-layer radius) or raise lipschitz_target"
        )
    return {
        "lipschitz_target": float(target),
        "lipschitz_upper": None if upper is None else float(upper),
        "lipschitz_upper_kind": net.get("lipschitz_upper_kind"),
        "lipschitz_upper_note": net.get("lipschitz_upper_note"),
        "lipschitz_lower": float(net["lipschitz_lower"]),
        "largest_layer": largest,
        "largest_layer_sigma_max": largest_sigma,
        "lipschitz_tolerance": tol,
        "lipschitz_certified": error is None,
        "error": error,
    }


def check_lipschitz_target(
    model: nnx.Module, example: Any, target: float, *, tolerance: float | None = None
) -> dict[str, Any]:
    """:func:`lipschitz_certificate`, raising when the bound is not certified ``<= target``.

    Raises:
      LipschitzTargetError: the bound is ``None`` (message: the blocking op, the report's
        ``lipschitz_upper_note``) or ``> L (1 + tolerance)`` (message: the bound and the layer
        with the largest σ_max).
    """
    info = lipschitz_certificate(model, example, target, tolerance=tolerance)
    if info["error"] is not None:
        raise LipschitzTargetError(info["error"])
    return info


#: The file of the run folder where the loop records a ``lipschitz_target`` run's certificate.
LIPSCHITZ_FILE = "lipschitz.json"


def certify_run_target(
    config: Any, model: nnx.Module, example: Any, run_dir: Any, write: bool
) -> dict[str, Any]:
    """The loop's end-of-run check of ``config.project.lipschitz_target`` on the returned
    (certified) model: :func:`lipschitz_certificate`, written (with the per-layer radius) to
    ``run_dir / LIPSCHITZ_FILE`` when ``write``; raises :class:`LipschitzTargetError` after
    writing when it is not certified."""
    import json
    import pathlib

    info = lipschitz_certificate(model, example, config.project.lipschitz_target)
    info["per_layer_radius"] = float(config.project.max_norm)
    if write:
        (pathlib.Path(run_dir) / LIPSCHITZ_FILE).write_text(json.dumps(info, indent=2))
    if info["error"] is not None:
        raise LipschitzTargetError(info["error"])
    return info


__all__ = [
    "LIPSCHITZ_FILE",
    "LipschitzTargetError",
    "certify_run_target",
    "check_lipschitz_target",
    "lipschitz_certificate",
]
