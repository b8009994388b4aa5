"""σ_max of any conv layer on the host: ARPACK Lanczos per group, bracketed by certified bounds.

A grouped conv's operator is block diagonal, so a Krylov method started in one group's
invariant subspace converges, with a residual near zero, to that group's σ_max and not the
layer's. :func:`lanczos_spectral_norm` therefore runs each group on its own (a depthwise group
is a single-channel conv: cheap) from a start with a random component in every channel, in
decreasing order of the groups' certified upper bounds, and skips the groups whose bound is
already below the largest Ritz value found (they cannot hold the layer's σ_max).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence
from scipy.sparse.linalg import LinearOperator
from scipy.sparse.linalg import eigsh

from spectra._spec import ConvSpec
from spectra.numpy._fourier import circulant_top
from spectra.numpy._fourier import frequency_entries
from spectra.numpy._frequencies import FREQUENCY_CHUNK_ENTRIES
from spectra.numpy._operator import ConvOperator
from spectra.numpy._operator import float64_kernel
from spectra.numpy._operator import group_kernel
from spectra.numpy._operator import group_spec
from spectra.numpy._operator import tap_sum_bound

#: ARPACK tolerance of the first run when a certified upper bound is given (see
#: :func:`lanczos_spectral_norm`).
BRACKET_FIRST_TOL = 1e-3
#: Norm of the random part of a warm-started start vector, relative to the (unit) warm start.
#: Every start carries it, so that every channel of every group has a random component.
WARM_START_RANDOM = 0.1
#: ``group_upper_bounds=None``: the circulant bound per group is computed when it holds at most
#: this many complex entries (else the tap-sum bound alone).
MAX_BOUND_ENTRIES = 4 * FREQUENCY_CHUNK_ENTRIES
#: ``float32_products=None``: ARPACK iterates on float32 products when ``rtol`` is at least this
#: (float32 rounding, ~1e-7 relative per product, is then far below the tolerance).
FLOAT32_MIN_RTOL = 1e-5


class LanczosResult(NamedTuple):
    """Result of :func:`lanczos_spectral_norm`.

    Attributes:
      value: the σ_max estimate: the largest over the groups run of the square root of a Ritz
        value of the group's Gram matrix. A Ritz value is a Rayleigh quotient: ``value`` is a
        **lower bound** on the exact σ_max (up to rounding).
      residual: ``||G v − σ² v|| / σ²`` for the returned unit Ritz vector ``v`` of that group's
        Gram matrix ``G`` (``AᵀA``, or ``AAᵀ`` when the output is the smaller side); some
        eigenvalue of ``G`` lies within ``residual * σ²`` of ``σ²`` (not necessarily the top).
      num_matvecs: Gram products used, over all groups (each one ``A`` and one ``Aᵀ``).
      upper: certified **upper bound** on σ_max: the largest of the groups' upper bounds
        (``group_upper_bounds``), or ``inf`` when none were given or computed.
      certified: ``upper <= value * (1 + bracket_rtol)``: the bracket ``[value, upper]`` holds
        the exact σ_max to that relative accuracy.
      groups_run: how many groups were run (the others were below ``value`` by their bound).
    """

    value: float
    residual: float
    num_matvecs: int
    upper: float
    certified: bool
    groups_run: int


def _random_start(rng: np.random.Generator, dim: int, warm: np.ndarray | None) -> np.ndarray:
    """A standard normal vector, plus (when given and nonzero) the unit warm start with the
    random part scaled to :data:`WARM_START_RANDOM`."""
    r = rng.standard_normal(dim)
    if warm is None or not np.any(warm):
        return r
    return warm / np.linalg.norm(warm) + WARM_START_RANDOM * r / np.linalg.norm(r)


def _gram_product(a: ConvOperator, on_input: bool, count: list):
    """The flat Gram product ``AᵀA`` (``on_input``) or ``AAᵀ`` of ``a``, float64 out, counted."""
    if on_input:

        def gram(v):
            count[0] += 1
            return np.asarray(a.adjoint(a.apply(v.reshape(a.input_shape))), np.float64).ravel()
    else:

        def gram(u):
            count[0] += 1
            return np.asarray(a.apply(a.adjoint(u.reshape(a.output_shape))), np.float64).ravel()

    return gram


def _arpack_top(
    a: ConvOperator,
    v0: np.ndarray,
    *,
    rtol: float,
    ncv: int | None,
    max_tries: int,
    upper_bound: float | None,
    bracket_rtol: float,
    fast: ConvOperator | None = None,
) -> tuple[float, float, int]:
    """``(σ, residual, products)`` of one operator by ARPACK on its smaller Gram matrix.

    ``v0`` is input-shaped (mapped through ``A`` when the iteration runs on ``AAᵀ``). ``fast``:
    the same operator with float32 products, used for ARPACK's iterations; the Rayleigh quotient
    and residual of each returned vector are recomputed with ``a`` (float64). When a run at the
    final tolerance leaves the float64 residual above ``rtol``, the next runs use ``a``.
    """
    count = [0]
    on_input = a.in_dim <= a.out_dim
    dim = a.in_dim if on_input else a.out_dim
    gram = _gram_product(a, on_input, count)
    iterate = gram if fast is None else _gram_product(fast, on_input, count)
    if not on_input:
        v0 = a.apply(v0.reshape(a.input_shape)).reshape(-1)
        if not np.any(v0):
            v0 = np.random.default_rng(0).standard_normal(dim)

    if dim <= 2:  # ARPACK needs k < dim - 1: the Gram matrix is tiny, do it densely.
        g = np.stack([gram(e) for e in np.eye(dim)], axis=1)
        theta = float(np.linalg.eigvalsh(g)[-1])
        return math.sqrt(max(theta, 0.0)), 0.0, count[0]
    ncv = min(dim, ncv or 20)
    # With a certified upper bound, a first loose run often closes the bracket already.
    tol = max(rtol, BRACKET_FIRST_TOL) if upper_bound is not None else rtol
    theta, residual, v = 0.0, math.inf, v0.reshape(-1)
    for _ in range(max(max_tries, 1) + (tol > rtol)):
        op = LinearOperator((dim, dim), matvec=iterate, dtype=np.float64)
        try:
            w, vecs = eigsh(op, k=1, which="LA", v0=v, tol=tol, ncv=ncv, maxiter=100 * dim)
        except ArpackNoConvergence as e:  # pragma: no cover - partial result, residual below
            w, vecs = e.eigenvalues, e.eigenvectors
            if len(w) == 0:
                break
        v = vecs[:, 0] / np.linalg.norm(vecs[:, 0])
        gv = gram(v)  # float64: the Ritz value is a Rayleigh quotient of the float64 operator.
        theta = float(v @ gv)  # Rayleigh quotient of the normalised vector.
        residual = float(np.linalg.norm(gv - theta * v) / theta) if theta > 0 else 0.0
        sigma = math.sqrt(max(theta, 0.0))
        if residual <= rtol or (
            upper_bound is not None and upper_bound <= sigma * (1 + bracket_rtol)
        ):
            break
        if tol <= rtol:
            iterate = gram  # float32 rounding may be what holds the residual up.
        tol = rtol if tol > rtol else tol / 10
    return math.sqrt(max(theta, 0.0)), residual, count[0]


def per_group_upper_bounds(kernel, spec: ConvSpec) -> np.ndarray:
    """``(g,)`` certified upper bounds on each group's σ_max: the smaller of the tap-sum bound
    and (when at most :data:`MAX_BOUND_ENTRIES` entries) the circulant one, per group."""
    kernel, kshape = float64_kernel(kernel, spec)
    bounds = tap_sum_bound(kernel, spec, per_group=True)
    if frequency_entries(spec, kshape) <= MAX_BOUND_ENTRIES:
        bounds = np.minimum(bounds, circulant_top(kernel, spec, with_vector=False).group_bounds)
    return bounds


def lanczos_spectral_norm(
    kernel,
    spec: ConvSpec,
    *,
    rtol: float = 1e-5,
    ncv: int | None = None,
    max_tries: int = 4,
    seed: int = 0,
    initial_vector: np.ndarray | None = None,
    circulant_start: bool = False,
    group_upper_bounds: np.ndarray | None = None,
    bracket_rtol: float = 1e-4,
    float32_products: bool | None = None,
) -> LanczosResult:
    """σ_max of any layer, matrix-free: ARPACK's implicitly restarted Lanczos per group.

    Per group (:func:`spectra.numpy.group_spec`; one run for ``g = 1``),
    ``scipy.sparse.linalg.eigsh(which='LA', k=1)`` on the Gram matrix of the smaller side, its
    products computed by :class:`ConvOperator`. The groups are run in decreasing order of their
    certified upper bounds; a group whose bound is at most the largest Ritz value found so far
    times ``1 + bracket_rtol`` is skipped (its σ_max cannot exceed the layer's by more). The
    residual of each Ritz pair is recomputed with one more product; when it is above ``rtol``
    and the group's bound does not bracket the value within ``bracket_rtol``, the run is
    repeated from that vector with a 10x tighter tolerance, at most ``max_tries`` times.

    ARPACK runs in float64; its Gram products may be computed in float32 (``float32_products``,
    about twice as fast), but the returned value and residual are always those of the float64
    operator: the Rayleigh quotient and residual of ARPACK's vector recomputed with float64
    products (so ``value`` stays a lower bound). A run at tolerance ``rtol`` whose float64
    residual stays above ``rtol`` is followed by runs with float64 products.

    Every start vector is standard normal in every channel of the group (seeded by ``seed``);
    a warm start (``initial_vector``'s channels of the group, or with ``circulant_start`` the
    group's own circulant top) is added to it, never used alone.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      rtol: relative residual tolerance (see :class:`LanczosResult`).
      ncv: Lanczos vectors kept between restarts (ARPACK's default ``20`` when ``None``).
      max_tries: ARPACK runs at most, per group.
      seed: for the random part of the start vectors.
      initial_vector: optional input-shaped ``(H, W, c_in)`` warm start.
      circulant_start: when ``initial_vector`` is ``None``, warm-start each group from its own
        circulant top (:func:`circulant_top` of the group).
      group_upper_bounds: ``(g,)`` certified upper bounds on the groups' σ_max (e.g. the
        circulant and tap-sum bounds); ``None``: :func:`per_group_upper_bounds` when ``g > 1``,
        none for ``g = 1`` (then ``upper`` is ``inf`` and the run stops on its residual only).
      bracket_rtol: see above and :class:`LanczosResult`.
      float32_products: iterate on float32 products (see above); ``None``: when ``rtol >=``
        :data:`FLOAT32_MIN_RTOL`.

    Returns:
      :class:`LanczosResult`.

    Raises:
      ValueError: naming ``initial_vector`` or ``group_upper_bounds`` when of the wrong size.

    Example:
      >>> import numpy as np
      >>> from spectra import ConvSpec
      >>> r = lanczos_spectral_norm(np.ones((1, 1, 1, 1)) * 2.0, ConvSpec((8, 8)))
      >>> round(r.value, 6), r.residual <= 1e-5
      (2.0, True)
    """
    kernel, kshape = float64_kernel(kernel, spec)
    g = spec.feature_group_count
    c_in = spec.channels(kshape)[0]
    cig = c_in // g
    if initial_vector is not None:
        initial_vector = np.asarray(initial_vector, np.float64)
        if initial_vector.size != spec.in_dim(kshape):
            raise ValueError(
                f"initial_vector has {initial_vector.size} entries; expected in_dim="
                f"{spec.in_dim(kshape)}"
            )
        initial_vector = initial_vector.reshape(*spec.input_shape, c_in)
    if group_upper_bounds is None and g > 1:
        group_upper_bounds = per_group_upper_bounds(kernel, spec)
    if group_upper_bounds is not None:
        bounds = np.asarray(group_upper_bounds, np.float64).reshape(-1)
        if bounds.shape != (g,):
            raise ValueError(
                f"group_upper_bounds has shape {np.shape(group_upper_bounds)}; expected ({g},)"
            )
    else:
        bounds = np.full(g, math.inf)
    one = group_spec(spec) if g > 1 else spec
    if float32_products is None:
        float32_products = rtol >= FLOAT32_MIN_RTOL
    rng = np.random.default_rng(seed)
    best, best_residual, products, runs = -1.0, math.inf, 0, 0
    for j in np.argsort(-bounds, kind="stable"):
        if best >= 0 and bounds[j] <= best * (1 + bracket_rtol):
            break  # Sorted: every remaining group is bounded below the value found.
        k = group_kernel(kernel, spec, int(j)) if g > 1 else kernel
        warm = None
        if initial_vector is not None:
            warm = initial_vector[..., j * cig : (j + 1) * cig]
        elif circulant_start:
            warm = circulant_top(k, one).vector
        a = ConvOperator(k, one)
        v0 = _random_start(rng, a.in_dim, None if warm is None else warm.reshape(-1))
        sigma, residual, count = _arpack_top(
            a,
            v0,
            rtol=rtol,
            ncv=ncv,
            max_tries=max_tries,
            upper_bound=float(bounds[j]) if np.isfinite(bounds[j]) else None,
            bracket_rtol=bracket_rtol,
            fast=ConvOperator(k, one, np.float32) if float32_products else None,
        )
        products += count
        runs += 1
        if sigma > best:
            best, best_residual = sigma, residual
    upper = float(bounds.max())
    certified = bool(upper <= best * (1 + bracket_rtol))
    return LanczosResult(best, best_residual, products, upper, certified, runs)
