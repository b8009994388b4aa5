r"""Certified upper bounds on the spectral norm (σ_max) of conv layers.

Every function here returns a scalar that is a **certified upper bound** on the exact σ_max of
the layer described by ``spec`` (circular or any zero padding, any stride, dilation and group
count), up to floating-point rounding. All are pure JAX: jit-able (``spec`` static), vmap-able
over stacked kernels, and differentiable (``jax.grad`` gives finite values).

Shared facts (the notation of the reference notes; ``T_pq`` is the ``c_out x c_in`` matrix of tap
``(p, q)``, block diagonal over groups).

1. Symbol. ``A(w) = Σ_pq T_pq exp(-i (p w1 + q w2))`` for the *undilated* kernel. Every layer
   with this kernel has ``σ_max <= sup_w ||A(w)||_2``: a zero-padded layer is a submatrix of the
   bi-infinite block Toeplitz operator (whose norm is the sup); a circular stride-1 layer has
   norm ``max_{w on its grid} ||A_d(w)||`` with ``A_d(w) = A(d ⊙ w)`` the dilated symbol; a strided
   layer is a row subsample of the stride-1 one. Dilation never matters for the sup, since
   ``w -> d ⊙ w (mod 2π)`` maps the torus onto itself.
2. Polyphase reduction (strides). Along an axis with stride ``s`` (zero padding, or circular with
   ``s`` dividing the input), write the dilated tap position ``j = s a + r``: the strided layer
   is the stride-1, undilated conv of the *reduced kernel* ``K'[a, ..., (c, r), o] = K_d[s a + r,
   ..., c, o]`` (``ceil(k_eff / s)`` taps, ``c_in * #phases`` channels; phases with no tap are
   dropped) applied to the polyphase components of the (zero-padded) input — an isometric
   re-indexing (Senderovich et al. 2022). So fact 1 holds with ``K'`` in place of ``K``, which
   is often tighter (e.g. ``||M'||_2 <= ||M||_2`` for the ℓ1 matrices, by Perron-Frobenius).
   A circular layer whose stride does not divide the input is only a row subsample of the
   stride-1 circular layer (the reduction is *invalid* there; a 5-px, stride-2, ``[1, 1]``
   kernel has σ = √3 > √2 = the polyphase sup), so that axis keeps stride 1.
   Bounds that only depend on the kernel are evaluated on both the undilated kernel and the
   reduced kernel (when they differ) and the smaller value is returned.
3. Circulant embedding. A zero-padded layer is a submatrix of the circular layer
   :func:`~spectra.circulant_embedding`, whose σ_max is computed exactly per frequency
   (:func:`~spectra.frequency_matrices`, polyphase for strides).

References: Sedghi et al. 2019; Yi 2020; Araujo et al. 2021 (LipBound); Singla & Feizi 2021
(Fantastic Four); Delattre et al. 2023 (Gram iteration); Grishina et al. 2024 (tensor norm);
Senderovich et al. 2022 (strided circular convs).

Length: one concept, the twelve bounds of :data:`UPPER_BOUNDS`, which share facts 1-3 and
their helpers (candidate kernels, polyphase reduction, per-group matrices); split, every bound
module would import the same private helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectra import _fourier
from spectra._exact import circular_norm_bracket
from spectra._spec import ConvSpec

GridSize = int | Sequence[int] | None

# ---------------------------------------------------------------------------------------------
# Helpers: kernels, reductions, symbols.


def _as_float_kernel(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        kernel = kernel.astype(jnp.result_type(float))
    spec.validate(kernel)
    return kernel


def _tiny(x: jax.Array) -> jax.Array:
    return jnp.asarray(jnp.finfo(jnp.real(x).dtype).tiny, jnp.real(x).dtype)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt`` with a finite gradient at 0 (the value at 0 is ``sqrt(tiny)``, i.e. ~1e-154)."""
    return jnp.sqrt(jnp.maximum(x, _tiny(x)))


def _frobenius(x: jax.Array) -> jax.Array:
    """Frobenius norm over the last two axes, with a finite gradient at 0."""
    return _safe_sqrt(jnp.sum(jnp.abs(x) ** 2, axis=(-2, -1)))


def _two_norm(x: jax.Array) -> jax.Array:
    """Exact spectral norm over the last two axes.

    SVD for near-square matrices; for elongated ones ``sqrt(λ_max)`` of the Gram matrix of the
    short side (the top eigenvalue is accurate to ~machine precision relative to itself), since
    the CPU SVD allocates a ``long x long`` workspace even without singular vectors (a
    ``3 x 196608`` matricisation would need ~300 GB).
    """
    m, n = x.shape[-2:]
    if max(m, n) <= 2 * min(m, n):
        return jnp.linalg.svd(x, compute_uv=False)[..., 0]
    xh = jnp.conj(jnp.swapaxes(x, -1, -2))
    gram = x @ xh if m < n else xh @ x
    return _safe_sqrt(jnp.linalg.eigvalsh(gram)[..., -1])


def effective_strides(spec: ConvSpec) -> tuple[int, int]:
    """Per-axis strides for which the polyphase reduction is valid (fact 2 of the module doc).

    The spec's stride, except on circular axes whose stride does not divide the input, where it
    is 1 (that layer is a row subsample of the stride-1 circular layer).
    """
    if not spec.is_circular:
        return spec.strides
    return tuple(  # type: ignore[return-value]
        s if n % s == 0 else 1 for n, s in zip(spec.input_shape, spec.strides)
    )


def exact_circular_spec(spec: ConvSpec, kernel_shape: Sequence[int]) -> ConvSpec:
    """A circular spec (strides dividing its input) whose exact σ_max bounds ``spec``'s from above.

    The circulant embedding for zero padding; for circular padding the spec itself with strides
    that do not divide the input replaced by 1 (a row subsample). Equal to ``spec`` (so the bound
    is exact) for circular specs whose strides divide the input.
    """
    if spec.is_circular:
        return dataclasses.replace(spec, strides=effective_strides(spec))
    return _fourier.circulant_embedding(spec, kernel_shape)


def reduced_kernel(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    """The stride-1, undilated HWIO kernel whose symbol's sup bounds the layer (module doc, 2).

    Along axes with an effective stride of 1 the kernel is left undilated; along strided axes it
    is the polyphase kernel of the dilated kernel. Same group count as ``spec``.
    """
    for axis, (s, d) in enumerate(zip(effective_strides(spec), spec.kernel_dilation)):
        if s > 1:
            kernel = _fourier.polyphase_axis(kernel, axis, d, s, drop_empty_phases=True)
    return kernel


def _candidate_kernels(kernel: jax.Array, spec: ConvSpec) -> list[jax.Array]:
    """Kernels whose symbol sup bounds the layer: the undilated one and the reduced one."""
    if all(s == 1 for s in effective_strides(spec)):
        return [kernel]
    return [kernel, reduced_kernel(kernel, spec)]


def _resolve_grid(grid_size: GridSize, taps_shape: tuple[int, int]) -> tuple[int, int]:
    """Per-axis grid size: ``16 (k' - 1)`` by default; 1 on axes with a single tap."""
    if grid_size is None:
        sizes = [16 * (k - 1) for k in taps_shape]
    elif isinstance(grid_size, (int, np.integer)):
        sizes = [int(grid_size)] * 2
    else:
        sizes = [int(m) for m in grid_size]
        if len(sizes) != 2:
            raise ValueError(f"grid_size={grid_size!r} must be an int or a pair of ints")
    sizes = [1 if k == 1 else m for m, k in zip(sizes, taps_shape)]
    for m, k in zip(sizes, taps_shape):
        if m < k:
            raise ValueError(
                f"grid_size={grid_size!r} must be at least the (reduced) kernel size "
                f"{tuple(taps_shape)} on each axis"
            )
    return sizes[0], sizes[1]


def _grid_corrected_sup(
    grid_max: jax.Array, tap_norms: jax.Array, grid: tuple[int, int]
) -> jax.Array:
    r"""Certified ``sup_w N(A(w))`` per group from its max on a grid; see :func:`symbol_sup_bound`.

    Args:
      grid_max: ``(g,)`` max over the ``M1 x M2`` grid of a norm ``N`` of ``A_g(w)`` that is a
        sup of ``|linear functional|`` (2-norm or Frobenius norm).
      tap_norms: ``(g, kh, kw)``: ``N(T_pq)`` per tap.
      grid: ``(M1, M2)``.

    Returns:
      ``(g,)``: ``min(grid_max / cos φ, grid_max + L)`` (the first only when ``φ < π/2``).
    """
    _, kh, kw = tap_norms.shape
    m1, m2 = grid
    phi = 0.5 * math.pi * ((kh - 1) / m1 + (kw - 1) / m2)
    p = np.abs(np.arange(kh) - (kh - 1) / 2)[:, None] * (math.pi / m1)
    q = np.abs(np.arange(kw) - (kw - 1) / 2)[None, :] * (math.pi / m2)
    # max over the box |δ1| <= π/M1, |δ2| <= π/M2 of Σ n_pq |P δ1 + Q δ2|: convex in δ, so at a
    # corner; by symmetry the corners (+, +) and (+, -).
    lip = jnp.maximum(
        jnp.sum(tap_norms * (p + q), axis=(1, 2)),
        jnp.sum(tap_norms * np.abs(p - q), axis=(1, 2)),
    )
    additive = grid_max + lip
    if phi < 0.5 * math.pi:
        return jnp.minimum(grid_max / math.cos(phi), additive)
    return additive

# ---------------------------------------------------------------------------------------------
# Bounds from the exact circulant spectrum of the layer (they use the input size).


@functools.partial(jax.jit, static_argnums=1)
def _circulant_top(kernel: jax.Array, emb: ConvSpec) -> tuple:
    """Exact top of the circular layer ``emb`` from its per-frequency matrices.

    Returns:
      ``(sigma_max, f1, f2, matrix)``: the exact σ_max; per group ``(g,)`` the maximising
      frequency as a fraction of the grid ``(u / N1, v / N2)``; and that frequency's matrix
      ``(g, cog, cig * s1 * s2)`` (columns ``(c, r1, r2)``, as :func:`~spectra.frequency_matrices`).
    """
    mats = _fourier.frequency_matrices(kernel, emb).matrices  # (g, N1, N2h, cog, C)
    g, n1, n2h = mats.shape[:3]
    sv = _two_norm(mats)
    best = jnp.argmax(sv.reshape(g, -1), axis=1)
    grid = tuple(n // s for n, s in zip(emb.input_shape, emb.strides))
    f1 = (best // n2h).astype(sv.dtype) / grid[0]
    f2 = (best % n2h).astype(sv.dtype) / grid[1]
    mat = mats.reshape(g, n1 * n2h, *mats.shape[3:])[jnp.arange(g), best]
    return jnp.max(sv), f1, f2, mat


def symbol_grid_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""Max per-frequency σ_max of the layer's exact circulant embedding (Sedghi et al. 2019).

    :func:`exact_circular_spec` gives a circular layer whose operator contains ``spec``'s
    (zero padding: the circulant embedding; circular with a stride not dividing the input: the
    stride-1 layer on that axis); its σ_max is the max over its frequency grid of the σ_max of
    the (polyphase) matrices of :func:`~spectra.frequency_matrices`, computed by an exact SVD.
    This is Yi's ``sup_w ||F(w)||_2`` made safe for a finite grid: the grid is the one of a real
    circular layer containing this one.

    Args:
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer.

    Returns:
      Scalar **upper bound**; **exact** for circular specs whose strides divide the input.
    """
    kernel = _as_float_kernel(kernel, spec)
    return _circulant_top(kernel, exact_circular_spec(spec, kernel.shape))[0]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gram_iteration_jit(kernel: jax.Array, emb: ConvSpec, num_iterations: int) -> jax.Array:
    return circular_norm_bracket(kernel, emb, num_squarings=num_iterations)[1]


def gram_iteration_bound(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, num_iterations: int = 6
) -> jax.Array:
    r"""Gram iteration bound (Delattre et al. 2023) on the exact circulant embedding.

    Per frequency of :func:`exact_circular_spec`, ``t = num_iterations`` normalised Gram
    squarings give ``σ_max(A) <= Π_j ||H_j||_F^{2^{-j-1}}`` (see
    :func:`~spectra.circular_norm_bracket`), matmuls only; the max over frequencies bounds the
    circular layer, hence ``spec``'s. Overestimates the circular σ_max by at most a factor
    ``rank^(1 / 2^(t+1))``.

    Args:
      kernel: HWIO kernel.
      spec: the layer.
      num_iterations: number of squarings ``t >= 0``.

    Returns:
      Scalar **upper bound**.
    """
    if int(num_iterations) < 0:
        raise ValueError(f"num_iterations={num_iterations!r} must be a non-negative int")
    kernel = _as_float_kernel(kernel, spec)
    emb = exact_circular_spec(spec, kernel.shape)
    return _gram_iteration_jit(kernel, emb, int(num_iterations))


def _unit_conj(z: jax.Array) -> jax.Array:
    """``argmax_{||x|| = 1} |Σ z x|`` (per row): ``conj(z) / ||z||``; the max is ``||z||``."""
    norm = jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), _tiny(z))
    return jnp.conj(z) / norm


def _hopm_sweep(taps: jax.Array, shape: tuple[int, ...], vecs: tuple) -> tuple:
    """One sweep of higher-order power iteration, per group.

    ``taps`` is the kernel tensor ``(g, p, q, o, c)`` reshaped to ``(g, p q, o c)``; ``shape`` is
    ``(p, q, o, c)``. Each of the four unit vectors is replaced by the exact maximiser of
    ``|K(a, b, v, u)|`` given the other three, so the objective never decreases.
    """
    kh, kw, cog, cig = shape
    a, b, v, u = vecs
    spatial = (taps @ (u[:, :, None] * v[:, None, :]).reshape(-1, cog * cig, 1))
    spatial = spatial.reshape(-1, kh, kw)
    a = _unit_conj(jnp.sum(spatial * b[:, None, :], axis=2))
    b = _unit_conj(jnp.sum(spatial * a[:, :, None], axis=1))
    channel = ((a[:, :, None] * b[:, None, :]).reshape(-1, 1, kh * kw) @ taps)
    channel = channel.reshape(-1, cog, cig)
    v = _unit_conj(jnp.sum(channel * u[:, :, None], axis=1))
    u = _unit_conj(jnp.sum(channel * v[:, None, :], axis=2))
    return a, b, v, u


@functools.partial(jax.jit, static_argnums=(3, 4))
def _tensor_warm_start(mat: jax.Array, f1: jax.Array, f2: jax.Array, key: tuple, kshape: tuple):
    """Unit vectors ``(a, b, v, u)`` per group from the top circulant frequency (see
    :func:`_circulant_top`) where ``sqrt(kh kw) |K(a, b, v, u)| = σ_max(mat)``.

    ``key`` is the reduction key of the exact circular spec (effective strides = its strides).
    On a strided axis the reduced (polyphase) kernel sees the frequency ``f`` itself; on a
    stride-1 axis the undilated kernel sees ``d f`` (the dilated symbol is ``A(d w)``). Columns
    of ``mat`` for phases without taps are zero, so the top right singular vector vanishes there
    and restricting it to the kept phases keeps it a unit vector.
    """
    _, strides, dilation = key
    dtype = mat.dtype
    vecs = []
    for axis, freq in enumerate((f1, f2)):
        k, d, st = kshape[axis], dilation[axis], strides[axis]
        taps = -(-((k - 1) * d + 1) // st) if st > 1 else k
        phase = freq if st > 1 else d * freq
        vecs.append(jnp.exp(-2j * np.pi * np.arange(taps)[None] * phase[:, None]).astype(dtype)
                    / math.sqrt(taps))
    # Kept phase columns (c, r1, r2) of the reduced kernel inside (c, s1, s2).
    kept = [sorted({(p * d) % st for p in range(k)}) if st > 1 else [0]
            for k, d, st in zip(kshape[:2], dilation, strides)]
    cols = np.array([(c * strides[0] + r1) * strides[1] + r2
                     for c in range(kshape[2]) for r1 in kept[0] for r2 in kept[1]])
    # Top singular pair of A = mat from the Gram matrix of its smaller side: A x = σ y with
    # unit x, y; then K(a, b, v, u) = u^T A v / sqrt(kh kw) = σ / sqrt(kh kw) for v = x,
    # u = conj(y).
    mat_h = jnp.conj(jnp.swapaxes(mat, -1, -2))
    if mat.shape[-2] <= mat.shape[-1]:
        vec_y = jnp.linalg.eigh(mat @ mat_h)[1][:, :, -1]
        vec_x = jnp.conj(_unit_conj(jnp.einsum("gco,go->gc", mat_h, vec_y)))
        vec_u = jnp.conj(vec_y)
    else:
        vec_x = jnp.linalg.eigh(mat_h @ mat)[1][:, :, -1]
        vec_u = _unit_conj(jnp.einsum("goc,gc->go", mat, vec_x))
    return vecs[0], vecs[1], vec_x[:, cols], vec_u


@functools.partial(jax.jit, static_argnums=(1, 3))
def _tensor_hopm(kernel: jax.Array, key: tuple, init: tuple, num_iterations: int) -> jax.Array:
    """``sqrt(kh kw) max_g |K_g(a, b, v, u)|`` after HOPM sweeps from ``init`` (constants)."""
    taps = _fourier.group_taps(_candidates_from_key(kernel, key)[-1], key[0])
    g, kh, kw, cog, cig = taps.shape
    taps_c = taps.astype(init[0].dtype)
    flat = jax.lax.stop_gradient(taps_c).reshape(g, kh * kw, cog * cig)
    vecs = jax.lax.fori_loop(
        0, num_iterations, lambda _, x: _hopm_sweep(flat, (kh, kw, cog, cig), x),
        jax.lax.stop_gradient(init))
    a, b, v, u = jax.lax.stop_gradient(vecs)
    value = jnp.abs(jnp.einsum("gpqoc,gp,gq,gc,go->g", taps_c, a, b, v, u))
    return math.sqrt(kh * kw) * jnp.max(value)


def tensor_norm_bound(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, num_iterations: int = 30
) -> jax.Array:
    r"""Tensor-norm bound (Grishina et al. 2024) ``sqrt(kh kw) ||K||_σ``, certified for ``spec``.

    Since ``A(w) = sqrt(kh kw) K ×_p a(w1) ×_q b(w2)`` with unit Fourier vectors
    ``a_p = e^{-i p w1} / sqrt(kh)``, ``sup ||A|| <= sqrt(kh kw) ||K||_σ,C`` with the **complex**
    tensor spectral norm (max of ``|K(a, b, v, u)|`` over complex unit vectors). The real tensor
    norm is *not* a valid bound: ``K[0] = I, K[1] = [[0, -1], [1, 0]]`` (a 2x1 kernel) has
    σ_max = 2 for a circular layer but ``sqrt(2) ||K||_σ,R = sqrt(2)`` (tested).

    Higher-order power iteration (HOPM: alternating exact maximisation over each unit vector)
    only gives a *lower* estimate of ``||K||_σ,C``. To make the result certified, HOPM is
    **warm-started at the maximiser of the reduced symbol on the grid of**
    :func:`exact_circular_spec` (its Fourier vectors and top singular vectors), where
    ``sqrt(kh kw) |K(a, b, v, u)|`` equals the grid max ``>= symbol_grid_bound >= σ_max``; no
    HOPM step can decrease it. So the result is a certified upper bound for ``spec``, and
    ``<= sqrt(kh kw) ||K||_σ,C <= matricisation_bound``: a lower estimate of the paper's
    resolution-independent quantity (:func:`matricisation_bound` is a certified upper estimate
    of it). Gradient: the final vectors are constants (envelope theorem; exact at a converged
    HOPM fixed point).

    Args:
      kernel: HWIO kernel.
      spec: the layer. Taps are those of the polyphase-reduced kernel (undilated for stride 1).
      num_iterations: HOPM sweeps (each updates the 4 vectors once).

    Returns:
      Scalar **upper bound** for ``spec``.
    """
    if int(num_iterations) < 0:
        raise ValueError(f"num_iterations={num_iterations!r} must be a non-negative int")
    kernel = _as_float_kernel(kernel, spec)
    emb = exact_circular_spec(spec, kernel.shape)
    key = _reduction_key(emb)
    _, f1, f2, mat = _circulant_top(jax.lax.stop_gradient(kernel), emb)
    init = _tensor_warm_start(mat, f1, f2, key, tuple(kernel.shape))
    return _tensor_hopm(kernel, key, init, int(num_iterations))


# ---------------------------------------------------------------------------------------------
# Bounds valid for every input size: they depend on the kernel, strides, dilation and groups.


def _reduction_key(spec: ConvSpec) -> tuple:
    """The static part of ``spec`` that resolution-independent bounds depend on."""
    return spec.feature_group_count, effective_strides(spec), spec.kernel_dilation


def _candidates_from_key(kernel: jax.Array, key: tuple) -> list[jax.Array]:
    groups, strides, dilation = key
    # Only strides and dilation are read (zero padding: the effective strides are the strides).
    spec = ConvSpec((1, 1), strides, "VALID", dilation, groups)
    return _candidate_kernels(kernel, spec)


def _normalise_grid_size(grid_size: GridSize) -> int | tuple[int, ...] | None:
    if grid_size is None or isinstance(grid_size, (int, np.integer)):
        return None if grid_size is None else int(grid_size)
    try:
        return tuple(int(m) for m in grid_size)
    except TypeError as e:
        raise ValueError(f"grid_size={grid_size!r} must be an int or a pair of ints") from e


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _grid_sup_jit(kernel: jax.Array, key: tuple, grid_size, frobenius: bool) -> jax.Array:
    norm = _frobenius if frobenius else _two_norm
    values = []
    for cand in _candidates_from_key(kernel, key):
        taps = _fourier.group_taps(cand, key[0])
        grid = _resolve_grid(grid_size, taps.shape[1:3])
        grid_max = jnp.max(norm(_fourier.symbol_on_grid(taps, grid)), axis=(1, 2))
        values.append(jnp.max(_grid_corrected_sup(grid_max, norm(taps), grid)))
    return functools.reduce(jnp.minimum, values)


def symbol_sup_bound(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, grid_size: GridSize = None
) -> jax.Array:
    r"""``sup_w ||A(w)||_2`` (Yi 2020), certified from a finite grid: valid for all input sizes.

    ``A`` is the symbol of the undilated kernel or of the polyphase-reduced kernel (module doc,
    facts 1-2; the smaller result is returned), with ``k1 x k2`` taps. Its per-frequency σ_max is
    computed exactly (SVD) on the ``M1 x M2`` grid ``w = 2π (u / M1, v / M2)`` (rfft half plane:
    ``||A(-w)|| = ||A(w)||`` for a real kernel), so every ``w`` is within ``|δ_i| <= π / M_i`` of a
    grid point. Two proven corrections; the smaller is used (per group):

    * **Second order (trig-polynomial) correction**, when ``φ < π/2``:

      .. math:: \sup_w ||A(w)|| \le \max_{grid} ||A|| / \cos φ, \quad
                φ = \frac{\pi}{2}\Big(\frac{k_1 - 1}{M_1} + \frac{k_2 - 1}{M_2}\Big).

      Proof. Let ``S = sup ||A||``, attained at ``w*`` by unit ``x, y`` and a phase ``θ``:
      ``S = Re(e^{iθ} e^{i c·w*} y^H A(w*) x)``, centring ``c = ((k1-1)/2, (k2-1)/2)``. Fix a
      nearest grid point ``w* + δ``. On the line ``t -> w* + t δ``,
      ``f(t) = Re(e^{iθ} e^{i c·(w*+tδ)} y^H A(w*+tδ) x)`` is a real trigonometric sum with
      frequencies ``|λ| <= τ = |δ1| (k1-1)/2 + |δ2| (k2-1)/2`` and ``|f| <= S`` everywhere, so
      (Bernstein-Szegő / van der Corput-Schaake; Duffin-Schaeffer for real entire functions of
      exponential type ``τ``) ``f'^2 + τ^2 f^2 <= τ^2 S^2``. Writing ``f = S cos ψ`` gives
      ``|ψ'| <= τ`` and ``ψ(0) = 0``, so ``f(1) >= S cos τ`` while ``τ <= π``. With
      ``|δ_i| <= π/M_i``, ``τ <= φ`` and ``max_grid ||A|| >= |f(1)| >= S cos φ``. Sharp: the
      kernel ``[1, -1]`` on a 3-point grid gives exactly ``sup = 2`` (tested).
    * **First order (Lipschitz) correction**: with centred tap offsets ``P = p - (k1-1)/2``,
      ``Q = q - (k2-1)/2`` (centring multiplies ``A`` by a unimodular scalar) and
      ``|e^{-ia} - e^{-ib}| <= |a - b|``,

      .. math:: \big|\,||A(w)|| - ||A(w')||\,\big| \le \sum_{pq} ||T_{pq}||_2\,
                |P δ_1 + Q δ_2| \le \max_{\pm} \sum_{pq} ||T_{pq}||_2
                \Big|\frac{\pi |P|}{M_1} \pm \frac{\pi |Q|}{M_2}\Big| =: L

      (a convex function of ``δ``, maximal at a corner of the box), so
      ``sup <= max_grid + L``. Exact when only the centre tap is non-zero.

    Args:
      kernel: HWIO kernel.
      spec: the layer (only its strides, dilation and groups enter: the result holds for every
        input size and zero padding, and for circular padding with strides dividing the input).
      grid_size: ``M`` (int or pair); default ``16 (k' - 1)`` per axis (``φ = π/16``, factor
        ``<= 1.0196``), 1 on single-tap axes. At least the (reduced) kernel size.

    Returns:
      Scalar **upper bound**, resolution independent.
    """
    kernel = _as_float_kernel(kernel, spec)
    return _grid_sup_jit(kernel, _reduction_key(spec), _normalise_grid_size(grid_size), False)


def araujo_lipbound(
    kernel: jax.typing.ArrayLike, spec: ConvSpec, grid_size: GridSize = None
) -> jax.Array:
    r"""LipBound (Araujo et al. 2021): ``sup_w ||A(w)||_F`` from a grid, with a proven correction.

    The Frobenius norm is a sup of ``|<U, A(w)>|`` over unit ``U``, so both corrections of
    :func:`symbol_sup_bound` apply verbatim with ``||.||_F`` (per-tap Frobenius norms in the
    Lipschitz constant): ``sup ||A||_F <= min(max_grid ||A||_F / cos φ, max_grid + L_F)``.
    The reference correction ``α = 1 / (1 - (k-1)/N_s)`` (odd square kernels) is *not* used:
    for ``x = (k-1)/N_s <= 0.2`` (``N_s >= 5 (k-1)``), ``1/cos(π x) <= α`` (``cos(π x) - 1 + x``
    is concave and non-negative on ``[0, 0.2]``), so our factor is at least as tight there and
    proves ``α`` valid there; for coarser grids we do not rely on ``α``. Non-square kernels use
    their per-axis sizes; dilation is handled exactly (undilated kernel, module doc fact 1),
    strides by the polyphase kernel (whose Frobenius symbol is the alias average, never larger).
    Groups: the per-group sup is taken (block diagonal), tighter than the whole matrix's.

    Args:
      kernel: HWIO kernel.
      spec: the layer (only strides, dilation and groups enter).
      grid_size: ``N_s`` (int or pair); default ``16 (k' - 1)`` per axis.

    Returns:
      Scalar **upper bound**, resolution independent. A 1x1 kernel gives ``||K||_F`` (per group).
    """
    kernel = _as_float_kernel(kernel, spec)
    return _grid_sup_jit(kernel, _reduction_key(spec), _normalise_grid_size(grid_size), True)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _kernel_only_jit(per_group, kernel: jax.Array, key: tuple) -> jax.Array:
    values = [
        jnp.max(per_group(_fourier.group_taps(c, key[0])))
        for c in _candidates_from_key(kernel, key)
    ]
    return functools.reduce(jnp.minimum, values)


def _kernel_only_bound(
    per_group: Callable[[jax.Array], jax.Array], kernel: jax.typing.ArrayLike, spec: ConvSpec
) -> jax.Array:
    """``min over candidate kernels of max over groups of per_group(taps (g, kh, kw, o, c))``.

    ``per_group`` must be a module-level function (it is a static jit argument).
    """
    kernel = _as_float_kernel(kernel, spec)
    return _kernel_only_jit(per_group, kernel, _reduction_key(spec))


def _abs_sum_matrix(taps: jax.Array) -> jax.Array:
    """``M[g, o, c] = Σ_pq |T[g, p, q, o, c]|``."""
    return jnp.sum(jnp.abs(taps), axis=(1, 2))


def _l1_matrix_per_group(taps: jax.Array) -> jax.Array:
    return _two_norm(_abs_sum_matrix(taps))


def _l1_schur_per_group(taps: jax.Array) -> jax.Array:
    m = _abs_sum_matrix(taps)
    return _safe_sqrt(jnp.max(jnp.sum(m, axis=1), axis=-1) * jnp.max(jnp.sum(m, axis=2), -1))


def _frobenius_per_group(taps: jax.Array) -> jax.Array:
    return _frobenius(_abs_sum_matrix(taps))


def _frobenius_kernel_per_group(taps: jax.Array) -> jax.Array:
    kh, kw = taps.shape[1:3]
    return math.sqrt(kh * kw) * _safe_sqrt(jnp.sum(taps**2, axis=(1, 2, 3, 4)))


def _tap_sum_per_group(taps: jax.Array) -> jax.Array:
    return jnp.sum(_two_norm(taps), axis=(1, 2))


def l1_matrix_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""``||M||_2`` with ``M[o, c] = Σ_pq |K[p, q, c, o]|`` (per group; max over groups).

    ``|A(w)| <= M`` entrywise and the 2-norm is monotone on non-negative matrices, so
    ``sup ||A|| <= ||M||_2``. Evaluated on the undilated and the reduced kernel (module doc).

    Returns:
      Scalar **upper bound**, resolution independent; exact for non-negative 1x1 kernels.
    """
    return _kernel_only_bound(_l1_matrix_per_group, kernel, spec)


def l1_schur_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""B5: ``sqrt(||M||_1 ||M||_∞)`` (Schur test on the ℓ1 matrix of :func:`l1_matrix_bound`).

    ``||M||_1`` is the max column sum (over outputs), ``||M||_∞`` the max row sum; per group,
    max over groups. ``>= l1_matrix_bound``; no SVD.

    Returns:
      Scalar **upper bound**, resolution independent.
    """
    return _kernel_only_bound(_l1_schur_per_group, kernel, spec)


def frobenius_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""``||M||_F`` of the ℓ1 matrix ``M`` of :func:`l1_matrix_bound` (per group, max).

    ``||A(w)||_2 <= ||A(w)||_F <= ||M||_F`` since ``|A_oc(w)| <= M_oc``. At most
    :func:`frobenius_kernel_bound` by Cauchy-Schwarz (``(Σ_pq |K|)^2 <= kh kw Σ_pq K^2``).

    Returns:
      Scalar **upper bound**, resolution independent.
    """
    return _kernel_only_bound(_frobenius_per_group, kernel, spec)


def frobenius_kernel_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""``sqrt(kh kw) ||K||_F`` (per group, max; undilated / reduced tap counts).

    Valid since ``||M||_F^2 = Σ_oc (Σ_pq |K|)^2 <= kh kw ||K||_F^2``: it is ``>=``
    :func:`frobenius_bound` (the loosest bound here).

    Returns:
      Scalar **upper bound**, resolution independent.
    """
    return _kernel_only_bound(_frobenius_kernel_per_group, kernel, spec)


def tap_sum_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""B3: ``Σ_pq ||T_pq||_2`` (triangle inequality on the symbol; per group, max).

    Returns:
      Scalar **upper bound**, resolution independent; exact for 1x1 kernels.
    """
    return _kernel_only_bound(_tap_sum_per_group, kernel, spec)


def _matricisation_per_group(splits: tuple, taps: jax.Array) -> jax.Array:
    """``sqrt(kh kw) min_split ||matricisation||_2`` of ``taps (g, p, q, o, c)`` per group."""
    kh, kw = taps.shape[1:3]
    norms = []
    for rows, cols in splits:
        t = taps.transpose([0] + ["pqoc".index(m) + 1 for m in rows + cols])
        nrow = math.prod(t.shape[1: 1 + len(rows)])
        norms.append(_two_norm(t.reshape(t.shape[0], nrow, -1)))
    return math.sqrt(kh * kw) * jnp.min(jnp.stack(norms), axis=0)


# Rows | columns of each matricisation, modes (p, q, o, c) = (kh, kw, c_out, c_in).
_SINGLA_FEIZI_SPLITS = (("op", "cq"), ("oq", "cp"), ("o", "pqc"), ("c", "pqo"))
_ALL_SPLITS = _SINGLA_FEIZI_SPLITS + (("p", "qoc"), ("q", "poc"), ("pq", "oc"))
_singla_feizi_per_group = functools.partial(_matricisation_per_group, _SINGLA_FEIZI_SPLITS)
_all_matricisations_per_group = functools.partial(_matricisation_per_group, _ALL_SPLITS)


def singla_feizi_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""Fantastic Four (Singla & Feizi 2021): ``sqrt(kh kw) min(||R1||, ||R2||, ||R3||, ||R4||)``.

    ``R1 = (c_out kh) x (c_in kw)``, ``R2 = (c_out kw) x (c_in kh)``, ``R3 = c_out x (c_in kh kw)``,
    ``R4 = c_in x (c_out kh kw)``; each factorises the symbol as ``A(w) = X(w) R Y(w)`` with
    ``||X|| ||Y|| = sqrt(kh kw)``. Norms by exact SVD. Dilation: the undilated kernel suffices
    (the symbol's sup does not depend on dilation, module doc fact 1), which is tighter than
    inserting zeros. Strides: also evaluated on the polyphase kernel, smaller value returned.
    Groups: per group, max.

    Returns:
      Scalar **upper bound**, resolution independent; exact for 1x1 kernels.
    """
    return _kernel_only_bound(_singla_feizi_per_group, kernel, spec)


def matricisation_bound(kernel: jax.typing.ArrayLike, spec: ConvSpec) -> jax.Array:
    r"""``sqrt(kh kw)`` times the min over all 7 matricisations of the 4-way kernel tensor.

    The four of :func:`singla_feizi_bound` plus ``kh x (kw c_out c_in)``,
    ``kw x (kh c_out c_in)`` and ``(kh kw) x (c_out c_in)``. Every matricisation's 2-norm bounds
    the *complex* tensor spectral norm ``||K||_σ,C``, so this is a certified upper estimate of
    the tensor-norm bound ``sqrt(kh kw) ||K||_σ,C`` of :func:`tensor_norm_bound`.

    Returns:
      Scalar **upper bound**, resolution independent; ``<= singla_feizi_bound``.
    """
    return _kernel_only_bound(_all_matricisations_per_group, kernel, spec)


UPPER_BOUNDS: dict[str, Callable[[jax.Array, ConvSpec], jax.Array]] = {
    "symbol_grid": symbol_grid_bound,
    "gram_iteration": gram_iteration_bound,
    "tensor_norm": tensor_norm_bound,
    "symbol_sup": symbol_sup_bound,
    "araujo_lipbound": araujo_lipbound,
    "matricisation": matricisation_bound,
    "singla_feizi": singla_feizi_bound,
    "tap_sum": tap_sum_bound,
    "l1_matrix": l1_matrix_bound,
    "l1_schur": l1_schur_bound,
    "frobenius": frobenius_bound,
    "frobenius_kernel": frobenius_kernel_bound,
}
"""Every certified upper bound, ``name -> f(kernel, spec)`` with default parameters.

``symbol_grid``, ``gram_iteration`` and ``tensor_norm`` are certified for ``spec`` (they use its
input size and padding); all others hold for every input size (with ``spec``'s strides,
dilation and groups).
"""

#: The bounds that depend on the input size and padding of ``spec``.
SPEC_DEPENDENT_BOUNDS = ("symbol_grid", "gram_iteration", "tensor_norm")
