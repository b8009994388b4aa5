"""The records of a network report: one :class:`LayerReport` per layer, a :class:`NetworkReport`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: Every method name a report may carry, with what the number is.
METHOD_KINDS = {
    "fft": "exact",
    "dense": "exact",
    "matrix": "exact (block-diagonal layer: SVD of the kernel's per-pixel blocks)",
    "lanczos": (
        "exact to the stated tolerance (a Ritz value, a lower bound, within sigma_max_tolerance "
        "of the certified upper bound: sigma_max_bracket)"
    ),
    "lanczos_estimate": (
        "estimate (a Ritz value: a lower bound with its residual; the certified bracket "
        "sigma_max_bracket did not close within sigma_max_tolerance)"
    ),
    "symbol_grid": "bound",
    "symbol_sup": "bound",
    "matricisation": "bound",
    "tap_sum": "bound",
    "per_group": "bound (the largest over the groups of each group's smallest bound)",
    "l1_schur": "bound",
    "spectral_density": "approximation",
    "jacobian_power_iteration": "estimate (lower bound)",
    "pair_ascent": "lower bound (a realised ratio ||f(x)-f(y)||/||x-y||)",
    "search": "lower bound (the largest realised ratio or ||J(x) v||/||v|| found; witness saved)",
    "composition": "bound",
}


@dataclasses.dataclass
class LayerReport:
    """What the report says about one linear layer (conv kernels HWIO; dense ``(in, out)``).

    Every ``*_method`` names how its number was obtained; :data:`METHOD_KINDS` says whether that
    is exact, a certified bound, an estimate or an approximation. ``None`` where a number does
    not apply. ``spectrum`` (not written to ``report.json``) is the sorted singular values used
    for the plot, ``spectrum_method`` says whether they are exact or approximate.
    ``sigma_max_bracket`` is a certified ``(lower, upper)`` bracket on the exact σ_max
    (``σ`` rounded down and up by ``rounding_rtol`` for exact methods). ``rounding_rtol`` is the
    relative allowance for the floating-point rounding of the layer's values
    (:func:`spectra.numpy.rounding_rtol`): ``upper_bound``, ``bn_folded_upper_bound`` and the
    bracket are already rounded up (down) by it, and the composition uses exact values rounded
    up by it. ``sigma_max_tolerance`` the relative width within which a
    Lanczos value is called exact (``'lanczos'``; wider: ``'lanczos_estimate'``).
    """

    name: str
    op: str
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, int] | None
    strides: tuple[int, int] | None
    padding: Any
    dilation: tuple[int, int] | None
    groups: int | None
    sigma_max: float
    sigma_max_method: str
    sigma_max_residual: float | None
    sigma_max_certified: bool
    upper_bound: float
    upper_bound_name: str
    reshaped_sigma_max: float
    frobenius: float
    stable_rank: float
    sigma_min: float | None
    sigma_min_method: str | None
    sigma_max_bracket: tuple[float, float] | None = None
    sigma_max_tolerance: float | None = None
    bn_folded_sigma_max: float | None = None
    bn_folded_upper_bound: float | None = None
    spectrum_method: str | None = None
    num_singular_values: int | None = None
    rounding_rtol: float | None = None
    spectrum: np.ndarray | None = dataclasses.field(default=None, repr=False)
    spectrum_ranks: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the spectrum)."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name in ("spectrum", "spectrum_ranks"):
                continue
            out[field.name] = _jsonable(getattr(self, field.name))
        return out


@dataclasses.dataclass
class NetworkReport:
    """The report of a whole network.

    Attributes:
      layers: one :class:`LayerReport` per conv (and dense) layer, in the order the network
        applies them.
      network: ``lipschitz_upper`` (the tightest sound ℓ2 upper bound: the smaller of the
        composition ``lipschitz_upper_naive`` and the midpoint bound ``lipschitz_upper_tight``
        of :mod:`train.report._network_bound`; ``lipschitz_upper_kind`` ``'proven'`` or
        ``'probabilistic'`` with failure probability ``lipschitz_upper_delta``;
        ``lipschitz_upper_factor`` = naive / upper; ``blocks``: per nonlinearity input, its
        bound and the norms that gave it), ``lipschitz_upper_naive`` (certified ℓ2 bound by
        composition, or ``None``),
        ``lipschitz_upper_note`` (how, or the first operation that blocks certification),
        ``lipschitz_lower`` (the largest realised ratio ``||f(x)-f(y)||/||x-y||`` or
        ``||J(x) v||/||v||`` the search found: a lower bound on the Lipschitz constant; ``None``
        if its stage failed), ``lipschitz_lower_method``, ``lipschitz_lower_stages``,
        ``lipschitz_lower_witness`` (``{file, kind, value}``), ``soundness`` (``None`` unless
        asked), ``errors`` (``{stage, type, message, where}`` per failed stage),
        ``lipschitz_gap`` (upper / lower),
        ``lipschitz_upper_uncertified`` (the same composition with the layers' ``sigma_max``
        instead of their certified bounds: an estimate), ``num_points``.
      timings: seconds per stage.
      witness: the lower bound's witness (``{'kind': 'pair', 'x', 'y', ...}`` or ``{'kind':
        'jacobian', 'x', 'v', ...}``, see :func:`train.report.search_lower_bound`), or ``None``;
        not in ``to_dict``: :func:`train.report.write_report` saves it as ``.npz``.
    """

    layers: list[LayerReport]
    network: dict[str, Any]
    timings: dict[str, float]
    witness: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "network": {k: _jsonable(v) for k, v in self.network.items()},
            "timings": {k: float(v) for k, v in self.timings.items()},
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    return str(value)
