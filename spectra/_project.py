r"""Projection of conv kernels onto an operator-norm ball (Sedghi et al. 2019; certified variants).

Given a kernel ``K`` and a radius ``c = max_norm``, find a kernel of the same shape whose layer has
``σ_max <= c``. All methods work on a **circular** operator ``C``,
:func:`~spectra.circulant_embedding` ``(spec, kernel_shape)``: ``spec`` itself when it is
``'CIRCULAR'`` with strides dividing its input (stride 1 on an axis where a circular stride does
not divide it), else a circular grid of size ``N >= n + max(lo, hi)`` whose operator contains the
zero-padded one as a submatrix, at any stride, dilation, group count and input size (inputs
smaller than the kernel included). Hence ``σ_max(real layer) <= σ_max(C)``, and a kernel that is
feasible for ``C`` is feasible for the real layer.

A circular layer whose dilated kernel is larger than its input wraps the kernel onto itself:
``C`` acts with the taps folded modulo the input size (:func:`~spectra._fourier.embed_kernel`),
and the support projection below returns the minimum-norm kernel with a given fold (each tap
gets its folded value divided by the number of taps that share it; see
:func:`~spectra.kernel_from_frequency_matrices`). Every statement below holds with that map.

With the per-frequency matrices ``A_ω`` of :func:`~spectra.frequency_matrices` (unnormalised DFT
of the ``N``-support kernel, polyphase for strides), ``K -> {A_ω}`` is ``sqrt(N1 N2)`` times a
unitary map, so Frobenius geometry is the same on both sides. Two closed convex sets of
``N``-support kernels:

* the ball ``B = {σ_max(C) <= c}``; its Frobenius projection is exact and cheap: replace every
  ``A_ω = U D Vᴴ`` by ``U min(D, c) Vᴴ`` (Sedghi et al. 2019, Sec. 4);
* the support subspace ``S`` of kernels of the given ``(kh, kw)`` (dilated) shape; its projection
  is zeroing every other tap (:func:`~spectra.kernel_from_frequency_matrices`).

The methods:

* ``'sedghi'``: ``num_rounds`` rounds of ``P_S ∘ P_B`` (alternating projections; one round is
  the projection of the paper and of its reference code). Each round is approximate: the
  truncation to the support can push ``σ_max`` back above ``c``; the rounds converge to *some*
  point of ``B ∩ S`` (not the nearest one).
* ``'dykstra'``: Dykstra's algorithm between ``B`` and ``S`` (Boyle & Dykstra 1986); converges
  to the **nearest** point of ``B ∩ S`` in Frobenius norm (of the kernel: its taps outside the
  support are zero), slowly; after finitely many rounds it is approximate. (The correction term of
  the subspace ``S`` vanishes, so only the ball's correction is carried.)
* ``'certified'``: ``num_rounds`` rounds of ``'sedghi'`` (on ``C``), then the exact rescale
  ``K * min(1, c / σ_max(C))`` with ``σ_max(C)`` from the exact per-frequency SVD: the result is
  **always feasible** (``σ_max(real) <= σ_max(C) <= c`` up to rounding), for any
  ``num_rounds >= 0`` (``0`` is a pure exact rescale).
* ``'rescale'``: ``K * min(1, c / u)`` with ``u`` the Gram-iteration **upper bound** of
  :func:`~spectra.circular_norm_bracket` on ``C`` (Delattre et al. 2023): always feasible, the
  cheapest (no SVD with vectors), slightly over-shrinks (``u >= σ_max(C)``).

A kernel already inside the ball (``σ_max(C) <= c``; for ``'rescale'``: ``u <= c``) is returned
bit-identically (a ``jnp.where`` on a scalar, so jitted and vmapped code behaves the same).

References:
  H. Sedghi, V. Gupta, P. M. Long. The Singular Values of Convolutional Layers. ICLR 2019.
  J. P. Boyle, R. L. Dykstra. A method for finding projections onto the intersection of convex
  sets in Hilbert spaces. Lecture Notes in Statistics 37, 1986.
  B. Delattre, Q. Barthélemy, A. Araujo, A. Allauzen. Efficient Bound of Lipschitz Constant for
  Convolutional Layers by Gram Iteration. ICML 2023.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spectra import _fourier
from spectra._exact import circular_norm_bracket
from spectra._operator import conv
from spectra._operator import conv_transpose
from spectra._spec import ConvSpec
from spectra._spec import is_concrete

CLIP_METHODS = ("certified", "sedghi", "dykstra", "rescale")
_HIGHEST = lax.Precision.HIGHEST


class ClipResult(NamedTuple):
    """Result of :func:`clip_operator_norm`.

    Attributes:
      kernel: the projected kernel, same shape and dtype as the input.
      feasibility_gap: scalar ``σ_max(C) - max_norm`` of the returned kernel, where ``C`` is the
        circular operator the method works on (``circulant_embedding(spec, kernel.shape)``:
        ``spec`` if circular with strides dividing the input; its norm bounds the real layer's
        from above). ``<= 0`` means the real layer is feasible. Exact (per-frequency SVD) for
        ``'sedghi'``, ``'dykstra'`` and ``'certified'`` (where it is ``<= 0`` up to rounding);
        for ``'rescale'`` it uses the Gram-iteration upper bound instead of ``σ_max(C)``, so it
        is an upper bound on the exact gap, and ``<= 0`` up to rounding.
    """

    kernel: jax.Array
    feasibility_gap: jax.Array


def _check_max_norm(max_norm) -> None:
    """``max_norm`` must be a scalar, and ``> 0`` when concrete (a traced one is not checked)."""
    if np.ndim(max_norm) != 0:
        raise ValueError(f"max_norm must be a scalar; got shape {np.shape(max_norm)}")
    if is_concrete(max_norm) and not float(max_norm) > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0")


def _hermitian(x: jax.Array) -> jax.Array:
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _clip_matrices(mats: jax.Array, max_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Clips the singular values of a batch of matrices at ``max_norm``.

    ``A -> U min(D, c) Vᴴ``, computed as ``A - A V diag(max(0, 1 - c/σ)) Vᴴ`` from the
    eigendecomposition of the smaller Gram matrix (cheaper than an SVD with vectors). Matrices
    with ``σ_max <= c`` are returned unchanged. Also returns the largest singular value of the
    whole batch (of the input).
    """
    rows, cols = mats.shape[-2:]
    if rows <= cols:  # Gram of the rows: A Aᴴ = U Λ Uᴴ, clip = A - U f Uᴴ A.
        lam, vecs = jnp.linalg.eigh(_matmul(mats, _hermitian(mats)))
    else:  # Gram of the columns: Aᴴ A = V Λ Vᴴ, clip = A - A V f Vᴴ.
        lam, vecs = jnp.linalg.eigh(_matmul(_hermitian(mats), mats))
    sigma = jnp.sqrt(jnp.maximum(lam, 0.0))
    above = sigma > max_norm
    shrink = jnp.where(above, 1.0 - max_norm / jnp.where(above, sigma, 1.0), 0.0)
    shrink = shrink.astype(mats.dtype)
    if rows <= cols:
        correction = _matmul(vecs * shrink[..., None, :], _matmul(_hermitian(vecs), mats))
    else:
        correction = _matmul(_matmul(mats, vecs) * shrink[..., None, :], _hermitian(vecs))
    return mats - correction, jnp.max(sigma)


def _sigma_max(mats: jax.Array) -> jax.Array:
    """Exact σ_max of the circular layer from its per-frequency matrices (values-only SVD)."""
    return jnp.max(jnp.linalg.svd(mats, compute_uv=False)[..., 0])


def _project_rounds(
    kernel: jax.Array, cspec: ConvSpec, max_norm: jax.Array, num_rounds: int, dykstra: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``num_rounds >= 1`` rounds of alternating projections (or Dykstra) between ball and support.

    Returns ``(kernel, σ_max(C) of the input, σ_max(C) of the output)``.
    """
    kshape = kernel.shape

    def body(i, carry):
        kernel, correction, sigma_in = carry
        mats = _fourier.frequency_matrices(kernel, cspec).matrices
        if dykstra:
            mats = mats + correction
        clipped, sigma = _clip_matrices(mats, max_norm)
        if dykstra:
            correction = mats - clipped
        sigma_in = jnp.where(i == 0, sigma, sigma_in)  # Round 0 sees the input kernel.
        return _fourier.kernel_from_frequency_matrices(clipped, cspec, kshape), correction, sigma_in

    correction = None
    if dykstra:
        correction = jnp.zeros_like(_fourier.frequency_matrices(kernel, cspec).matrices)
    init = (kernel, correction, jnp.zeros((), kernel.dtype))
    kernel, _, sigma_in = lax.fori_loop(0, num_rounds, body, init)
    sigma_out = _sigma_max(_fourier.frequency_matrices(kernel, cspec).matrices)
    return kernel, sigma_in, sigma_out


@functools.partial(
    jax.jit, static_argnames=("spec", "method", "num_rounds", "num_squarings")
)
def _clip(
    kernel: jax.Array,
    max_norm: jax.Array,
    spec: ConvSpec,
    method: str,
    num_rounds: int,
    num_squarings: int,
) -> ClipResult:
    kshape = spec.validate(kernel)
    cspec = _fourier.circulant_embedding(spec, kshape)
    _fourier.check_fft_applicable(cspec)
    work = kernel
    if not jnp.issubdtype(work.dtype, jnp.floating):
        work = work.astype(jnp.result_type(float))
    max_norm = max_norm.astype(work.dtype)

    if method == "rescale":
        # Full-precision matmuls (no TF32 on GPU), so that the bound stays an upper bound.
        with jax.default_matmul_precision("highest"):
            upper = circular_norm_bracket(work, cspec, num_squarings=num_squarings)[1]
        inside = upper <= max_norm
        scaled = work * (max_norm / jnp.where(inside, max_norm, upper))
        out = jnp.where(inside, kernel, scaled.astype(kernel.dtype))
        return ClipResult(out, jnp.minimum(upper, max_norm) - max_norm)

    if method == "certified" and num_rounds == 0:
        sigma_in = sigma_out = _sigma_max(_fourier.frequency_matrices(work, cspec).matrices)
        projected = work
    elif num_rounds == 0:  # 'sedghi' / 'dykstra' with no rounds: nothing to do.
        sigma = _sigma_max(_fourier.frequency_matrices(work, cspec).matrices)
        return ClipResult(kernel, sigma - max_norm)
    else:
        projected, sigma_in, sigma_out = _project_rounds(
            work, cspec, max_norm, num_rounds, dykstra=method == "dykstra"
        )
    if method == "certified":
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(sigma_out, jnp.finfo(work.dtype).tiny))
        projected = projected * factor
        sigma_out = sigma_out * factor
    inside = sigma_in <= max_norm
    out = jnp.where(inside, kernel, projected.astype(kernel.dtype))
    gap = jnp.where(inside, sigma_in, sigma_out) - max_norm
    return ClipResult(out, gap)


def clip_operator_norm(
    kernel: jax.typing.ArrayLike,
    spec: ConvSpec,
    max_norm: jax.typing.ArrayLike,
    *,
    method: str = "certified",
    num_rounds: int = 1,
    num_squarings: int = 6,
) -> ClipResult:
    r"""Projects a conv kernel towards the set of kernels whose layer has ``σ_max <= max_norm``.

    Every method works on the circular operator ``C`` =
    :func:`~spectra.circulant_embedding` ``(spec, kernel.shape)`` (``spec`` itself when it is
    ``'CIRCULAR'`` with strides dividing its input), which contains the layer as a submatrix, so
    ``σ_max(layer) <= σ_max(C)`` at any stride, dilation, group count and input size (an input
    smaller than the kernel included). Per round, the per-frequency matrices of the
    (``N``-support) kernel have their singular values clipped at ``max_norm`` (the exact
    Frobenius projection onto the ball of ``C``, Sedghi et al. 2019), then the kernel is
    restricted to its ``(kh, kw)`` support (the exact projection onto that subspace; for a
    circular kernel larger than its input, onto the foldable kernels, see the module doc):

    .. math::

       K_{t+1} = P_S\bigl(\mathcal F^{-1}[U_\omega \min(D_\omega, c) V_\omega^H]\bigr),
       \qquad \mathcal F K_t = \{U_\omega D_\omega V_\omega^H\}_\omega.

    Methods (``c = max_norm``):

    * ``'certified'`` (default): ``num_rounds`` alternating rounds, then the exact rescale
      ``K * min(1, c / σ_max(C))`` (exact per-frequency SVD). **Always feasible**: the real
      layer's ``σ_max <= c`` up to rounding, whatever ``num_rounds >= 0`` (``0``: pure rescale).
    * ``'sedghi'``: ``num_rounds`` alternating rounds, nothing else; one round is the projection
      of Sedghi et al. 2019. **Approximate**: the result may still exceed ``c`` (see
      ``feasibility_gap``); more rounds converge to a point of the intersection.
    * ``'dykstra'``: ``num_rounds`` rounds of Dykstra's algorithm between the same two sets;
      converges to the **nearest** feasible kernel in Frobenius norm (one round equals one
      ``'sedghi'`` round); approximate after finitely many rounds.
    * ``'rescale'``: ``K * min(1, c / u)`` with ``u >= σ_max(C)`` the Gram-iteration **upper
      bound** of :func:`~spectra.circular_norm_bracket` (``num_squarings`` squarings). Always
      feasible, cheapest; ``num_rounds`` is ignored.

    A kernel with ``σ_max(C) <= c`` (for ``'rescale'``: ``u <= c``) is returned bit-identically.
    The whole computation is one jitted function (``spec``, ``method`` and ``num_rounds`` are
    static; ``max_norm`` may be traced); it works under ``jax.jit`` and ``jax.vmap`` over stacked
    kernels. Cost per round: two half-plane FFTs and one batched eigendecomposition of the smaller
    Gram matrix (size ``min(c_out, c_in s1 s2) / groups``) at ``groups * M1 * (M2 // 2 + 1)``
    frequencies, ``M = N / strides``; ``'certified'`` adds one values-only batched SVD.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer (any padding, stride, dilation, groups and input size).
      max_norm: radius ``c > 0`` of the operator-norm ball; a scalar, possibly traced.
      method: one of ``CLIP_METHODS``: ``'certified'``, ``'sedghi'``, ``'dykstra'``,
        ``'rescale'``.
      num_rounds: number of projection rounds (``>= 0``; ``0`` returns the kernel unchanged for
        ``'sedghi'``/``'dykstra'``).
      num_squarings: Gram squarings of the ``'rescale'`` bound (tightness ``rank^(2^-(t+1))``).

    Returns:
      :class:`ClipResult` ``(kernel, feasibility_gap)``: the kernel has the input's shape and
      dtype; ``feasibility_gap = σ_max(C) - c`` of the returned kernel (exact; an upper bound
      for ``'rescale'``).

    Raises:
      ValueError: ``max_norm`` not a positive scalar (when concrete), unknown ``method``,
        negative ``num_rounds``, or a kernel not matching ``spec``.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> spec = spectra.ConvSpec((8, 8), padding="SAME")
      >>> kernel = jnp.ones((3, 3, 2, 2))
      >>> result = spectra.clip_operator_norm(kernel, spec, 1.0)
      >>> bool(spectra.spectral_norm(result.kernel, spec, "dense") <= 1.0 + 1e-5)
      True

    References:
      Sedghi, Gupta, Long. The Singular Values of Convolutional Layers. ICLR 2019.
    """
    if method not in CLIP_METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {CLIP_METHODS}")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 0:
        raise ValueError(f"num_rounds={num_rounds!r} must be a non-negative int")
    if not isinstance(num_squarings, (int, np.integer)) or num_squarings < 0:
        raise ValueError(f"num_squarings={num_squarings!r} must be a non-negative int")
    _check_max_norm(max_norm)
    kernel = jnp.asarray(kernel)
    return _clip(kernel, jnp.asarray(max_norm), spec, method, int(num_rounds), int(num_squarings))


#: Largest Krylov space (number of ``AᵀA`` products) of :func:`clip_operator_norm_power`;
#: further iterations are plain power steps done first.
MAX_KRYLOV_DIM = 8


class PowerClipResult(NamedTuple):
    """Result of :func:`clip_operator_norm_power`.

    Attributes:
      kernel: the rescaled kernel, same shape and dtype as the input (bit-identical when the
        estimate is ``<= max_norm``).
      sigma: scalar, the power-iteration estimate of the input kernel's σ_max: the largest
        per-group Ritz value, a **lower estimate** (each is a Rayleigh quotient of its group:
        ``<=`` the exact value, equal in the limit).
      vector: a unit vector, input-shaped ``(*spec.input_shape, c_in)``, to pass back as
        ``vector`` at the next call (warm start): in each group's channels, that group's top
        right-vector estimate with norm ``1 / sqrt(groups)`` (for ``groups = 1``, the top right
        singular vector estimate).
    """

    kernel: jax.Array
    sigma: jax.Array
    vector: jax.Array


def _group_view(x: jax.Array, groups: int) -> jax.Array:
    """``(..., H, W, c)`` -> ``(..., H, W, groups, c // groups)``: the channels of each group."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def _group_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-group inner products of grouped vectors ``(..., H, W, g, cg)`` -> ``(..., g)``."""
    return jnp.sum(a * b, axis=(-4, -3, -1))


def _group_normalize(x: jax.Array, fallback: jax.Array) -> jax.Array:
    """Each group's block of ``x`` (``(H, W, g, cg)``) scaled to norm ``1 / sqrt(g)``.

    A zero block is replaced by ``fallback``'s (already normalised). The whole vector then has
    unit norm and every group weighs the same.
    """
    groups = x.shape[-2]
    norm = jnp.sqrt(_group_dot(x, x))[:, None]  # (g, 1)
    ok = norm > 0
    scale = jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0) / math.sqrt(groups)
    return jnp.where(ok, x * scale, fallback)


def _start_vector(vector: jax.Array, groups: int) -> jax.Array:
    """The warm start, grouped ``(H, W, g, cg)``: every group's block normalised, plus a random
    component of relative size ``eps`` in every entry.

    The operator is block diagonal over groups, so a block that is zero (or decayed to zero in a
    carried vector) would stay zero forever; normalising each block separately keeps every group
    in play (see :func:`_krylov_top`). The tiny random part (drawn from a key folded with the
    vector's own bits: deterministic for a given vector, and fresh as the vector changes) makes
    every channel non-zero, so that a warm start vanishing on some channels still sees them (an
    ``eps``-sized component grows at the power iteration's rate if it matters).
    """
    x = _group_view(vector, groups)
    seed = lax.bitcast_convert_type(jnp.sum(x).astype(jnp.float32), jnp.uint32)
    key = jax.random.fold_in(jax.random.PRNGKey(0), seed)
    noise = _group_normalize(jax.random.normal(key, x.shape, x.dtype), 0.0)
    x = _group_normalize(x, noise)
    return _group_normalize(x + jnp.finfo(x.dtype).eps * noise, noise)


def _apply_gram(work: jax.Array, x: jax.Array, spec: ConvSpec) -> jax.Array:
    """``AᵀA x`` for a grouped vector ``(H, W, g, cg)``."""
    flat = x.reshape(*x.shape[:2], -1)
    return conv_transpose(work, conv(work, flat, spec), spec).reshape(x.shape)


def _krylov_top(work: jax.Array, v0: jax.Array, spec: ConvSpec, m: int):
    """Per-group Rayleigh–Ritz on ``span{v0_g, AᵀA v0_g, ..., (AᵀA)^m v0_g}``: ``(σ̂, v)``.

    ``v0`` is grouped ``(H, W, g, cg)`` with blocks of norm ``1/sqrt(g)``. ``A`` is block
    diagonal over the ``g`` groups, so each group's block of the products only depends on that
    group's block: the Krylov space of each group is built separately (the blocks of one vector
    carry all of them at the cost of one ``AᵀA`` product per step), and ``σ̂`` is the largest of
    the per-group Ritz values, each ``<=`` its group's σ_max, so ``σ̂ <= σ_max``. A group
    whose start block is small is not lost behind the largest one (a single vector would make
    the exact answer depend on a start vector with a component in the right group).

    ``m`` applications of ``AᵀA`` and one of ``A``. Each group's basis ``q_0..q_m`` is
    orthonormalised by classical Gram–Schmidt applied twice; ``T = Qᵀ AᵀA Q`` is assembled from
    the products ``w_j = AᵀA q_j`` (``j < m``) and ``||A q_m||²`` using the symmetry of
    ``AᵀA``. The returned ``v`` has, in each group, that group's top Ritz vector with norm
    ``1/sqrt(g)``.
    """
    groups = v0.shape[-2]
    scale = math.sqrt(groups)
    eps = jnp.finfo(work.dtype).eps
    qs = [v0 * scale]  # Unit blocks.
    ws = []
    for j in range(m):
        w = _apply_gram(work, qs[j], spec)
        ws.append(w)
        r = w
        basis = jnp.stack(qs)
        for _ in range(2):
            coeffs = jnp.einsum("khwgc,hwgc->kg", basis, r, precision=_HIGHEST)
            r = r - jnp.einsum("kg,khwgc->hwgc", coeffs, basis, precision=_HIGHEST)
        # Drop a direction that is numerically in the span already (invariant subspace).
        norm_r = jnp.sqrt(_group_dot(r, r))
        keep = norm_r > 1e3 * eps * jnp.sqrt(_group_dot(w, w))
        factor = jnp.where(keep, 1.0 / jnp.where(keep, norm_r, 1.0), 0.0)
        qs.append(r * factor[:, None])
    basis = jnp.stack(qs)  # (m + 1, H, W, g, cg)
    out = conv(work, qs[m].reshape(*v0.shape[:2], -1), spec)
    tail = jnp.sum(jnp.square(_group_view(out, groups)), axis=(0, 1, 3))  # (g,)
    if not m:
        return jnp.sqrt(jnp.max(tail)), v0
    cols = jnp.einsum("khwgc,jhwgc->gkj", basis, jnp.stack(ws), precision=_HIGHEST)
    t = jnp.zeros((groups, m + 1, m + 1), work.dtype).at[:, :, :m].set(cols)
    t = t.at[:, m, m].set(tail).at[:, :m, m].set(cols[:, m, :])
    t = 0.5 * (t + jnp.swapaxes(t, 1, 2))
    theta, y = jnp.linalg.eigh(t)
    top = y[:, :, -1]  # (g, m + 1)
    v = jnp.einsum("gk,khwgc->hwgc", top, basis, precision=_HIGHEST)
    sigma = jnp.sqrt(jnp.maximum(jnp.max(theta[:, -1]), 0.0))
    return sigma, _group_normalize(v, v0)


@functools.partial(jax.jit, static_argnames=("spec", "num_iterations"))
def _clip_power(kernel, max_norm, vector, spec, num_iterations):
    work = kernel
    if not jnp.issubdtype(work.dtype, jnp.floating):
        work = work.astype(jnp.result_type(float))
    max_norm = max_norm.astype(work.dtype)
    v = _start_vector(vector.astype(work.dtype), spec.feature_group_count)
    krylov = min(num_iterations, MAX_KRYLOV_DIM)

    def power(_, v):
        return _group_normalize(_apply_gram(work, v, spec), v)

    v = lax.fori_loop(0, num_iterations - krylov, power, v)
    sigma, v = _krylov_top(work, v, spec, krylov)
    inside = sigma <= max_norm
    scaled = work * (max_norm / jnp.where(inside, max_norm, sigma))
    out = jnp.where(inside, kernel, scaled.astype(kernel.dtype))
    return PowerClipResult(out, sigma, v.reshape(vector.shape).astype(vector.dtype))


def clip_operator_norm_power(
    kernel: jax.typing.ArrayLike,
    spec: ConvSpec,
    max_norm: jax.typing.ArrayLike,
    vector: jax.typing.ArrayLike,
    *,
    num_iterations: int = 1,
) -> PowerClipResult:
    r"""Rescales a kernel to ``σ_max <= max_norm`` by a warm-started power iteration (approximate).

    ``num_iterations`` steps of the power iteration on ``AᵀA`` (``A`` the real layer of
    ``spec``, any padding, stride, dilation, groups and input size, applied matrix-free with
    :func:`~spectra.conv` and :func:`~spectra.conv_transpose`) from ``vector``, per group ``g``
    (``A = diag(A_g)``), then ``σ̂ = max_g ||A_g v_g||`` and the kernel is scaled by
    ``min(1, max_norm / σ̂)``:

    .. math::

       v_g \leftarrow \frac{A_g^T A_g v_g}{\|A_g^T A_g v_g\|}\ (\text{num\_iterations
       times}),\qquad \hat\sigma = \max_g \|A_g v_g\| \le \sigma_{\max}(A),\qquad
       K \leftarrow K \min(1, c / \hat\sigma).

    **Groups**: ``A`` is block diagonal over the ``feature_group_count`` groups, so the
    iteration runs per group (each group's channels of the vector are normalised separately; the
    last up to :data:`MAX_KRYLOV_DIM` products build a Krylov space per group) and ``σ̂`` is the
    largest per-group estimate. A single vector would converge to the top of whichever group it
    favours: a warm start that is zero (or has decayed to zero) on the group that holds the
    largest singular value never finds it, and ``σ̂`` would then miss σ_max by the gap between
    the groups, with a residual near zero. Every start also gets a random component of relative
    size ``eps`` on every entry, so no channel of a warm start is exactly zero.

    **Approximate, not certified**: ``σ̂`` is a lower estimate, so the result's exact σ_max may
    exceed ``max_norm`` by the estimate's relative error. Meant for training, where ``vector`` is
    carried from one step to the next (the persistent power iteration of Miyato et al. 2018 and
    Gouk et al. 2021, on the true operator rather than the ``c_out x (c_in k^2)`` reshape): the
    weights move little per step, so one iteration per step keeps ``σ̂`` close to the exact
    value (measured in ``benchmarks/bench_train_step.py``). For a guarantee use
    :func:`clip_operator_norm` with ``method='certified'`` or ``'rescale'``.

    Cost: ``num_iterations + 1`` applications of the layer and ``num_iterations`` of its
    transpose on one input-sized vector (no FFT, no SVD). Works under ``jax.jit`` and
    ``jax.vmap`` (over stacked kernels and vectors).

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer (any padding, stride, dilation, groups, input size).
      max_norm: radius ``c > 0``; a scalar, possibly traced.
      vector: the warm start, input-shaped ``(*spec.input_shape, c_in)`` (any array of that
        shape; e.g. ``PowerClipResult.vector`` of the previous call, or random at first; a group
        whose channels are all zero starts from a random block).
      num_iterations: power-iteration steps (``>= 0``; ``0`` only evaluates ``||A v||``).

    Returns:
      :class:`PowerClipResult` ``(kernel, sigma, vector)``.

    Raises:
      ValueError: naming ``max_norm`` (not a positive scalar, when concrete), ``vector`` (wrong
        shape), ``num_iterations`` (negative) or a kernel not matching ``spec``.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> spec = spectra.ConvSpec((8, 8), padding="SAME")
      >>> kernel = jnp.ones((3, 3, 2, 2))
      >>> v = jnp.ones((8, 8, 2))
      >>> result = spectra.clip_operator_norm_power(kernel, spec, 1.0, v, num_iterations=50)
      >>> round(float(spectra.spectral_norm(result.kernel, spec, "dense")), 3)
      1.0
    """
    if not isinstance(num_iterations, (int, np.integer)) or num_iterations < 0:
        raise ValueError(f"num_iterations={num_iterations!r} must be a non-negative int")
    _check_max_norm(max_norm)
    kernel = jnp.asarray(kernel)
    kshape = spec.validate(kernel)
    expected = (*spec.input_shape, spec.channels(kshape)[0])
    vector = jnp.asarray(vector)
    if vector.shape != expected:
        raise ValueError(f"vector has shape {vector.shape}; expected {expected} (input-shaped)")
    return _clip_power(kernel, jnp.asarray(max_norm), vector, spec, int(num_iterations))
