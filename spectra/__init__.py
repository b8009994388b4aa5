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
from spectra._fourier import kernel_from_frequency_matrices
from spectra._operator import conv
from spectra._operator import conv_transpose
from spectra._operator import dense_operator
from spectra._spec import PADDING_MODES
from spectra._spec import ConvSpec

__all__ = [
    "APPROXIMATE_METHODS",
    "ConvSpec",
    "EXACT_METHODS",
    "FrequencyMatrices",
    "NORM_METHODS",
    "PADDING_MODES",
    "SpectralNormEstimate",
    "circular_norm_bracket",
    "circulant_embedding",
    "conv",
    "conv_transpose",
    "dense_operator",
    "frequency_matrices",
    "kernel_from_frequency_matrices",
    "lanczos_spectral_norm",
    "singular_values",
    "spectral_norm",
]
