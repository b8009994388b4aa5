"""The spectral report of a whole network (``python -m train.report``).

* :func:`network_report` / :func:`network_report_nnx`: every conv layer's exact σ_max at its
  real input size and padding, certified bounds, Frobenius norm, stable rank, σ_min, spectra;
  the network's ℓ2 Lipschitz constant bracketed (certified composition bound above, Jacobian
  power iteration below).
* :func:`write_report`: ``report.json``, ``report.md`` and the plots.
* The per-layer numbers of the default ``backend='numpy'`` come from :mod:`spectra.numpy`
  (the host, NumPy / SciPy float64, compile-free backend of ``spectra``).
"""

from train.report._api import network_report
from train.report._api import network_report_nnx
from train.report._empirical import jacobian_lower_bound
from train.report._layers import BACKENDS
from train.report._layers import ConvLayer
from train.report._layers import analyse_convs
from train.report._layers import analyse_dense
from train.report._layers import reshaped_sigma_max
from train.report._lipschitz import HARD_SWISH_LIPSCHITZ
from train.report._lipschitz import SILU_LIPSCHITZ
from train.report._sources import report_onnx
from train.report._sources import report_run
from train.report._types import METHOD_KINDS
from train.report._types import LayerReport
from train.report._types import NetworkReport
from train.report._windows import max_pool_lipschitz
from train.report._windows import max_window_count
from train.report._write import report_markdown
from train.report._write import write_report

__all__ = [
    "BACKENDS",
    "HARD_SWISH_LIPSCHITZ",
    "METHOD_KINDS",
    "SILU_LIPSCHITZ",
    "ConvLayer",
    "LayerReport",
    "NetworkReport",
    "analyse_convs",
    "analyse_dense",
    "jacobian_lower_bound",
    "max_pool_lipschitz",
    "max_window_count",
    "network_report",
    "network_report_nnx",
    "report_markdown",
    "report_onnx",
    "report_run",
    "reshaped_sigma_max",
    "write_report",
]
