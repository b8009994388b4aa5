"""Certified conv layers at the end of training (and at checkpoints): projection plus a report.

:func:`certify_conv_operator_norm` rescales every conv kernel whose layer may exceed the radius
(a certified method of :func:`train.project_conv_operator_norm`) and returns a
:class:`CertificationReport`: per layer, a **certified upper bound** on the returned kernel's
exact σ_max, computed in float64 whatever the params' dtype. The bound is ``σ_max(C)`` of the
circular operator ``C`` the projection works on (exact per-frequency SVD,
``spectra.spectral_norm(kernel, spectra.circulant_embedding(spec, kernel.shape), 'fft')``):
equal to the exact σ_max for a circular layer, ``>=`` it for a zero-padded one (``C`` contains
the layer's operator as a submatrix), never an estimate.

For the training loop: :func:`certify_train_state` (the certified model of a checkpoint and its
metadata) and :func:`batch_stats_recalibrator` (BatchNorm statistics re-estimated for it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import spectra
import spectra.numpy as snp
from train import discovery
from train import distributed
from train.batchnorm import batch_norm_layers
from train.batchnorm import recalibrate_batch_stats
from train.config import TrainConfig
from train.transforms import CERTIFIED_METHODS
from train.transforms import project_conv_operator_norm

#: Default relative rounding allowance of :attr:`CertificationReport.certified`: a layer counts
#: as certified when its float64 upper bound is ``<= max_norm * (1 + tolerance)`` (the rescale
#: itself runs in the params' dtype, float32 typically, so the bound may exceed ``max_norm`` by
#: a few ulps).
CERTIFY_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class CertificationReport:
    """What :func:`certify_conv_operator_norm` did and proved, per conv layer.

    Attributes:
      method: the certified method used (one of :data:`train.transforms.CERTIFIED_METHODS`).
      layers: the params path of every conv leaf (``jax.tree_util.keystr``), in leaf order.
      max_norms: the radius ``c`` of every layer.
      upper_bounds: a certified upper bound on every returned layer's exact σ_max (float64
        ``σ_max`` of the circular operator; exact for circular layers).
      changed: whether each kernel was modified (``False``: returned bit-identical).
      tolerance: relative rounding allowance of :attr:`certified`.
      folded_with: per layer, the BatchNorm module folded into it (its bound is that of the
        folded operator, see :mod:`train.bn_aware`), ``'dense'`` for a dense weight, ``None``
        for a conv alone; ``()``: all convs alone.
    """

    method: str
    layers: tuple[str, ...]
    max_norms: tuple[float, ...]
    upper_bounds: tuple[float, ...]
    changed: tuple[bool, ...]
    tolerance: float
    folded_with: tuple[str | None, ...] = ()

    @property
    def max_upper_bound(self) -> float:
        """The largest upper bound over the layers (``0.0`` without conv layers)."""
        return max(self.upper_bounds, default=0.0)

    @property
    def max_ratio(self) -> float:
        """``max(upper_bound / max_norm)`` over the layers (``0.0`` without conv layers)."""
        return max((u / c for u, c in zip(self.upper_bounds, self.max_norms)), default=0.0)

    @property
    def any_changed(self) -> bool:
        """Whether any kernel was modified."""
        return any(self.changed)

    @property
    def certified(self) -> bool:
        """Every layer's bound ``<= max_norm * (1 + tolerance)``."""
        return self.max_ratio <= 1.0 + self.tolerance

    def as_metadata(self) -> dict[str, Any]:
        """A JSON-serialisable dict for checkpoint metadata (``"certified"``, bounds, layers)."""
        return {
            "certified": self.certified,
            "certify_method": self.method,
            "certified_max_upper_bound": self.max_upper_bound,
            "certified_max_ratio": self.max_ratio,
            "certify_tolerance": self.tolerance,
            "certify_changed_any": self.any_changed,
            "certified_layers": [
                {"layer": name, "max_norm": c, "upper_bound": u, "changed": ch,
                 **({"folded_with": f} if self.folded_with else {})}
                for name, c, u, ch, f in zip(
                    self.layers, self.max_norms, self.upper_bounds, self.changed,
                    self.folded_with or (None,) * len(self.layers),
                )
            ],
        }


def certified_upper_bound(kernel: Any, spec: spectra.ConvSpec) -> float:
    """A certified upper bound on the layer's exact σ_max, in float64 (host value).

    ``σ_max`` of :func:`spectra.circulant_embedding` ``(spec, kernel.shape)`` by per-frequency
    SVD in float64: exact for a circular ``spec``, ``>=`` the exact value for zero padding (any
    stride, dilation, groups), rounded up by its rounding allowance
    (:func:`spectra.numpy.rounding_rtol`, ~1e-12 relative). Not jittable (returns a Python
    float).

    Args:
      kernel: HWIO kernel matching ``spec``.
      spec: the layer.

    Returns:
      The bound, a Python float.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> spec = spectra.ConvSpec((8, 8), padding="CIRCULAR")
      >>> round(certified_upper_bound(jnp.ones((1, 1, 1, 1)), spec), 6)
      1.0
    """
    kernel = np.asarray(kernel, np.float64)
    cspec = spectra.circulant_embedding(spec, kernel.shape)
    with jax.enable_x64(True):
        value = float(spectra.spectral_norm(jnp.asarray(kernel, jnp.float64), cspec, "fft"))
    # Exact to rounding: rounded up by the FFT and SVD's allowance (Higham Thm 24.2, Weyl).
    return snp.round_up(value, snp.rounding_rtol(kernel.shape, cspec, ["fft"]))


def _project(params: Any, tx: optax.GradientTransformation) -> Any:
    """``params`` after one update of ``tx`` (a projection) with zero updates."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)


@functools.lru_cache(maxsize=8)
def _scalar_projection(spec_def, spec_leaves: tuple, method: str):
    """The jitted certified projection ``(params, max_norm) -> params`` of these specs."""
    specs = jax.tree.unflatten(spec_def, spec_leaves)

    @jax.jit
    def project(params, max_norm):
        return _project(
            params, project_conv_operator_norm(max_norm, specs, method=method, num_rounds=0)
        )

    return project


def certify_conv_operator_norm(
    params: Any,
    specs: Any,
    max_norm: Any,
    *,
    method: str = "certified",
    tolerance: float = CERTIFY_TOLERANCE,
) -> tuple[Any, CertificationReport]:
    """Certifies every conv layer of ``params`` at ``σ_max <= max_norm``; reports the bounds.

    Applies one update of :func:`train.project_conv_operator_norm` ``(max_norm, specs,
    method=method, num_rounds=0)`` with zero updates: every kernel whose circular operator ``C``
    may exceed ``c`` is rescaled by ``c / u`` (``'certified'``: ``u = σ_max(C)`` exact;
    ``'rescale'``: ``u`` the Gram-iteration bound, cheaper and slightly over-shrinking), every
    other kernel is returned bit-identical. Then computes, per layer, the certified float64 upper
    bound of :func:`certified_upper_bound` on the **returned** kernel. Call it on the final
    parameters (and at checkpoints) of a run trained with an approximate projection (e.g.
    ``method='power'``), and store :meth:`CertificationReport.as_metadata` with the checkpoint.
    Host-side (not jittable); the projection itself runs jitted.

    Args:
      params: the params pytree (``nnx.Variable`` wrappers allowed, as for the transform).
      specs: a :class:`spectra.ConvSpec` per conv leaf, ``None`` elsewhere (params structure).
      max_norm: ``c > 0``: a scalar or a pytree with the structure of ``specs``.
      method: one of :data:`train.transforms.CERTIFIED_METHODS` (``'certified'``, ``'rescale'``).
      tolerance: relative rounding allowance of :attr:`CertificationReport.certified` (``>= 0``).

    Returns:
      ``(params, report)``: the certified params (same structure, shapes and dtypes) and the
      :class:`CertificationReport`.

    Raises:
      ValueError: naming ``method`` or ``tolerance``, and as
        :func:`train.project_conv_operator_norm` for ``params``, ``specs`` and ``max_norm``.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> params = {'w': jnp.ones((3, 3, 2, 2)), 'b': jnp.zeros(2)}
      >>> specs = {'w': spectra.ConvSpec((8, 8), padding='SAME'), 'b': None}
      >>> params, report = certify_conv_operator_norm(params, specs, 1.0)
      >>> report.certified, report.any_changed, report.layers
      (True, True, ("['w']",))
    """
    if method not in CERTIFIED_METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {CERTIFIED_METHODS}")
    if not np.ndim(tolerance) == 0 or not float(tolerance) >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a non-negative scalar")
    tx = project_conv_operator_norm(max_norm, specs, method=method, num_rounds=0)  # Checks.
    if np.ndim(max_norm) == 0 and not isinstance(max_norm, (dict, list, tuple)):
        # A scalar radius: one compiled projection per (specs, method), reused across calls.
        spec_leaves, spec_def = jax.tree.flatten(
            nnx.as_pure(specs), is_leaf=discovery.is_spec_or_none
        )
        project = _scalar_projection(spec_def, tuple(spec_leaves), method)
        new_params = project(params, jnp.asarray(max_norm, jnp.float32))
    else:
        new_params = _project(params, tx)

    old_leaves = jax.tree.leaves(nnx.as_pure(params), is_leaf=discovery.is_leaf_or_hole)
    new_leaves = jax.tree.leaves(nnx.as_pure(new_params), is_leaf=discovery.is_leaf_or_hole)
    aligned = discovery.align_with_params(params, specs, "specs")
    if np.ndim(max_norm) == 0 and not isinstance(max_norm, (dict, list, tuple)):
        norms = [max_norm] * len(aligned)
    else:
        norms = discovery.align_with_params(params, max_norm, "max_norm")
    paths = discovery.leaf_paths(params)
    layers, radii, bounds, changed = [], [], [], []
    for path, old, new, spec, norm in zip(paths, old_leaves, new_leaves, aligned, norms):
        if spec is None or discovery.is_leaf_or_hole(old):
            continue
        layers.append(path)
        radii.append(float(norm))
        bounds.append(certified_upper_bound(new, spec))
        changed.append(not np.array_equal(np.asarray(old), np.asarray(new)))
    report = CertificationReport(
        method=method,
        layers=tuple(layers),
        max_norms=tuple(radii),
        upper_bounds=tuple(bounds),
        changed=tuple(changed),
        tolerance=float(tolerance),
    )
    return new_params, report


def certify_train_state(
    config: TrainConfig,
    specs: Any,
    state: Any,
    mesh: Any,
    recalibrate: Callable[[Any, Any], Any],
    folds: tuple = (),
    dense: tuple = (),
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model a checkpoint of the loop saves, evaluates and returns, and its certification.

    With ``config.project.max_norm`` set, :func:`certify_conv_operator_norm` (method
    ``config.project.certify_method``) runs on the host values of ``state.params``; when it
    changed a kernel, the certified params are placed on ``mesh`` and the rest of the model
    (BatchNorm statistics) is re-estimated for them by ``recalibrate(params, state.rest)``
    (see :func:`batch_stats_recalibrator`). ``state`` itself is never changed (the training
    trajectory does not depend on where checkpoints are certified).

    Args:
      config: the run's configuration (``project_max_norm``, ``project_certify_method``,
        ``fsdp``).
      specs: a :class:`spectra.ConvSpec` per conv leaf of ``state.params``, ``None`` elsewhere.
      state: a :class:`train.steps.TrainState` (``params`` and ``rest`` are read).
      mesh: the run's mesh (:func:`train.distributed.make_mesh`).
      recalibrate: ``(params, rest) -> rest``.
      folds, dense: must be empty: a BatchNorm-aware run (conv -> BatchNorm pairs, dense
        weights of a ``lipschitz_target`` run) is certified by
        :func:`train.bn_aware.certify_folded_train_state`, which the loop calls instead.

    Returns:
      ``(params, rest, separate, meta)``: the model (certified when ``config.project.max_norm``
      is set; else ``state``'s own), what to save beside the state (``{'params', 'rest'}``;
      ``None`` when it is the state's own model) and the certification's checkpoint metadata
      (:meth:`CertificationReport.as_metadata` plus ``"certified_params_separate"`` and, when
      separate, ``"certified_batch_stats_recalibrated"``; ``{"certified": False}`` without the
      projection).
    """
    if config.project.max_norm is None:
        return state.params, state.rest, None, {"certified": False}
    if folds or dense:
        raise ValueError(
            "folds / dense given: a BatchNorm-aware run is certified by "
            "train.bn_aware.certify_folded_train_state (the loop dispatches there)"
        )
    params, report = certify_conv_operator_norm(
        distributed.host_values(state.params), specs, config.project.max_norm,
        method=config.project.certify_method,
    )
    meta = {**report.as_metadata(), "certified_params_separate": report.any_changed}
    if not report.any_changed:
        return state.params, state.rest, None, meta
    params = distributed.place_state(params, mesh, config.distributed.fsdp)
    rest = recalibrate(params, state.rest)
    meta["certified_batch_stats_recalibrated"] = rest is not state.rest
    return params, rest, {"params": params, "rest": rest}, meta


def batch_stats_recalibrator(
    config: TrainConfig, graphdef_train: Any, train_data: Any, mesh: Any
) -> Callable[[Any, Any], Any]:
    """``(params, rest) -> rest``: BatchNorm statistics re-estimated for certified params.

    The returned function merges ``(params, rest)`` into the training-mode model
    ``graphdef_train`` and re-estimates its BatchNorm running statistics on
    ``config.project.certify_recalibration_batches`` batches of ``train_data``
    (:func:`train.recalibrate_batch_stats`: forward passes, no parameter change); it returns
    ``rest`` itself (the same object) when that count is 0 or the model has no BatchNorm.

    Args:
      config: the run's configuration (``project_certify_recalibration_batches``, ``fsdp``).
      graphdef_train: the model's graph definition in training mode
        (:func:`train.steps.split_model`).
      train_data: a :class:`train.batches.BatchSource` of training batches.
      mesh: the run's mesh (:func:`train.distributed.make_mesh`).

    Returns:
      The function, for :func:`certify_train_state`.
    """

    def recalibrate(params: Any, rest: Any) -> Any:
        if config.project.certify_recalibration_batches == 0:
            return rest
        model = nnx.merge(graphdef_train, params, rest)
        if not batch_norm_layers(model):
            return rest
        model = recalibrate_batch_stats(
            model, train_data, config.project.certify_recalibration_batches, mesh=mesh
        )
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return distributed.place_state(nnx.as_pure(new_rest), mesh, config.distributed.fsdp)

    return recalibrate
