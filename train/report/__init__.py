"""The spectral report of a whole network (``python -m train.report``).

* :func:`network_report` / :func:`network_report_nnx`: every conv layer's exact σ_max at its
  real input size and padding, certified bounds, Frobenius norm, stable rank, σ_min, spectra;
  the network's ℓ2 Lipschitz constant bracketed (certified composition bound above, a searched
  realised lower bound below: :func:`search_lower_bound`, its witness re-evaluated by
  :func:`recompute_lower_bound`; :func:`check_upper_bound` counts pairs that violate a bound).
* :func:`write_report`: ``report.json``, ``report.md`` and the plots.
* The host (NumPy / SciPy, float64, compile-free) operator and exact per-layer numbers the
  default ``backend='numpy'`` uses: :func:`conv_numpy`, :func:`conv_transpose_numpy`,
  :func:`dense_operator_numpy`, :func:`lanczos_sigma_max_numpy`,
  :func:`circular_singular_values_numpy`, :func:`block_singular_values`, bounds
  :func:`circulant_sigma_max_numpy` and :func:`tap_sum_bound_numpy`.
"""

from train.report._api import network_report
from train.report._api import network_report_nnx
from train.report._empirical import jacobian_lower_bound
from train.report._host import ConvOperator
from train.report._host import HostLanczosResult
from train.report._host import conv_numpy
from train.report._host import conv_transpose_numpy
from train.report._host import dense_operator_numpy
from train.report._host import frobenius_norm_numpy
from train.report._host import lanczos_sigma_max_numpy
from train.report._host import tap_sum_bound_numpy
from train.report._host_spectra import block_singular_values
from train.report._host_spectra import circulant_sigma_max_numpy
from train.report._host_spectra import circulant_top_numpy
from train.report._host_spectra import circular_singular_values_numpy
from train.report._host_spectra import disjoint_windows
from train.report._host_spectra import spectral_density_values_numpy
from train.report._layers import BACKENDS
from train.report._layers import ConvLayer
from train.report._layers import analyse_convs
from train.report._layers import analyse_dense
from train.report._layers import reshaped_sigma_max
from train.report._lipschitz import HARD_SWISH_LIPSCHITZ
from train.report._lipschitz import SILU_LIPSCHITZ
from train.report._lower import LowerBound
from train.report._lower import check_upper_bound
from train.report._lower import random_pairs
from train.report._lower import recompute_lower_bound
from train.report._lower import search_lower_bound
from train.report._lower import soundness_pairs
from train.report._sources import report_onnx
from train.report._sources import report_run
from train.report._types import METHOD_KINDS
from train.report._types import LayerReport
from train.report._types import NetworkReport
from train.report._windows import max_pool_lipschitz
from train.report._windows import max_window_count
from train.report._write import WITNESS_NAME
from train.report._write import report_markdown
from train.report._write import write_report

__all__ = [
    "BACKENDS",
    "HARD_SWISH_LIPSCHITZ",
    "METHOD_KINDS",
    "SILU_LIPSCHITZ",
    "WITNESS_NAME",
    "ConvLayer",
    "ConvOperator",
    "HostLanczosResult",
    "LayerReport",
    "LowerBound",
    "NetworkReport",
    "analyse_convs",
    "analyse_dense",
    "block_singular_values",
    "check_upper_bound",
    "circulant_sigma_max_numpy",
    "circulant_top_numpy",
    "circular_singular_values_numpy",
    "conv_numpy",
    "conv_transpose_numpy",
    "dense_operator_numpy",
    "disjoint_windows",
    "frobenius_norm_numpy",
    "jacobian_lower_bound",
    "lanczos_sigma_max_numpy",
    "max_pool_lipschitz",
    "max_window_count",
    "network_report",
    "network_report_nnx",
    "random_pairs",
    "recompute_lower_bound",
    "report_markdown",
    "report_onnx",
    "report_run",
    "reshaped_sigma_max",
    "search_lower_bound",
    "soundness_pairs",
    "spectral_density_values_numpy",
    "tap_sum_bound_numpy",
    "write_report",
]
