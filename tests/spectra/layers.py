"""The parameterised grid of layers every spectral result is checked on (small: dense SVD is cheap).

Each case: ``(name, kernel_shape HWIO, ConvSpec)``. Covers k in {1, 2, 3, 5}, non-square kernels,
c_in != c_out, stride 1/2, dilation 1/2, groups 1/2/depthwise, every padding mode and non-square
inputs.
"""

from __future__ import annotations

import jax
import numpy as np

import spectra
from spectra import ConvSpec

_PADDINGS = ("CIRCULAR", "SAME", "VALID", "FULL", ((2, 0), (1, 1)))

# (tag, kernel (kh, kw), c_in, c_out, input (H, W), strides, dilation, groups)
_SHAPES = (
    ("k1", (1, 1), 3, 5, (6, 4), (1, 1), (1, 1), 1),
    ("k2_nonsquare_in", (2, 2), 2, 3, (6, 8), (1, 1), (1, 1), 1),
    ("k3", (3, 3), 3, 2, (6, 6), (1, 1), (1, 1), 1),
    ("k3x2", (3, 2), 2, 4, (5, 6), (1, 1), (1, 1), 1),
    ("k5", (5, 5), 2, 3, (6, 7), (1, 1), (1, 1), 1),
    ("stride2", (3, 3), 2, 3, (8, 6), (2, 2), (1, 1), 1),
    ("stride2x1", (2, 3), 3, 2, (6, 6), (2, 1), (1, 1), 1),
    ("dilation2", (3, 3), 2, 3, (7, 6), (1, 1), (2, 2), 1),
    ("dilation2x1_stride2", (2, 2), 2, 2, (8, 6), (2, 2), (2, 1), 1),
    ("groups2", (3, 3), 4, 6, (6, 5), (1, 1), (1, 1), 2),
    ("depthwise", (3, 3), 3, 3, (6, 6), (1, 1), (1, 1), 3),
    ("depthwise_mult2_stride2", (3, 2), 2, 4, (6, 8), (2, 2), (1, 1), 2),
    ("groups2_dilation2_stride2", (2, 2), 4, 2, (8, 8), (2, 2), (2, 2), 2),
)


def layer_cases(paddings=_PADDINGS):
    """Named cases for ``parameterized.named_parameters``: ``(name, kernel_shape, spec)``."""
    cases = []
    for tag, (kh, kw), cin, cout, n, s, d, g in _SHAPES:
        for pad in paddings:
            pad_tag = pad if isinstance(pad, str) else "explicit"
            spec = ConvSpec(n, s, pad, d, g, in_features=cin)
            cases.append((f"{tag}_{pad_tag}", (kh, kw, cin // g, cout), spec))
    return cases


def circular_fft_cases():
    """Circular cases whose strides divide the input (where the exact FFT method applies)."""
    return [
        c for c in layer_cases(("CIRCULAR",))
        if all(n % s == 0 for n, s in zip(c[2].input_shape, c[2].strides))
    ]


def random_kernel(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# One jitted program per (kernel shape, dtype, spec): run eagerly, `dense_operator` dispatches
# (and compiles) about ten separate small XLA programs per layer shape.
_dense_operator_jit = jax.jit(spectra.dense_operator, static_argnums=1)

# Ground truths already computed (NumPy arrays only, a few KB each): some tests check several
# properties of one layer and kernel. Bounded: emptied when it reaches _SVD_CACHE_SIZE entries.
_SVD_CACHE: dict = {}
_SVD_CACHE_SIZE = 256


def dense_operator(kernel, spec) -> np.ndarray:
    """The dense matrix of the real conv (`spectra.dense_operator`), in float64, as NumPy."""
    return np.asarray(_dense_operator_jit(np.asarray(kernel, np.float64), spec))


def exact_singular_values(kernel, spec) -> np.ndarray:
    """Ground truth: NumPy SVD of the dense operator built from the real conv, in float64."""
    kernel = np.asarray(kernel, np.float64)
    key = (kernel.shape, kernel.tobytes(), spec)
    if key not in _SVD_CACHE:
        if len(_SVD_CACHE) >= _SVD_CACHE_SIZE:
            _SVD_CACHE.clear()
        _SVD_CACHE[key] = np.linalg.svd(dense_operator(kernel, spec), compute_uv=False)
        _SVD_CACHE[key].setflags(write=False)
    return _SVD_CACHE[key]


def exact_sigma_max(dense) -> float:
    """Ground truth σ_max of a dense operator (float64): ``sqrt(λ_max)`` of its smaller Gram
    matrix, the largest eigenvalue alone (LAPACK ``syevr``).

    The same number as the first value of a full SVD, to rounding: the backward error of
    ``λ_max`` is ``O(n eps) λ_max`` (Weyl), i.e. a relative error ``O(n eps)`` in ``σ_max``
    (measured ~1e-15 against ``np.linalg.svd`` on 1152 x 1152). About 6x cheaper than the full
    SVD on the 1152 x 1152 operators of the training tests (measured, one BLAS thread).
    """
    import scipy.linalg

    a = np.asarray(dense, np.float64)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    n = gram.shape[0]
    top = scipy.linalg.eigvalsh(gram, subset_by_index=[n - 1, n - 1])[0]
    return float(np.sqrt(max(top, 0.0)))
