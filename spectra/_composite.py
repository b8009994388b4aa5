r"""Upper bounds on the norm of a composite linear map: dense (proven) or Lanczos (probabilistic).

A composite map (a chain of convs, BatchNorms, pools and sums of branches) is given either as a
dense float64 matrix or as a Gram matvec ``v -> Aᵀ A v``. Two kinds of **upper bound** on
``||A||_2`` come out, each labelled:

* ``'proven'`` (:func:`dense_norm_upper`): the Gram matrix ``Ĝ`` of the smaller side in
  float64, a Lanczos estimate ``λ̂`` of its top eigenvalue, and a **certificate**: the float64
  Cholesky factorisation of ``μI - Ĝ`` (``μ = λ̂ (1 + 10⁻³)``) completes, which proves
  ``λ_max(Ĝ) <= μ (1 + u) + γ_{n+1} ||R̂||_F²`` (Higham, *Accuracy and Stability of Numerical
  Algorithms*, Thm 10.3: ``R̂ᵀR̂ = μI - Ĝ + ΔH`` with ``|ΔH| <= γ_{n+1} |R̂ᵀ||R̂|``); then Weyl's
  inequality ``λ_max(G) <= λ_max(Ĝ) + ||G - Ĝ||_2`` with ``||G - Ĝ||_2 <= γ_m ||A||_F²`` (the
  forward error of the float64 products, ``γ_m = m u / (1 - m u)``). Should the factorisation
  fail four times (``μ`` grown by 1 % each), all eigenvalues are computed instead and the
  backward error of the symmetric eigensolver is allowed for as ``4 n u ||A||_F²``.
* ``'probabilistic'`` (:func:`lanczos_norm_upper`): ``k`` steps of Lanczos on ``Aᵀ A`` (full
  re-orthogonalisation, float64) from a start vector uniform on the unit sphere give the largest
  Ritz value ``ξ_k <= λ_max``. Kuczyński & Woźniakowski (SIAM J. Matrix Anal. Appl. 13,
  1992), for Lanczos:
  ``P(ξ_k < (1 - ε) λ_max) <= 1.648 sqrt(n) exp(-sqrt(ε) (2k - 1))``. For a failure
  probability ``δ`` this gives ``ε = (ln(1.648 sqrt(n) / δ) / (2k - 1))²`` and the bound
  ``||A||_2 <= sqrt(ξ_k / (1 - ε))`` with probability at least ``1 - δ`` (over the start
  vector). A Ritz value alone is a lower estimate, never an upper bound.

These are host (NumPy float64) functions: the matvec is any callable (e.g. a compiled JAX
program); they are not traced by ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

#: The constant of the Kuczyński–Woźniakowski bound for the Lanczos algorithm.
KW_CONSTANT = 1.648
_U = np.finfo(np.float64).eps / 2


@dataclasses.dataclass(frozen=True)
class NormBound:
    """An upper bound on a linear map's ℓ2 operator norm.

    Attributes:
      upper: the upper bound.
      estimate: the value it was built from (the computed σ_max, or the Lanczos Ritz value's
        square root: a lower estimate).
      kind: ``'proven'`` or ``'probabilistic'``.
      delta: failure probability (``0.0`` for proven bounds).
      method: how (``'dense'``, ``'lanczos'``, ``'zero'``).
    """

    upper: float
    estimate: float
    kind: str
    delta: float
    method: str


def kw_epsilon(delta: float, n: int, k: int) -> float:
    """``ε`` with ``1.648 sqrt(n) exp(-sqrt(ε)(2k - 1)) = δ`` (Kuczyński–Woźniakowski 1992).

    Args:
      delta: failure probability in ``(0, 1)``.
      n: dimension of the space of the Gram matrix (``>= 1``).
      k: Lanczos steps (Krylov dimension, ``>= 2``).

    Returns:
      ``(ln(1.648 sqrt(n) / δ) / (2k - 1))²`` (can be ``>= 1``: then no bound follows).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if k < 2:
        raise ValueError(f"k must be >= 2; got {k}")
    return (math.log(KW_CONSTANT * math.sqrt(n) / delta) / (2 * k - 1)) ** 2


def kw_failure_probability(epsilon: float, n: int, k: int) -> float:
    """``1.648 sqrt(n) exp(-sqrt(ε)(2k - 1))``: the bound on ``P(ξ_k < (1 - ε) λ_max)``."""
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1); got {epsilon}")
    return KW_CONSTANT * math.sqrt(n) * math.exp(-math.sqrt(epsilon) * (2 * k - 1))


def dense_norm_upper(matrix) -> NormBound:
    """Proven upper bound on ``||A||_2`` of a dense matrix (float64 Gram eigenvalue + margin).

    Args:
      matrix: ``(m, n)`` array (cast to float64).

    Returns:
      :class:`NormBound` (``kind='proven'``; the inequality is in the module docstring).
    """
    a = np.asarray(matrix, np.float64)
    if a.ndim != 2:
        raise ValueError(f"matrix must be 2-D; got shape {a.shape}")
    if a.size == 0 or not np.any(a):
        return NormBound(0.0, 0.0, "proven", 0.0, "zero")
    if not np.all(np.isfinite(a)):
        return NormBound(math.inf, math.inf, "proven", 0.0, "dense")
    m, n = a.shape
    g = a.T @ a if n <= m else a @ a.T
    inner, side = (m, n) if n <= m else (n, m)
    fro2 = float(np.sum(a * a))
    gamma_in = inner * _U / (1 - inner * _U)
    gram_error = gamma_in * fro2 * (1 + 2 * _U)  # ||G - Ĝ||_2 <= γ_m ||A||_F².
    return _gram_norm_upper(g, gram_error, fro2 * (1 + gamma_in), "dense")


def _gram_norm_upper(g: np.ndarray, gram_error: float, g_scale: float, method: str) -> NormBound:
    """``sqrt(λ_max(G))`` bounded from the computed Gram ``Ĝ`` (``g``) with
    ``||G - Ĝ||_2 <= gram_error`` and ``||Ĝ||_F <= g_scale``: the certificate below + Weyl."""
    import scipy.linalg

    side = g.shape[0]
    estimate = _top_eigenvalue(g)
    # Certificate: Cholesky of μI - Ĝ completes => λ_max(Ĝ) <= μ + γ_{n+1} ||R̂||_F² (Demmel;
    # Higham, Accuracy and Stability, Thm 10.3: R̂ᵀR̂ = μI - Ĝ + ΔH, |ΔH| <= γ_{n+1}|R̂ᵀ||R̂|;
    # the rounding of the diagonal shift adds u μ).
    gamma_side = (side + 1) * _U / (1 - (side + 1) * _U)
    # Shifts tried from the tightest up: a failed factorisation only costs one more try.
    for slack in (1e-9, 1e-6, 1e-4, 1e-3, 1e-2, 5e-2):
        mu = max(estimate, 0.0) * (1 + slack) + 1e-300
        h = -g
        h[np.diag_indices(side)] += mu
        try:
            r = scipy.linalg.cholesky(h, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(r)):
            lam = mu * (1 + _U) + gamma_side * float(np.sum(r * r)) * (1 + 2 * _U)
            upper = math.sqrt(lam + gram_error) * (1 + 4 * _U)
            return NormBound(upper, math.sqrt(max(estimate, 0.0)), "proven", 0.0, method)
    # Fallback: all eigenvalues (Weyl + backward stability of the symmetric eigensolver).
    lam = float(scipy.linalg.eigvalsh(g, subset_by_index=[side - 1, side - 1])[0])
    margin = gram_error + 4 * side * _U * g_scale
    upper = math.sqrt(max(lam, 0.0) + margin) * (1 + 4 * _U)
    return NormBound(upper, math.sqrt(max(lam, 0.0)), "proven", 0.0, method)


def grouped_norm_upper(blocks, radii, *, iterations: int = 6, seed: int = 0) -> NormBound:
    r"""Proven bound on ``sup ||Σ_j A_j z_j||`` over ``||z_j|| <= c_j``: one norm, not a sum.

    For any weights ``p_j > 0`` with ``Σ_j p_j = 1``, ``B = [c_j A_j / sqrt(p_j)]_j`` (the blocks
    side by side) and ``w = [sqrt(p_j) z_j / c_j]_j`` give ``Σ_j A_j z_j = B w`` with ``||w||² = Σ_j
    p_j ||z_j||² / c_j² <= 1``, so the supremum is at most ``||B||_2`` (Cauchy–Schwarz over the
    blocks), certified as :func:`dense_norm_upper` does, from ``Σ_j (c_j² / p_j) A_j A_jᵀ`` formed
    from each block's Gram (its rounding bounded and added). The weights are chosen by a fixed-point
    iteration towards ``p_j ∝ c_j ||A_jᵀ v||`` (``v``: ``B``'s top left singular vector, by power
    iteration; damped, the weights with the smallest power-iteration estimate kept). The best
    weights give ``max_V Σ_j c_j sqrt(tr(V A_j A_jᵀ))`` over density matrices ``V`` (minimax): at
    most ``Σ_j c_j ||A_j||`` (the triangle inequality, equal when the blocks share their top left
    singular vector), ``sqrt(Σ_j c_j² ||A_j||²)`` when their ranges are orthogonal. Whatever the
    iteration reached, the value is a proven bound.

    Args:
      blocks: ``A_j``, each ``(m, n_j)`` (float64), all with ``m`` rows.
      radii: ``c_j >= 0``, one per block.
      iterations: weight updates (``0``: ``p_j ∝ c_j ||A_j||_F``).
      seed: the power iteration's start vector.

    Returns:
      :class:`NormBound` (``kind='proven'``, ``method='grouped'``).

    Example:
      >>> import numpy as np
      >>> a, b = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
      >>> round(float(grouped_norm_upper([a, b], [1.0, 1.0]).upper), 6)  # Not 1 + 1.
      1.414214
    """
    mats = [np.asarray(a, np.float64) for a in blocks]
    c = np.asarray(radii, np.float64)
    if len(mats) == 0 or len(mats) != len(c):
        raise ValueError(f"blocks and radii must be non-empty and of one length; got "
                         f"{len(mats)}, {len(c)}")
    if any(a.ndim != 2 or a.shape[0] != mats[0].shape[0] for a in mats):
        raise ValueError("blocks must be 2-D with one number of rows; got "
                         f"{[a.shape for a in mats]}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"radii must be finite and >= 0; got {c}")
    keep = [i for i, a in enumerate(mats) if c[i] > 0 and np.any(a)]
    if not keep:
        return NormBound(0.0, 0.0, "proven", 0.0, "zero")
    mats = [mats[i] for i in keep]
    c = c[keep]
    # Each block's Gram A_j A_jᵀ once (the iteration and the certificate only use them).
    grams = [a @ a.T for a in mats]
    fro2 = np.array([float(np.sum(a * a)) for a in mats])
    p = c * np.sqrt(fro2)
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(mats[0].shape[0])
    best_p, best_est = p, math.inf
    for _ in range(iterations + 1):
        m_hat = sum((ci * ci / pi) * g for ci, pi, g in zip(c, p, grams))
        # Warm start plus a random part: a direction the last weights had damped to rounding
        # level can dominate under the new ones.
        r = rng.standard_normal(v.shape)
        v = v / max(float(np.linalg.norm(v)), 1e-300) + 0.3 * r / float(np.linalg.norm(r))
        est = 0.0
        for _ in range(30):  # Power iteration on B Bᵀ: est <= ||B||².
            w = m_hat @ v
            nw = float(np.linalg.norm(w))
            if nw == 0 or not math.isfinite(nw):
                break
            est = float(v @ w) / float(v @ v)
            v = w / nw
        if est < best_est:
            best_p, best_est = p, est
        q = c * np.sqrt(np.maximum([float(v @ g @ v) for g in grams], 0.0))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:
            break
        # Damped: the undamped update swings between the blocks when their ranges differ.
        p = 0.5 * p + 0.5 * q / q.sum()
        p = np.maximum(p, 1e-6 * p.max())
        p = p / p.sum()
    # The weights the certificate uses are p_j = c_j² / s2_j for the float s2_j below (any
    # positive weights are valid, with ||w||² <= Σ_j p_j instead of 1).
    s2 = c * c / best_p
    m_hat = sum(si * g for si, g in zip(s2, grams))
    k = len(mats)
    gam = lambda n: n * _U / (1 - n * _U)  # noqa: E731
    weighted = float(np.sum(s2 * fro2))
    # ||Σ s2_j A_jA_jᵀ - M̂||_2: each Ĝ_j's products (γ_{n_j} ||A_j||_F², as dense_norm_upper)
    # plus the weighted sum's rounding (γ_{k+1} Σ s2_j ||Ĝ_j||_F).
    gram_error = float(
        np.sum(s2 * fro2 * np.array([gam(a.shape[1]) for a in mats]))
    ) * (1 + 2 * _U) + gam(k + 1) * weighted * (1 + gam(max(a.shape[1] for a in mats))) * (
        1 + 2 * _U
    )
    g_scale = weighted * (1 + gam(max(a.shape[1] for a in mats))) * (1 + gam(k + 1))
    bound = _gram_norm_upper(m_hat, gram_error, g_scale, "grouped")
    sum_p = float(np.sum(c * c / s2)) * (1 + gam(2 * k + 2))
    upper = bound.upper * math.sqrt(max(sum_p, 1.0)) * (1 + 2 * _U)
    return dataclasses.replace(bound, upper=upper)


def _top_eigenvalue(g: np.ndarray, steps: int = 40) -> float:
    """An estimate (Lanczos with full re-orthogonalisation) of the largest eigenvalue of a
    dense PSD ``g``: only the starting point of the certificate in :func:`dense_norm_upper`."""
    n = g.shape[0]
    if n <= 64:
        return float(np.linalg.eigvalsh(g)[-1])
    q = np.random.default_rng(0).standard_normal(n)
    q /= np.linalg.norm(q)
    steps = min(steps, n)
    basis = np.zeros((steps, n))
    alphas, betas = [], []
    for i in range(steps):
        basis[i] = q
        w = g @ q
        alphas.append(float(q @ w))
        b = basis[: i + 1]
        w = w - b.T @ (b @ w)
        w = w - b.T @ (b @ w)
        beta = float(np.linalg.norm(w))
        if beta <= 1e-13 * max(max(abs(a) for a in alphas), 1e-300):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    t = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    return float(np.linalg.eigvalsh(t)[-1])


def lanczos_norm_upper(
    gram_matvec: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    delta: float,
    num_steps: int = 60,
    seed: int = 0,
) -> NormBound:
    """Probabilistic upper bound on ``||A||_2`` from Lanczos on ``AᵀA`` (Kuczyński–Woźniakowski).

    Args:
      gram_matvec: ``v -> Aᵀ A v`` on ``(n,)`` float64 vectors.
      n: the dimension of ``v``.
      delta: failure probability of the bound (over the random start).
      num_steps: Lanczos steps ``k`` (matvecs), fixed in advance (``>= 2``).
      seed: start vector (standard normal, normalised: uniform on the sphere).

    Returns:
      :class:`NormBound` with ``kind='probabilistic'``: ``sqrt(ξ_k (1 + margin) / (1 - ε))``,
      ``ε = kw_epsilon(delta, n, num_steps)`` and a float64 rounding margin ``margin = 8 k n u``
      on the Ritz value plus ``1e-12 max |α|`` for a breakdown declared at rounding level
      (full re-orthogonalisation keeps the Lanczos basis orthonormal to working precision);
      ``inf`` when ``ε >= 1`` (too few steps for ``δ``).
    """
    eps = kw_epsilon(delta, max(n, 1), num_steps)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    basis = np.zeros((num_steps, n))
    alphas, betas = [], []
    beta = 0.0
    for i in range(num_steps):
        basis[i] = q
        w = np.asarray(gram_matvec(q), np.float64).reshape(n)
        if not np.all(np.isfinite(w)):
            return NormBound(math.inf, math.inf, "probabilistic", float(delta), "lanczos")
        alpha = float(q @ w)
        alphas.append(alpha)
        w = w - basis[: i + 1].T @ (basis[: i + 1] @ w)
        w = w - basis[: i + 1].T @ (basis[: i + 1] @ w)  # Twice is enough (Kahan).
        beta = float(np.linalg.norm(w))
        if i == num_steps - 1 or beta <= 1e-13 * max(max(abs(a) for a in alphas), 1e-300):
            break
        betas.append(beta)
        q = w / beta
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    xi = float(np.linalg.eigvalsh(t)[-1]) if t.size else 0.0
    xi = max(xi, 0.0) * (1 + 8 * num_steps * n * _U) + 1e-12 * max(map(abs, alphas), default=0.0)
    upper = math.sqrt(xi / (1 - eps)) if eps < 1 else math.inf
    return NormBound(upper, math.sqrt(max(xi, 0.0)), "probabilistic", float(delta), "lanczos")


def composite_norm_upper(
    matvec: Callable[[np.ndarray], np.ndarray],
    rmatvec: Callable[[np.ndarray], np.ndarray],
    in_dim: int,
    out_dim: int,
    *,
    max_dense_entries: int = 2**22,
    delta: float = 1e-6,
    num_steps: int = 60,
    seed: int = 0,
) -> NormBound:
    """Upper bound on the norm of the linear map ``A`` given by ``matvec`` / ``rmatvec``.

    Dense and **proven** (:func:`dense_norm_upper`) when ``in_dim * out_dim <=
    max_dense_entries`` (``A`` is formed column by column), else **probabilistic**
    (:func:`lanczos_norm_upper` on ``rmatvec(matvec(v))`` in the smaller of the two spaces).

    Args:
      matvec: ``(in_dim,) -> (out_dim,)``, ``v -> A v``.
      rmatvec: ``(out_dim,) -> (in_dim,)``, ``w -> Aᵀ w``.
      in_dim: input dimension.
      out_dim: output dimension.
      max_dense_entries: the largest ``in_dim * out_dim`` formed densely.
      delta: failure probability of a probabilistic bound.
      num_steps: Lanczos steps.
      seed: Lanczos start vector.

    Returns:
      :class:`NormBound`.

    Example:
      >>> import numpy as np
      >>> a = np.diag([3.0, 1.0])
      >>> b = composite_norm_upper(lambda v: a @ v, lambda w: a.T @ w, 2, 2)
      >>> b.kind, round(float(b.upper), 6)
      ('proven', 3.0)
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"in_dim and out_dim must be >= 1; got {in_dim}, {out_dim}")
    if in_dim * out_dim <= max_dense_entries:
        cols = [np.asarray(matvec(e), np.float64).reshape(out_dim) for e in np.eye(in_dim)]
        return dense_norm_upper(np.stack(cols, axis=1))
    if in_dim <= out_dim:
        return lanczos_norm_upper(
            lambda v: rmatvec(matvec(v)), in_dim, delta=delta, num_steps=num_steps, seed=seed
        )
    return lanczos_norm_upper(
        lambda w: matvec(rmatvec(w)), out_dim, delta=delta, num_steps=num_steps, seed=seed
    )


def lanczos_tridiagonal(gram_matvec: Callable, v0, num_steps: int):
    """``k`` Lanczos steps on a symmetric ``G`` (``gram_matvec``) from ``v0``, in JAX.

    Full re-orthogonalisation (twice, against every earlier vector); a breakdown
    (``β <= 1e-13 max |α|``: an invariant subspace up to rounding, e.g. after ``n`` steps in
    dimension ``n``) makes the later vectors zero. Works under
    ``jax.jit`` and ``jax.vmap`` (``num_steps`` static).

    Args:
      gram_matvec: ``v -> G v`` on arrays shaped like ``v0``.
      v0: start vector (any nonzero vector; normalised here).
      num_steps: ``k``.

    Returns:
      ``(alphas (k,), betas (k - 1,))``: the tridiagonal matrix whose largest eigenvalue is the
      Ritz value ``ξ_k`` (use :func:`kw_upper_from_tridiagonal`).
    """
    import jax
    import jax.numpy as jnp

    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2; got {num_steps}")
    shape = v0.shape
    v = jnp.ravel(v0)
    v = v / jnp.linalg.norm(v)
    n = v.shape[0]
    basis = jnp.zeros((num_steps, n), v.dtype).at[0].set(v)

    def body(i, carry):
        basis, alphas, betas = carry
        q = basis[i]
        w = jnp.ravel(gram_matvec(q.reshape(shape)))
        alpha = q @ w
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(alphas)), jnp.abs(alpha)), 1e-300)
        ok = beta > 1e-13 * scale  # Else: an invariant subspace up to rounding.
        nxt = jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0)
        basis = basis.at[i + 1].set(nxt, mode="drop")  # Dropped after the last step.
        alphas = alphas.at[i].set(alpha)
        betas = betas.at[i].set(jnp.where(ok, beta, 0.0), mode="drop")
        return basis, alphas, betas

    alphas = jnp.zeros(num_steps, v.dtype)
    betas = jnp.zeros(num_steps - 1, v.dtype)
    _, alphas, betas = jax.lax.fori_loop(0, num_steps, body, (basis, alphas, betas))
    return alphas, betas


def kw_upper_from_tridiagonal(alphas, betas, n: int, *, delta: float) -> NormBound:
    """:class:`NormBound` from the Lanczos tridiagonal matrix of ``k = len(alphas)`` steps on
    ``AᵀA`` (float64) from a start vector uniform on the sphere of dimension ``n``:
    ``sqrt(ξ_k (1 + 8 k n u) / (1 - ε))``, ``ε = kw_epsilon(delta, n, k)`` (as
    :func:`lanczos_norm_upper`)."""
    alphas = np.asarray(alphas, np.float64)
    betas = np.asarray(betas, np.float64)
    k = len(alphas)
    if not (np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))):
        return NormBound(math.inf, math.inf, "probabilistic", float(delta), "lanczos")
    eps = kw_epsilon(delta, max(n, 1), k)
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    scale = float(np.max(np.abs(alphas))) if k else 0.0
    xi = max(float(np.linalg.eigvalsh(t)[-1]), 0.0) * (1 + 8 * k * n * _U) + 1e-12 * scale
    upper = math.sqrt(xi / (1 - eps)) if eps < 1 else math.inf
    return NormBound(upper, math.sqrt(xi), "probabilistic", float(delta), "lanczos")
