"""The spectral report of a whole network (``python -m train.report``).

* :func:`network_report` / :func:`network_report_nnx`: every conv layer's exact σ_max at its
  real input size and padding, certified bounds, Frobenius norm, stable rank, σ_min, spectra;
  the network's ℓ2 Lipschitz constant bracketed (certified bounds above, a searched realised
  lower bound below: :func:`search_lower_bound`, its witness re-evaluated by
  :func:`recompute_lower_bound`; :func:`check_upper_bound` counts pairs that violate a bound).
* :func:`report_onnx` / :func:`report_run`: the report of an ONNX file or of a training run.
* :class:`ReportOptions`: how a report is computed, one frozen object (every entry point also
  takes its fields as keyword arguments).
* :func:`write_report`: ``report.json``, ``report.md`` and the plots;
  :func:`report_markdown`: the Markdown alone.
* :class:`NetworkReport`, :class:`LayerReport`: what they return; :data:`METHOD_KINDS`: what
  each method name in a report means (exact, bound, estimate); :data:`BACKENDS`: the values of
  ``network_report(backend=...)``.

The parts (the host NumPy operator, per-layer analysis, the Lipschitz composition, windows)
live in the private modules ``train.report._*``; tests import them from there. The per-layer
numbers of the default ``backend='numpy'`` come from :mod:`spectra.numpy` (float64, compile-free).
"""

from train.report._api import network_report
from train.report._api import network_report_nnx
from train.report._empirical import jacobian_lower_bound
from train.report._layers import BACKENDS
from train.report._lower import LowerBound
from train.report._lower import check_upper_bound
from train.report._lower import random_pairs
from train.report._lower import recompute_lower_bound
from train.report._lower import search_lower_bound
from train.report._lower import soundness_pairs
from train.report._options import ReportOptions
from train.report._sources import report_onnx
from train.report._sources import report_run
from train.report._types import METHOD_KINDS
from train.report._types import LayerReport
from train.report._types import NetworkReport
from train.report._write import WITNESS_NAME
from train.report._write import report_markdown
from train.report._write import write_report

__all__ = [
    "BACKENDS",
    "METHOD_KINDS",
    "WITNESS_NAME",
    "LayerReport",
    "LowerBound",
    "NetworkReport",
    "ReportOptions",
    "check_upper_bound",
    "jacobian_lower_bound",
    "network_report",
    "network_report_nnx",
    "random_pairs",
    "recompute_lower_bound",
    "report_markdown",
    "report_onnx",
    "report_run",
    "search_lower_bound",
    "soundness_pairs",
    "write_report",
]
