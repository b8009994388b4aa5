"""Rounding allowances: how far a host float64 σ_max or bound may be from its exact value.

Every certified number of :mod:`spectra.numpy` is the exact value of some matrix *up to the
floating-point rounding of computing it*. For a value that enters a sound network bound, or is
compared with another implementation's exact value, that rounding must be bounded too. Each
function here returns a relative allowance ``ρ`` such that

    ``exact value <= computed value * (1 + ρ)``  (and ``>= computed * (1 - ρ)``)

from the standard error analyses, with ``u`` the unit roundoff of the computation's dtype:

1. **Products and sums** (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. (3.13)
   and Lemma 3.5): ``|fl(A B) - A B| <= γ_k |A| |B|`` elementwise, ``γ_k = k u / (1 - k u)``,
   for inner dimension ``k`` (complex arithmetic: ``γ_{2k+2}``).
2. **A top singular value from LAPACK** (SVD, or the symmetric eigensolver on the Gram; LAPACK
   Users' Guide, §4.7 and §4.9): the computed value is an exact singular value of ``M + E`` with
   ``||E||_2 <= p(n) u ||M||_2``; by Weyl's inequality ``|σ̂ - σ| <= ||E||_2``. LAPACK states
   ``p(n)`` as "a modestly growing function of n"; we take ``p(n) = n²`` (its backward error
   analyses give ``O(n)``), on the Gram ``p(n) u ||G|| = p(n) u σ²``, half of that on ``σ``.
3. **A Gram formed in floating point** (1. with ``||E||_2 <= ||E||_F``): ``||fl(M Mᴴ) - M
   Mᴴ||_2 <= γ_k || |M| |M|ᴴ ||_2 <= γ_k ||M||_F² <= γ_k n σ²`` (``n`` = the smaller side:
   ``||M||_F² <= rank σ²``). From ``t`` taps' cross-Grams (``spectra.numpy._frequencies``) the
   same with ``||M||_F`` replaced by ``Σ_t ||E_t||_F <= t sqrt(n) σ_circ``: each tap is an
   average of the per-frequency matrices, so ``||E_t||_F <= max_ω ||M(ω)||_F``.
4. **A per-frequency matrix** ``M(ω) = Σ_t φ_t E_t`` of ``t`` polyphase taps, the phases
   ``φ_t`` computed to ``8 u``: ``||M̂ - M||_2 <= (2t + 12) u Σ_t ||E_t||_F`` by 1., and
   Weyl's inequality again.
5. **The same matrices by an FFT** over a grid of ``N`` frequencies (``spectra``'s JAX
   functions): ``||ŷ - y||_2 <= log2(N) η / (1 - log2(N) η) ||y||_2`` with ``η = μ + γ_4 (√2 +
   μ)``, ``μ`` the twiddle factors' error (Higham, Thm 24.2); per frequency at most the whole
   error, ``||y||_2 = sqrt(N) ||x||_2``: ``(6 log2 N + 12) sqrt(N) u`` in place of ``(2t + 12)
   u`` in 4.

Each term is relative to the value itself (``σ``, or ``σ_circ`` for the circulant bound: the
bound is the largest per-frequency ``σ``), so the allowances are relative and data-free. They
are tiny in float64 (``1e-9`` for a 1024-channel 3x3 layer, ``1e-7`` at the very widest) and
cover every rounding of the value's computation, the final ``sqrt`` and products included; the
report rounds its bounds up by them (:func:`round_up`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

from spectra._bounds import exact_circular_spec
from spectra._spec import ConvSpec

#: The methods :func:`rounding_rtol` knows: bounds, exact σ_max methods and ``'lanczos'`` (the
#: Rayleigh quotient that is a Lanczos value: a lower bound up to this allowance).
ROUNDING_METHODS = (
    "symbol_grid",
    "symbol_sup",
    "fft",
    "tap_sum",
    "per_group",
    "matrix",
    "dense",
    "lanczos",
    "lanczos_estimate",
)


def _unit(dtype) -> float:
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    return float(np.finfo(dtype).eps) / 2


def matrix_rtol(rows: int, cols: int, dtype=np.float64) -> float:
    """Relative allowance of the top singular value of an explicit ``(rows, cols)`` matrix by
    LAPACK (SVD, or the smaller Gram's top eigenvalue formed with inner dimension ``max(rows,
    cols)``): items 2. and 3. of the module doc, plus the ``sqrt``.

    Example:
      >>> 0 < matrix_rtol(1024, 9216) < 1e-8
      True
    """
    for name, value in (("rows", rows), ("cols", cols)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    u = _unit(dtype)
    n, k = min(rows, cols), max(rows, cols)
    return _padded(u, n * n / 2 + (k + 2) * n + 4)


def _padded(u: float, terms: float) -> float:
    """``u * terms`` with 1% for the second-order terms the analyses drop, plus ``4 u`` for the
    final product ``value * (1 + ρ)``."""
    return 1.01 * u * terms + 4 * u


def _frequency_rtol(u: float, n: int, k: int, t: int, grid: int) -> float:
    """Items 2.-5. for the top σ of a per-frequency matrix (smaller side ``n``, larger ``k``,
    ``t`` polyphase taps, ``grid`` frequencies), its Gram from the taps' cross-Grams or
    directly, the matrices from the taps or by an FFT (the larger of each)."""
    fft = (6 * math.log2(max(grid, 2)) + 12) * math.sqrt(grid)  # 5.
    formation = max(2 * t + 12, fft) * t * math.sqrt(n)  # 4. / 5.: on σ directly.
    gram = (k + t * t + 4) * t * t * n  # 3. with the tap sums: γ_{2k+2t²+8} t² n σ² / (2 σ²).
    return _padded(u, formation + gram + n * n / 2 + 2)


def rounding_rtol(
    kernel_shape: Sequence[int],
    spec: ConvSpec,
    methods: Iterable[str],
    dtype=np.float64,
    *,
    rounded_kernel: bool = False,
) -> float:
    """The relative allowance of a layer's host values computed by ``methods``: the largest.

    ``exact <= computed * (1 + ρ)`` and ``exact >= computed * (1 - ρ)`` for each value, from
    the analyses of the module doc with the shapes each method works on:

    * ``'symbol_grid'`` / ``'symbol_sup'`` / ``'fft'``: per-frequency matrices ``(c_out/g,
      (c_in/g) s1 s2)`` of the circulant embedding, from ``t`` polyphase taps (items 2.-4.);
    * ``'tap_sum'``: ``Σ_t ||K_t||_2`` (or ``||K_t||_F``) over the ``kh kw`` taps ``(c_out/g,
      c_in/g)`` (items 2. and 1. for the sum); ``'per_group'``: the larger of these two;
    * ``'matrix'``: the kernel's per-pixel blocks ``(kh kw c_in/g, c_out/g)`` (:func:`matrix_rtol`);
    * ``'dense'``: each group's block of the operator (entries copied, not computed);
    * ``'lanczos'`` / ``'lanczos_estimate'``: the Rayleigh quotient ``||A v||² / ||v||²`` in
      float64 (items 1. over the ``kh kw c_in/g`` products per output and the norms).

    Args:
      kernel_shape: HWIO kernel shape.
      spec: the layer.
      methods: names from :data:`ROUNDING_METHODS`.
      dtype: the computation's dtype (``float64`` on the host).
      rounded_kernel: the kernel's entries are themselves rounded products (e.g. a BatchNorm
        scale folded in, ``fl(K s)``): adds ``u sqrt(rank)`` (``||ΔA||_2 <= ||ΔA||_F <= u
        ||A||_F <= u sqrt(rank) σ``).

    Returns:
      ``ρ`` (0 when ``methods`` is empty and the kernel is not rounded).

    Raises:
      ValueError: naming ``methods`` for an unknown method, ``dtype`` for a non-float dtype.

    Example:
      >>> from spectra import ConvSpec
      >>> rho = rounding_rtol((3, 3, 1024, 1024), ConvSpec((3, 3)), ['symbol_grid', 'tap_sum'])
      >>> 0 < rho < 1e-6
      True
    """
    kshape = tuple(int(d) for d in kernel_shape)
    u = _unit(dtype)
    g = spec.feature_group_count
    kh, kw, cig, cout = kshape
    cog = cout // g
    out = 0.0
    for method in methods:
        if method not in ROUNDING_METHODS:
            raise ValueError(f"methods must be among {ROUNDING_METHODS}; got {method!r}")
        if method in ("symbol_grid", "symbol_sup", "fft", "per_group"):
            emb = exact_circular_spec(spec, kshape)
            cols = cig * math.prod(emb.strides)
            keff = spec.dilated_kernel_size(kshape)
            t = math.prod(-(-e // s) for e, s in zip(keff, emb.strides))
            grid = math.prod(i // s for i, s in zip(emb.input_shape, emb.strides))
            out = max(out, _frequency_rtol(u, min(cog, cols), max(cog, cols), t, grid))
        if method in ("tap_sum", "per_group"):
            out = max(out, matrix_rtol(cog, cig, dtype) + _padded(u, kh * kw + cog * cig))
        if method == "matrix":
            out = max(out, matrix_rtol(kh * kw * cig, cog, dtype))
        if method == "dense":
            out = max(out, matrix_rtol(spec.in_dim(kshape) // g, spec.out_dim(kshape) // g, dtype))
        if method in ("lanczos", "lanczos_estimate"):
            out = max(out, _padded(u, kh * kw * cig + spec.in_dim(kshape) + spec.out_dim(kshape)))
    if rounded_kernel:
        out += 1.01 * u * math.sqrt(min(spec.in_dim(kshape), spec.out_dim(kshape)))
    return out


def round_up(value: float, rtol: float) -> float:
    """``value * (1 + rtol)`` rounded up (a bound made safe by its allowance; ``rtol`` includes
    the ``4 u`` of this product, see :func:`matrix_rtol`)."""
    return float(np.nextafter(float(value) * (1.0 + rtol), np.inf))


def round_down(value: float, rtol: float) -> float:
    """``value * (1 - rtol)`` rounded down (a lower bound made safe by its allowance)."""
    return float(np.nextafter(float(value) * (1.0 - rtol), -np.inf))
