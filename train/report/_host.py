"""The conv operator and its exact spectral numbers on the host: NumPy / SciPy, float64, no XLA.

A report analyses every layer of a network once, each at its own input size: with JAX every
distinct layer shape costs compiled programs (seconds each on CPU; measured: most of a whole
report). The functions here compute the same numbers with NumPy (BLAS / LAPACK) and SciPy's
ARPACK, with no compilation, in float64 whatever the kernel's dtype:

* :func:`conv_numpy` / :func:`conv_transpose_numpy`: the layer's operator ``A`` and its adjoint
  ``Aᵀ`` (stride, dilation, groups, any zero padding incl. asymmetric, circular), by im2col: one
  strided slice of the padded input per tap, one matmul per group. Same convention as
  :func:`spectra.conv` (``lax.conv_general_dilated``, HWIO kernels, HWC inputs).
* :func:`dense_operator_numpy`: the matrix of ``A`` (``(out_dim, in_dim)``, rows and columns
  flattened as :func:`spectra.dense_operator`).
* :func:`lanczos_sigma_max_numpy`: σ_max of any layer by matrix-free implicitly restarted Lanczos
  (``scipy.sparse.linalg.eigsh``) on the Gram matrix of the smaller side, with its residual.
* :func:`tap_sum_bound_numpy` (an **upper bound**) and :func:`frobenius_norm_numpy` (exact).

The per-frequency computations (circular spectra, the circulant-embedding bound, block-diagonal
layers, the spectral-density approximation) are in ``train.report._host_spectra``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence
from scipy.sparse.linalg import LinearOperator
from scipy.sparse.linalg import eigsh

from spectra import ConvSpec


def axis_geometry(spec: ConvSpec, kshape) -> list[tuple[int, int, int, int, int, int]]:
    """Per spatial axis ``(n, m, lo, s, d, k)``: input size, output size, leading pad, stride,
    dilation and kernel size of the layer ``spec`` with HWIO kernel shape ``kshape``."""
    return [
        (n, m, lo, s, d, k)
        for n, m, (lo, _), s, d, k in zip(
            spec.input_shape,
            spec.output_shape(kshape),
            spec.pads(kshape),
            spec.strides,
            spec.kernel_dilation,
            kshape[:2],
        )
    ]


def _batched(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as float64, checked to have shape ``(..., *shape)`` (ValueError naming ``name``)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 3 or x.shape[-3:] != shape:
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{name} must have shape (..., {dims}); got {x.shape}")
    return x


def float64_kernel(kernel, spec: ConvSpec) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``(kernel as float64 NumPy, its HWIO shape)`` after ``spec.validate(kernel)``."""
    kernel = np.asarray(kernel)
    kshape = spec.validate(kernel)
    return kernel.astype(np.float64), tuple(kshape)  # type: ignore[return-value]


def _windows(spec: ConvSpec, kshape: Sequence[int]) -> list[tuple[slice, slice]]:
    """Per tap ``(p, q)`` (row-major), the slices of the padded input it reads."""
    (ho, wo), (s1, s2), (d1, d2) = spec.output_shape(kshape), spec.strides, spec.kernel_dilation
    return [
        (
            slice(d1 * p, d1 * p + s1 * (ho - 1) + 1, s1),
            slice(d2 * q, d2 * q + s2 * (wo - 1) + 1, s2),
        )
        for p in range(kshape[0])
        for q in range(kshape[1])
    ]


class ConvOperator:
    """The operator ``A`` of one conv layer on the host (float64), set up once for many products.

    The geometry (pads, the slices each tap reads, the grouped kernel) is computed and the kernel
    validated at construction, so :meth:`apply` / :meth:`adjoint` do only the arithmetic: an
    im2col (one strided slice of the padded input per tap) and one matmul per group; the adjoint
    scatters each tap's share back, then crops zero padding or folds circular padding.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.
    """

    def __init__(self, kernel, spec: ConvSpec):
        kernel, kshape = float64_kernel(kernel, spec)
        self.spec = spec
        self.kernel_shape = kshape
        self.c_in, self.c_out = spec.channels(kshape)
        self.groups = g = spec.feature_group_count
        self.input_shape = (*spec.input_shape, self.c_in)
        self.output_shape = (*spec.output_shape(kshape), self.c_out)
        self.pads = tuple(tuple(p) for p in spec.pads(kshape))
        self.windows = _windows(spec, kshape)
        kh, kw, cig, cout = kshape
        taps = kh * kw
        k = kernel.reshape(taps, cig, g, cout // g).transpose(2, 0, 1, 3)
        self._kg = np.ascontiguousarray(k.reshape(g, taps * cig, cout // g))
        self._kgt = np.ascontiguousarray(self._kg.transpose(0, 2, 1))
        (lo1, hi1), (lo2, hi2) = self.pads
        n1, n2 = spec.input_shape
        self._padded = (n1 + lo1 + hi1, n2 + lo2 + hi2)

    @property
    def in_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.output_shape)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``A x``: ``(..., H, W, c_in)`` -> ``(..., H_out, W_out, c_out)``."""
        x = _batched(x, "x", self.input_shape)
        lead = x.shape[:-3]
        (lo1, hi1), (lo2, hi2) = self.pads
        if self.spec.is_circular:
            xp = np.pad(x, [(0, 0)] * len(lead) + [(lo1, hi1), (lo2, hi2), (0, 0)], mode="wrap")
        else:
            xp = np.zeros((*lead, *self._padded, self.c_in))
            xp[..., lo1 : lo1 + x.shape[-3], lo2 : lo2 + x.shape[-2], :] = x
        ho, wo, _ = self.output_shape
        rows = math.prod(lead) * ho * wo
        taps, g = len(self.windows), self.groups
        cols = np.empty((*lead, ho, wo, taps, self.c_in))
        for t, (a, b) in enumerate(self.windows):
            cols[..., t, :] = xp[..., a, b, :]
        if g == 1:
            y = cols.reshape(rows, taps * self.c_in) @ self._kg[0]
        else:
            cols = cols.reshape(rows, taps, g, self.c_in // g).transpose(2, 0, 1, 3)
            y = np.matmul(cols.reshape(g, rows, -1), self._kg).transpose(1, 0, 2)
        return y.reshape(*lead, *self.output_shape)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """``Aᵀ y``: ``(..., H_out, W_out, c_out)`` -> ``(..., H, W, c_in)``."""
        y = _batched(y, "y", self.output_shape)
        lead = y.shape[:-3]
        ho, wo, _ = self.output_shape
        rows = math.prod(lead) * ho * wo
        taps, g, c_in = len(self.windows), self.groups, self.c_in
        if g == 1:
            cols = y.reshape(rows, self.c_out) @ self._kgt[0]
        else:
            yg = y.reshape(rows, g, self.c_out // g).transpose(1, 0, 2)
            cols = np.matmul(yg, self._kgt)  # (g, rows, T cig)
            cols = cols.reshape(g, rows, taps, c_in // g).transpose(1, 2, 0, 3)
        cols = cols.reshape(*lead, ho, wo, taps, c_in)
        (lo1, _), (lo2, _) = self.pads
        n1, n2 = self.spec.input_shape
        xp = np.zeros((*lead, *self._padded, c_in))
        for t, (a, b) in enumerate(self.windows):
            xp[..., a, b, :] += cols[..., t, :]
        if self.spec.is_circular:
            xp = _fold(xp, xp.ndim - 3, n1, lo1)
            return _fold(xp, xp.ndim - 2, n2, lo2)
        return xp[..., lo1 : lo1 + n1, lo2 : lo2 + n2, :]

    def matrix(self) -> np.ndarray:
        """The dense matrix ``(out_dim, in_dim)``, flattened as :func:`spectra.dense_operator`."""
        eye = np.eye(self.in_dim).reshape(self.in_dim, *self.input_shape)
        return self.apply(eye).reshape(self.in_dim, -1).T


def conv_numpy(kernel, x, spec: ConvSpec) -> np.ndarray:
    """Applies the layer (no bias) to ``x`` on the host, in float64 (:class:`ConvOperator`).

    The same operator as :func:`spectra.conv` (cross-correlation, ``lax`` conventions).

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      x: ``(..., H, W, c_in)`` with ``(H, W) = spec.input_shape`` (any leading batch dims).
      spec: the layer.

    Returns:
      ``(..., H_out, W_out, c_out)`` float64.

    Example:
      >>> import numpy as np
      >>> from spectra import ConvSpec
      >>> y = conv_numpy(np.ones((3, 3, 1, 1)), np.ones((4, 4, 1)), ConvSpec((4, 4)))
      >>> y[..., 0]
      array([[4., 6., 6., 4.],
             [6., 9., 9., 6.],
             [6., 9., 9., 6.],
             [4., 6., 6., 4.]])
    """
    return ConvOperator(kernel, spec).apply(x)


def conv_transpose_numpy(kernel, y, spec: ConvSpec) -> np.ndarray:
    """Applies the adjoint ``Aᵀ`` of :func:`conv_numpy` to ``y`` ``(..., H_out, W_out, c_out)``.

    Exact adjoint (``<A x, y> = <x, Aᵀ y>``): each tap's contribution is scattered back to the
    input pixels it read; zero padding is cropped, circular padding folded back (wrap-around).

    Returns:
      ``(..., H, W, c_in)`` float64.
    """
    return ConvOperator(kernel, spec).adjoint(y)


def _fold(xp: np.ndarray, axis: int, n: int, lo: int) -> np.ndarray:
    """Adjoint of the wrap pad along ``axis``: padded index ``i`` holds input ``(i - lo) mod n``."""
    size = xp.shape[axis]
    blocks = -(-size // n)
    widths = [(0, 0)] * xp.ndim
    widths[axis] = (0, blocks * n - size)
    xp = np.pad(xp, widths)
    shape = xp.shape[:axis] + (blocks, n) + xp.shape[axis + 1 :]
    folded = xp.reshape(shape).sum(axis=axis)
    return np.roll(folded, -lo, axis=axis)


def dense_operator_numpy(kernel, spec: ConvSpec) -> np.ndarray:
    """The matrix of the layer ``(out_dim, in_dim)`` (float64), as :func:`spectra.dense_operator`.

    Rows index the output flattened ``(H_out, W_out, c_out)``, columns the input ``(H, W, c_in)``.
    Memory ``out_dim * in_dim``: for small layers.
    """
    return ConvOperator(kernel, spec).matrix()


#: ARPACK tolerance of the first run when a certified upper bound is given (see
#: :func:`lanczos_sigma_max_numpy`).
BRACKET_FIRST_TOL = 1e-3


class HostLanczosResult(NamedTuple):
    """Result of :func:`lanczos_sigma_max_numpy`.

    Attributes:
      value: σ_max estimate: the square root of a Ritz value of the Gram matrix (a lower
        estimate of the exact σ_max, up to rounding).
      residual: ``||G v − σ² v|| / σ²`` for the returned unit Ritz vector ``v`` of the Gram
        matrix ``G`` (``AᵀA``, or ``AAᵀ`` when the output is the smaller side: their nonzero
        eigenvalues are the same); some eigenvalue of ``G`` lies within ``residual * σ²`` of
        ``σ²``.
      num_matvecs: Gram products used (each one ``A`` and one ``Aᵀ``).
    """

    value: float
    residual: float
    num_matvecs: int


def lanczos_sigma_max_numpy(
    kernel,
    spec: ConvSpec,
    *,
    rtol: float = 1e-5,
    ncv: int | None = None,
    max_tries: int = 4,
    seed: int = 0,
    initial_vector: np.ndarray | None = None,
    upper_bound: float | None = None,
    bracket_rtol: float = 1e-4,
) -> HostLanczosResult:
    """σ_max of any layer, matrix-free: ARPACK's implicitly restarted Lanczos in float64.

    ``scipy.sparse.linalg.eigsh(which='LA', k=1)`` on the Gram matrix of the smaller side, its
    products computed by :class:`ConvOperator`. The residual of the returned Ritz pair is
    recomputed with one more product; when it is above ``rtol`` (ARPACK measures its tolerance
    on its own estimate) and no ``upper_bound`` brackets the value within ``bracket_rtol``, the
    run is repeated from that vector with a 10x tighter tolerance, at most ``max_tries`` times.
    Measured: on large layers (160x160, stride 2) the top of the spectrum is clustered and the
    residual needs ~200 products while the circulant bound is within 1e-4 after ~40.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      rtol: relative residual tolerance (see :class:`HostLanczosResult`).
      ncv: Lanczos vectors kept between restarts (ARPACK's default ``20`` when ``None``).
      max_tries: ARPACK runs at most.
      seed: for the random start vector (when ``initial_vector`` is not given).
      upper_bound: optional certified upper bound on σ_max (e.g. the circulant one): the run
        also stops when ``upper_bound <= value * (1 + bracket_rtol)``, i.e. when the exact σ_max
        is known to that relative accuracy (the Ritz value is a lower bound), whatever the
        residual. A first run at ARPACK tolerance :data:`BRACKET_FIRST_TOL` checks it.
      bracket_rtol: see ``upper_bound``.
      initial_vector: optional input-shaped ``(H, W, c_in)`` start (a warm start, e.g. the
        circulant top of :func:`train.report.circulant_top_numpy`); mapped through ``A`` when
        the iteration runs on ``AAᵀ``.

    Returns:
      :class:`HostLanczosResult`.

    Example:
      >>> import numpy as np
      >>> from spectra import ConvSpec
      >>> r = lanczos_sigma_max_numpy(np.ones((1, 1, 1, 1)) * 2.0, ConvSpec((8, 8)))
      >>> round(r.value, 6), r.residual <= 1e-5
      (2.0, True)
    """
    a = ConvOperator(kernel, spec)
    count = [0]
    if a.in_dim <= a.out_dim:
        dim = a.in_dim

        def gram(v):
            count[0] += 1
            return a.adjoint(a.apply(v.reshape(a.input_shape))).reshape(-1)
    else:
        dim = a.out_dim

        def gram(u):
            count[0] += 1
            return a.apply(a.adjoint(u.reshape(a.output_shape))).reshape(-1)

    if initial_vector is not None:
        v = np.asarray(initial_vector, np.float64)
        if v.size != a.in_dim:
            raise ValueError(f"initial_vector has {v.size} entries; expected in_dim={a.in_dim}")
        if dim != a.in_dim:
            v = a.apply(v.reshape(a.input_shape))
        v = v.reshape(-1)
    if initial_vector is None or not np.any(v):
        v = np.random.default_rng(seed).standard_normal(dim)
    if dim <= 2:  # ARPACK needs k < dim - 1: the Gram matrix is tiny, do it densely.
        g = np.stack([gram(e) for e in np.eye(dim)], axis=1)
        theta = float(np.linalg.eigvalsh(g)[-1])
        return HostLanczosResult(math.sqrt(max(theta, 0.0)), 0.0, count[0])
    op = LinearOperator((dim, dim), matvec=gram, dtype=np.float64)
    ncv = min(dim, ncv or 20)
    # With a certified upper bound, a first loose run often closes the bracket already.
    tol = max(rtol, BRACKET_FIRST_TOL) if upper_bound is not None else rtol
    theta, residual = 0.0, math.inf
    for _ in range(max(max_tries, 1) + (tol > rtol)):
        try:
            w, vecs = eigsh(op, k=1, which="LA", v0=v, tol=tol, ncv=ncv, maxiter=100 * dim)
        except ArpackNoConvergence as e:  # pragma: no cover - partial result, residual below
            w, vecs = e.eigenvalues, e.eigenvectors
            if len(w) == 0:
                break
        v = vecs[:, 0] / np.linalg.norm(vecs[:, 0])
        gv = gram(v)
        theta = float(v @ gv)  # Rayleigh quotient of the normalised vector.
        residual = float(np.linalg.norm(gv - theta * v) / theta) if theta > 0 else 0.0
        sigma = math.sqrt(max(theta, 0.0))
        if residual <= rtol or (
            upper_bound is not None and upper_bound <= sigma * (1 + bracket_rtol)
        ):
            break
        tol = rtol if tol > rtol else tol / 10
    return HostLanczosResult(math.sqrt(max(theta, 0.0)), residual, count[0])


def tap_sum_bound_numpy(kernel, spec: ConvSpec) -> float:
    """``max_g Σ_pq ||K_g[p, q]||_2``: **upper bound** at any padding, stride and dilation.

    ``A = Σ_pq S_pq ⊗ K[p, q]`` with each ``S_pq`` a partial selection (each output pixel reads
    at most one input pixel through a tap, each input pixel is read at most once): norm <= 1.
    Groups make ``A`` block diagonal. Exact for 1x1 kernels (with one output reading real
    input). ``spectra.tap_sum_bound`` also tries the polyphase kernel (sometimes tighter).
    """
    kernel, _ = float64_kernel(kernel, spec)
    kh, kw, cig, cout = kernel.shape
    g = spec.feature_group_count
    taps = kernel.reshape(kh * kw, cig, g, cout // g).transpose(2, 0, 1, 3)  # (g, T, cig, cog)
    norms = np.linalg.norm(taps, ord=2, axis=(-2, -1))  # (g, T)
    return float(norms.sum(axis=1).max())


def frobenius_norm_numpy(kernel, spec: ConvSpec) -> float:
    """``||A||_F`` exactly, from the kernel: each tap's ``||K[p, q]||_F^2`` times the number of
    output pixels at which it reads a real input pixel (all of them for circular padding).
    ``spectra.frobenius_norm_squared`` on the host."""
    kernel, kshape = float64_kernel(kernel, spec)
    counts = []
    for n, m, lo, s, d, k in axis_geometry(spec, kshape):
        if spec.is_circular:
            counts.append(np.full(k, m, dtype=np.float64))
            continue
        pos = s * np.arange(m)[:, None] + d * np.arange(k)[None, :] - lo
        counts.append(np.sum((pos >= 0) & (pos < n), axis=0).astype(np.float64))
    return float(math.sqrt(np.sum(np.sum(kernel**2, axis=(2, 3)) * np.outer(*counts))))
