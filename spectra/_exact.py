"""Exact singular values and spectral norms of conv layers: FFT, dense and matrix-free Lanczos."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectra import _fourier
from spectra._operator import conv
from spectra._operator import conv_transpose
from spectra._operator import dense_operator
from spectra._spec import ConvSpec
from spectra._spec import is_concrete

EXACT_METHODS = ("fft", "dense")
NORM_METHODS = ("fft", "fft_gram", "dense", "lanczos")
APPROXIMATE_METHODS = ("spectral_density", "circulant")

#: ``method='auto'`` densifies a zero-padded layer only when both dims are at most this.
MAX_AUTO_DENSE_DIM = 4096


def _fft_applies(spec: ConvSpec) -> bool:
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


def singular_values(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, method: str = "auto", **kwargs
) -> jax.Array:
    """All singular values of the layer, with multiplicity, sorted descending.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.
      method: ``'fft'`` (exact; circular padding, strides dividing the input; any dilation,
        groups and kernel size: a kernel larger than the input folds modulo it), ``'dense'``
        (exact; SVD of :func:`dense_operator`, any layer small enough to densify), ``'auto'``
        (the exact method that fits: ``'fft'`` where it applies, else ``'dense'`` when both
        dims are at most ``MAX_AUTO_DENSE_DIM``), or an approximation:
        ``'spectral_density'`` (Yi 2020) or ``'circulant'`` (treat the layer as circular).
      **kwargs: passed to the approximation (e.g. ``grid=``).

    Returns:
      ``(min(in_dim, out_dim),)``: exact for ``'fft'``/``'dense'``, approximate otherwise.
    """
    kernel = jnp.asarray(kernel)
    kshape = spec.validate(kernel)
    if method == "auto":
        if _fft_applies(spec):
            method = "fft"
        elif max(spec.in_dim(kshape), spec.out_dim(kshape)) <= MAX_AUTO_DENSE_DIM:
            method = "dense"
        else:
            raise ValueError(
                f"no exact method fits spec={spec} (zero padding, in_dim={spec.in_dim(kshape)}, "
                f"out_dim={spec.out_dim(kshape)} > {MAX_AUTO_DENSE_DIM} to densify): use "
                f"method='dense' explicitly, or an approximation: {APPROXIMATE_METHODS}; "
                "spectral_norm(method='lanczos') gives the exact largest one"
            )
    return _singular_values_jit(kernel, spec, method, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _singular_values_jit(kernel, spec, method, kwargs):
    """Compiles the whole computation once per (shape, spec, method): eager dispatch of its
    many small ops would otherwise compile each one separately."""
    kshape = kernel.shape
    kwargs = dict(kwargs)
    if method == "fft":
        fm = _fourier.frequency_matrices(kernel, spec)
        sv = jnp.linalg.svd(fm.matrices, compute_uv=False)
        return _fourier.sort_descending(
            _fourier.expand_multiplicity(sv, fm.multiplicity, spec.num_singular_values(kshape))
        )
    if method == "dense":
        return jnp.linalg.svd(dense_operator(kernel, spec), compute_uv=False)
    if method in APPROXIMATE_METHODS:
        from spectra import _density  # Local import: _density builds on this module.

        if method == "circulant":
            return _density.circulant_singular_values(kernel, spec, **kwargs)
        return _density.spectral_density_singular_values(kernel, spec, **kwargs)
    raise ValueError(
        f"method={method!r} is unknown; expected 'auto', one of {EXACT_METHODS} (exact) or "
        f"{APPROXIMATE_METHODS} (approximate)"
    )


def spectral_norm(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, method: str = "auto", **kwargs
) -> jax.Array:
    """The largest singular value (operator 2-norm) of the layer.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.
      method: ``'fft'`` (exact, per-frequency SVD; circular), ``'fft_gram'`` (circular; per
        frequency Gram squaring + Rayleigh quotient: a lower estimate exact to
        ``(σ2/σ1)^(2^(t+1))``, see :func:`circular_norm_bracket`), ``'dense'`` (exact, small
        layers), ``'lanczos'`` (exact to a tolerance, matrix-free, any layer; see
        :func:`lanczos_spectral_norm`), ``'auto'`` (``'fft'`` where it applies, else
        ``'lanczos'``), or an approximation from :func:`singular_values`.
      **kwargs: passed to the method.

    Returns:
      A scalar. Differentiable (for ``'lanczos'`` through the top singular vectors).
    """
    kernel = jnp.asarray(kernel)
    spec.validate(kernel)
    if method == "auto":
        method = "fft" if _fft_applies(spec) else "lanczos"
    if method in APPROXIMATE_METHODS:
        return singular_values(kernel, spec, method, **kwargs)[0]
    return _spectral_norm_jit(kernel, spec, method, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _spectral_norm_jit(kernel, spec, method, kwargs):
    kwargs = dict(kwargs)
    if method == "fft":
        mats = _fourier.frequency_matrices(kernel, spec).matrices
        return jnp.max(jnp.linalg.svd(mats, compute_uv=False)[..., 0])
    if method == "fft_gram":
        return circular_norm_bracket(kernel, spec, **kwargs)[0]
    if method == "lanczos":
        return lanczos_spectral_norm(kernel, spec, **kwargs).value
    if method == "dense":
        return jnp.linalg.svd(dense_operator(kernel, spec), compute_uv=False)[0]
    raise ValueError(
        f"method={method!r} is unknown; expected 'auto', one of {NORM_METHODS} or "
        f"{APPROXIMATE_METHODS} (approximate)"
    )


def circular_norm_bracket(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, num_squarings: int = 6
) -> tuple[jax.Array, jax.Array]:
    r"""Certified ``(lower, upper)`` bracket of the circular layer's σ_max, from matmuls only.

    Per frequency, with the Gram matrix ``G`` of the smaller side, the normalised squarings
    ``H_{j+1} = (H_j / ||H_j||_F)^2`` give (Delattre et al. 2023)
    ``log λ1(G) <= Σ_j 2^{-j} log ||H_j||_F`` (an **upper bound**), while the dominant column of
    ``H_t`` is a power-iteration vector of ``G^(2^t)``: its Rayleigh quotient is a **lower
    estimate** (a true value of the spectrum's numerical range, ≤ λ1) whose error decays like
    ``(λ2/λ1)^(2^(t+1))``. The max over frequencies of each side brackets the exact σ_max.

    Args:
      kernel: HWIO kernel.
      spec: a circular spec whose strides divide the input.
      num_squarings: ``t``; the upper bound tightens like ``rank^(1/2^(t+1))``.

    Returns:
      ``(lower, upper)`` scalars with ``lower <= σ_max <= upper``.
    """
    mats = _fourier.frequency_matrices(kernel, spec).matrices
    rows, cols = mats.shape[-2:]
    if rows <= cols:
        gram = mats @ jnp.conj(jnp.swapaxes(mats, -1, -2))
    else:
        gram = jnp.conj(jnp.swapaxes(mats, -1, -2)) @ mats
    tiny = jnp.finfo(gram.real.dtype).tiny

    def step(carry, _):
        h, log_bound, weight = carry
        norm = jnp.maximum(jnp.linalg.norm(h, axis=(-2, -1)), tiny)
        log_bound = log_bound + weight * jnp.log(norm)
        h = h / norm[..., None, None]
        return (h @ h, log_bound, weight / 2), None

    init = (gram, jnp.zeros(gram.shape[:-2], gram.real.dtype), jnp.ones((), gram.real.dtype))
    (h, log_bound, weight), _ = jax.lax.scan(step, init, None, length=num_squarings)
    final_norm = jnp.maximum(jnp.linalg.norm(h, axis=(-2, -1)), tiny)
    log_bound = log_bound + weight * jnp.log(final_norm)
    col_norms = jnp.linalg.norm(h, axis=-2)
    idx = jnp.argmax(col_norms, axis=-1)
    v = jnp.take_along_axis(h, idx[..., None, None], axis=-1)[..., 0]
    gv = (gram @ v[..., None])[..., 0]
    num = jnp.real(jnp.sum(jnp.conj(v) * gv, axis=-1))
    den = jnp.maximum(jnp.real(jnp.sum(jnp.conj(v) * v, axis=-1)), tiny)
    lower = jnp.sqrt(jnp.maximum(jnp.max(num / den), 0.0))
    upper = jnp.exp(0.5 * jnp.max(log_bound))
    return lower, upper


class SpectralNormEstimate(NamedTuple):
    """Result of :func:`lanczos_spectral_norm`.

    Attributes:
      value: σ_max estimate (a Ritz value: ≤ the exact σ_max up to rounding).
      residual: ``||AᵀA v − σ² v|| / σ²`` for the returned unit vector ``v``; some eigenvalue of
        ``AᵀA`` lies within ``residual * σ²`` of ``σ²``.
      num_restarts: Lanczos restarts used.
      right_vector: unit top right singular vector, input-shaped ``(H, W, c_in)``.
      left_vector: unit top left singular vector, output-shaped ``(H_out, W_out, c_out)``.
    """

    value: jax.Array
    residual: jax.Array
    num_restarts: jax.Array
    right_vector: jax.Array
    left_vector: jax.Array


def _lanczos_cycle(matvec, v0: jax.Array, num_steps: int):
    """One cycle of Lanczos with full reorthogonalisation; returns the top Ritz pair."""
    dim = v0.shape[0]
    basis = jnp.zeros((num_steps + 1, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    tiny = jnp.finfo(v0.dtype).tiny
    eps = jnp.finfo(v0.dtype).eps

    def body(j, carry):
        basis, alphas, betas = carry
        w = matvec(basis[j])
        alpha = jnp.vdot(basis[j], w)
        scale = jnp.linalg.norm(w)
        for _ in range(2):  # Classical Gram-Schmidt, twice: full reorthogonalisation.
            # (basis @ w) @ basis, not basis.T @ (...): XLA CPU would transpose (copy) the
            # whole basis at every step, which made the cycle ~10x slower.
            w = w - (basis @ w) @ basis
        beta = jnp.linalg.norm(w)
        # Breakdown (an invariant subspace was found): what is left of w is rounding noise, which
        # normalising would turn into a non-orthogonal direction. Stop the recurrence instead: the
        # Ritz values are then exact and later steps only add zeros to the tridiagonal matrix.
        breakdown = beta <= 64 * eps * scale + tiny
        beta = jnp.where(breakdown, 0.0, beta)
        basis = basis.at[j + 1].set(jnp.where(breakdown, 0.0, w / jnp.maximum(beta, tiny)))
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

    zeros = jnp.zeros(num_steps, v0.dtype)
    basis, alphas, betas = jax.lax.fori_loop(0, num_steps, body, (basis, zeros, zeros))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    evals, evecs = jnp.linalg.eigh(tri)
    theta, y = evals[-1], evecs[:, -1]
    ritz = basis[:num_steps].T @ y
    residual = jnp.abs(betas[-1] * y[-1])
    return theta, ritz / jnp.linalg.norm(ritz), residual


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _lanczos(kernel, v0, spec, num_steps, rtol, max_restarts):
    """Restarted Lanczos; returns ``(sigma, residual, restarts, v, u)`` (restarts as float)."""
    kshape = kernel.shape
    x_shape = (*spec.input_shape, spec.channels(kshape)[0])
    dim = v0.size
    tiny = jnp.finfo(kernel.dtype).tiny

    def matvec(v):
        y = conv(kernel, v.reshape(x_shape), spec)
        return conv_transpose(kernel, y, spec).reshape(-1)

    def cycle(v):
        theta, v, res = _lanczos_cycle(matvec, v, min(num_steps, dim))
        return v, theta, res / jnp.maximum(theta, tiny)

    def cond(carry):
        return (carry[2] > rtol) & (carry[3] < max(max_restarts, 1))

    def body(carry):
        return (*cycle(carry[0]), carry[3] + 1)

    # The first cycle runs inside the loop too, so the cycle is compiled once.
    v0 = v0.reshape(dim)
    inf = jnp.array(jnp.inf, kernel.dtype)
    init = (v0, jnp.zeros((), kernel.dtype), inf, jnp.zeros((), kernel.dtype))
    v, theta, residual, count = jax.lax.while_loop(cond, body, init)
    sigma = jnp.sqrt(jnp.maximum(theta, 0.0))
    u = conv(kernel, v.reshape(x_shape), spec)
    u = u / jnp.maximum(jnp.linalg.norm(u), tiny)
    return sigma, residual, count, v.reshape(x_shape), u


_lanczos_jit = jax.jit(_lanczos, static_argnums=(2, 3, 4, 5))


@_lanczos.defjvp
def _lanczos_jvp(spec, num_steps, rtol, max_restarts, primals, tangents):
    kernel, v0 = primals
    dkernel, _ = tangents
    out = _lanczos(kernel, v0, spec, num_steps, rtol, max_restarts)
    sigma, residual, count, v, u = out
    # dσ = uᵀ (dA) v, and A is linear in the kernel; the vectors are treated as constants.
    dsigma = jnp.vdot(u, conv(dkernel, v, spec))
    zeros = jax.tree.map(jnp.zeros_like, (residual, count, v, u))
    return out, (dsigma, *zeros)


def _mix_random(vector, dtype) -> jax.Array:
    """``v / ||v|| + r / ||r||`` with ``r`` a fixed Gaussian vector (``v = 0``: just ``r``).

    Computed with NumPy when ``vector`` is concrete (no program compiled per input size).
    """
    size = int(np.size(vector))
    mix = np.random.default_rng(0).standard_normal(size)
    mix /= np.linalg.norm(mix)
    if is_concrete(vector):
        v = np.asarray(vector, np.float64).reshape(size)
        norm = np.linalg.norm(v)
        if not np.isfinite(norm):
            raise ValueError("initial_vector contains NaN or inf values")
        return jnp.asarray((v / norm if norm > 0 else 0.0) + mix, dtype)
    v = jnp.asarray(vector, dtype).reshape(size)
    norm = jnp.linalg.norm(v)
    return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0) + jnp.asarray(mix, dtype)


def lanczos_spectral_norm(
    kernel: jax.typing.ArrayLike,
    spec: ConvSpec,
    *,
    num_steps: int | None = None,
    rtol: float | None = None,
    max_restarts: int = 100,
    initial_vector: jax.typing.ArrayLike | None = None,
) -> SpectralNormEstimate:
    """Exact σ_max of any layer (any padding, stride, dilation, groups), matrix-free.

    Restarted Lanczos with full reorthogonalisation on ``AᵀA``, applying ``A`` with the real
    conv and ``Aᵀ`` with its transpose; memory ``num_steps * in_dim``. Runs until the relative
    residual ``||AᵀA v − θ v|| / θ <= rtol`` or ``max_restarts`` cycles (check
    ``residual`` in the result). ``value`` is differentiable: the JVP is ``uᵀ (dA) v``.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      num_steps: Krylov dimension per cycle; default ``clip(in_dim // 32, 32, 128)`` (measured:
        32 is fastest at ~1k dims, 128 at ~4k dims, where it is 3.7x faster than 32).
      rtol: relative residual tolerance; default ``1e-10`` in float64, ``1e-5`` in float32.
      max_restarts: cap on cycles.
      initial_vector: optional warm start, input-shaped (e.g. the previous ``right_vector``).
        A fixed random unit vector is added to it after normalising it (equal weights), so
        that the start has a random component in every group and channel: ``A`` of a grouped
        or depthwise conv is block diagonal, and a start lying in one group's invariant
        subspace (a warm start that is zero on some groups, say from one group's top vector)
        would converge to that group's σ_max, with a residual near zero, instead of the
        layer's. The warm start keeps most of its benefit (its component along the top
        vector is about ``1/sqrt(2)`` of what it was, against ``~1/sqrt(in_dim)`` for a random
        start).

    Returns:
      :class:`SpectralNormEstimate`.
    """
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        kernel = kernel.astype(jnp.result_type(float))
    spec.validate(kernel)
    if num_steps is None:
        num_steps = min(128, max(32, spec.in_dim(kernel.shape) // 32))
    if rtol is None:
        rtol = 1e-10 if kernel.dtype == jnp.float64 else 1e-5
    in_dim = spec.in_dim(kernel.shape)
    if initial_vector is None:
        v0 = jax.random.normal(jax.random.PRNGKey(0), (in_dim,), kernel.dtype)
    else:
        if np.size(initial_vector) != in_dim:
            raise ValueError(
                f"initial_vector has {np.size(initial_vector)} entries; expected in_dim={in_dim}")
        v0 = _mix_random(initial_vector, kernel.dtype)
    sigma, residual, count, v, u = _lanczos_jit(
        kernel, v0, spec, int(num_steps), float(rtol), int(max_restarts))
    return SpectralNormEstimate(sigma, residual, count.astype(jnp.int32), v, u)
