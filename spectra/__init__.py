"""convspectra.spectra: singular values of conv layers as pure JAX functions.

Conventions
-----------
* Kernels are HWIO, exactly as Flax/``lax`` take them: ``(kh, kw, c_in // groups, c_out)``.
* Inputs are HWC (or NHWC); the operator is the cross-correlation computed by
  ``lax.conv_general_dilated`` (what ``flax.nnx.Conv`` applies, bias excluded).
* A layer's operator is fixed by a :class:`ConvSpec` (frozen, hashable: safe as a static jit
  argument): ``input_shape=(H, W)``, ``strides``, ``padding`` (``'CIRCULAR'`` as in
  ``flax.nnx.Conv``, ``'SAME'``, ``'VALID'``, ``'FULL'`` or explicit zero padding
  ``((lo, hi), (lo, hi))``), ``kernel_dilation``, ``feature_group_count``.
* :func:`dense_operator` flattens the input as ``(H, W, c_in)`` and the output as
  ``(H_out, W_out, c_out)`` (row-major); it is the ground truth every result is tested against.
* Every docstring says whether a number is exact, an upper bound, a lower estimate or an
  approximation, and for which padding.
* Every function works under ``jax.jit`` (spec static) and ``jax.vmap`` over stacked kernels.
"""

from spectra._bounds import SPEC_DEPENDENT_BOUNDS
from spectra._bounds import UPPER_BOUNDS
from spectra._bounds import araujo_lipbound
from spectra._bounds import exact_circular_spec
from spectra._bounds import frobenius_bound
from spectra._bounds import frobenius_kernel_bound
from spectra._bounds import gram_iteration_bound
from spectra._bounds import l1_matrix_bound
from spectra._bounds import l1_schur_bound
from spectra._bounds import matricisation_bound
from spectra._bounds import singla_feizi_bound
from spectra._bounds import symbol_grid_bound
from spectra._bounds import symbol_sup_bound
from spectra._bounds import tap_sum_bound
from spectra._bounds import tensor_norm_bound
from spectra._caches import clear_caches
from spectra._density import CORRECTIONS
from spectra._density import DEFAULT_CORRECTION
from spectra._density import DEFAULT_GRID
from spectra._density import GRIDS
from spectra._density import TAPER_FRACTION
from spectra._density import FrequencyGrid
from spectra._density import circulant_singular_values
from spectra._density import frobenius_norm_squared
from spectra._density import grid_points
from spectra._density import spectral_density
from spectra._density import spectral_density_singular_values
from spectra._exact import APPROXIMATE_METHODS
from spectra._exact import EXACT_METHODS
from spectra._exact import NORM_METHODS
from spectra._exact import SpectralNormEstimate
from spectra._exact import circular_norm_bracket
from spectra._exact import lanczos_spectral_norm
from spectra._exact import singular_values
from spectra._exact import spectral_norm
from spectra._fourier import FrequencyMatrices
from spectra._fourier import circulant_embedding
from spectra._fourier import frequency_matrices
from spectra._fourier import half_plane_multiplicity
from spectra._fourier import kernel_from_frequency_matrices
from spectra._operator import conv
from spectra._operator import conv_transpose
from spectra._operator import dense_operator
from spectra._project import CLIP_METHODS
from spectra._project import ClipResult
from spectra._project import PowerClipResult
from spectra._project import clip_operator_norm
from spectra._project import clip_operator_norm_power
from spectra._spec import PADDING_MODES
from spectra._spec import ConvSpec
from spectra._spec import normalize_padding
from spectra._tt import tt_matrix_apply
from spectra._tt import tt_matrix_contract
from spectra._tt import tt_matrix_svd
from spectra._tt import tt_matrix_to_full
from spectra._tt import tt_matvec
from spectra._tt import tt_num_params
from spectra._tt import tt_ranks
from spectra._tt import tt_svd
from spectra._tt import tt_to_full

__all__ = [
    "APPROXIMATE_METHODS",
    "CLIP_METHODS",
    "CORRECTIONS",
    "ClipResult",
    "ConvSpec",
    "DEFAULT_CORRECTION",
    "DEFAULT_GRID",
    "EXACT_METHODS",
    "FrequencyGrid",
    "FrequencyMatrices",
    "GRIDS",
    "NORM_METHODS",
    "PADDING_MODES",
    "PowerClipResult",
    "SPEC_DEPENDENT_BOUNDS",
    "SpectralNormEstimate",
    "TAPER_FRACTION",
    "UPPER_BOUNDS",
    "araujo_lipbound",
    "circulant_embedding",
    "circulant_singular_values",
    "circular_norm_bracket",
    "clear_caches",
    "clip_operator_norm",
    "clip_operator_norm_power",
    "conv",
    "conv_transpose",
    "dense_operator",
    "exact_circular_spec",
    "frequency_matrices",
    "frobenius_bound",
    "frobenius_kernel_bound",
    "frobenius_norm_squared",
    "grid_points",
    "gram_iteration_bound",
    "half_plane_multiplicity",
    "kernel_from_frequency_matrices",
    "l1_matrix_bound",
    "l1_schur_bound",
    "lanczos_spectral_norm",
    "matricisation_bound",
    "normalize_padding",
    "singla_feizi_bound",
    "singular_values",
    "spectral_density",
    "spectral_density_singular_values",
    "spectral_norm",
    "symbol_grid_bound",
    "symbol_sup_bound",
    "tap_sum_bound",
    "tensor_norm_bound",
    "tt_matrix_apply",
    "tt_matrix_contract",
    "tt_matrix_svd",
    "tt_matrix_to_full",
    "tt_matvec",
    "tt_num_params",
    "tt_ranks",
    "tt_svd",
    "tt_to_full",
]
