"""``spectra.numpy``: the host backend of ``spectra``, in NumPy / SciPy, float64, with no XLA.

The same maths as the JAX functions of :mod:`spectra` (same conventions: HWIO kernels, HWC
inputs, ``lax`` cross-correlation, :class:`spectra.ConvSpec`), computed with BLAS / LAPACK in
float64 whatever the kernel's dtype (Lanczos with full reorthogonalisation; its products in
float32 at loose tolerances, its value and residual recomputed in float64), with nothing
compiled. A network
report analyses every layer once, each at its own input size: with JAX every distinct layer shape
costs compiled programs (seconds each on CPU), here none. Not traceable (no ``jit`` / ``vmap``):
kernels are concrete arrays.

Grouped and depthwise convs are handled per group (their operator is block diagonal): exact
spectra are the union of the groups' (:func:`singular_values`), σ_max the largest group σ_max
(:func:`lanczos_spectral_norm` runs each group that can hold it from a start vector with a
random component in every channel).

* Operator: :class:`ConvOperator`, :func:`conv`, :func:`conv_transpose`,
  :func:`dense_operator`, :func:`group_spec`, :func:`group_kernel`.
* Exact: :func:`singular_values` (``'fft'``, ``'dense'``, ``'matrix'``),
  :func:`frobenius_norm`; σ_max to a residual / bracket: :func:`lanczos_spectral_norm`.
* Upper bounds: :func:`symbol_grid_bound` / :func:`circulant_top` (exact for circular layers
  whose strides divide the input), :func:`tap_sum_bound`, :func:`per_group_upper_bounds`.
* Approximation: :func:`spectral_density_singular_values` (Yi 2020).
* Rounding: :func:`rounding_rtol` / :func:`matrix_rtol` (how far a computed value may be from
  its exact value), :func:`round_up` / :func:`round_down`.

Example:
  >>> import numpy as np
  >>> import spectra.numpy as snp
  >>> from spectra import ConvSpec
  >>> k = np.random.default_rng(0).normal(size=(3, 3, 1, 4))  # depthwise, 4 channels
  >>> spec = ConvSpec((8, 8), feature_group_count=4)
  >>> exact = snp.singular_values(k, spec, 'dense')[0]
  >>> r = snp.lanczos_spectral_norm(k, spec, rtol=1e-10)
  >>> bool(abs(r.value / exact - 1) < 1e-8), bool(r.upper >= exact)
  (True, True)
"""

from spectra.numpy._density import spectral_density_cost
from spectra.numpy._density import spectral_density_singular_values
from spectra.numpy._fourier import HOST_EXACT_METHODS
from spectra.numpy._fourier import CirculantTop
from spectra.numpy._fourier import circulant_top
from spectra.numpy._fourier import circulant_tops
from spectra.numpy._fourier import dense_cost
from spectra.numpy._fourier import disjoint_windows
from spectra.numpy._fourier import fft_applies
from spectra.numpy._fourier import frequency_entries
from spectra.numpy._fourier import singular_values
from spectra.numpy._fourier import symbol_grid_bound
from spectra.numpy._lanczos import LanczosResult
from spectra.numpy._lanczos import lanczos_spectral_norm
from spectra.numpy._lanczos import lanczos_spectral_norms
from spectra.numpy._lanczos import per_group_upper_bounds
from spectra.numpy._operator import ConvOperator
from spectra.numpy._operator import conv
from spectra.numpy._operator import conv_transpose
from spectra.numpy._operator import dense_operator
from spectra.numpy._operator import frobenius_norm
from spectra.numpy._operator import group_kernel
from spectra.numpy._operator import group_spec
from spectra.numpy._operator import tap_sum_bound
from spectra.numpy._rounding import ROUNDING_METHODS
from spectra.numpy._rounding import matrix_rtol
from spectra.numpy._rounding import round_down
from spectra.numpy._rounding import round_up
from spectra.numpy._rounding import rounding_rtol

__all__ = [
    "HOST_EXACT_METHODS",
    "ROUNDING_METHODS",
    "CirculantTop",
    "ConvOperator",
    "LanczosResult",
    "circulant_top",
    "circulant_tops",
    "conv",
    "conv_transpose",
    "dense_cost",
    "dense_operator",
    "disjoint_windows",
    "fft_applies",
    "frequency_entries",
    "frobenius_norm",
    "group_kernel",
    "group_spec",
    "lanczos_spectral_norm",
    "lanczos_spectral_norms",
    "matrix_rtol",
    "per_group_upper_bounds",
    "round_down",
    "round_up",
    "rounding_rtol",
    "singular_values",
    "spectral_density_cost",
    "spectral_density_singular_values",
    "symbol_grid_bound",
    "tap_sum_bound",
]
