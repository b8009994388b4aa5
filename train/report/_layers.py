"""Per-layer analysis: exact σ_max, certified bounds, Frobenius norm, spectra, for many layers.

Two backends compute the same numbers (``analyse_convs(backend=...)``):

* ``'numpy'`` (default): NumPy / SciPy on the host, float64, no compilation
  (:mod:`spectra.numpy`): Lanczos on the Gram matrix (a kernel and its BatchNorm-folded
  variant in lockstep), matvecs by im2col matmuls; bounds and circular spectra per frequency
  with LAPACK. Grouped and depthwise convs are handled per group (block-diagonal operator):
  dense SVD of each group's block, or Lanczos on each group that its certified bound does not
  rule out. Measured on a shared 2-core CPU:
  ResNet-20 @32² (SAME) layers 3.1 s instead of 25.5 s cold (every distinct layer shape cost
  the JAX backend several compiled programs).
* ``'jax'``: layers with the same kernel shape and :class:`spectra.ConvSpec` are stacked and
  analysed by one compiled program (``jax.vmap`` over the stack): a ResNet with 19 convs
  compiles 6 programs; Lanczos layers by :func:`spectra.lanczos_spectral_norm`, one program per
  shape. Its arithmetic runs on the default JAX device: worth it when compilation is amortised
  (many same-shaped layers) or the layers are very large and an accelerator is present.

Per layer (``A`` the operator at the layer's real input size and padding):

* ``sigma_max``: exact by construction for ``'fft'`` (per-frequency SVD, circular padding with
  strides dividing the input), ``'dense'`` (SVD of the dense operator, per group for the
  ``'numpy'`` backend, small layers), ``'matrix'`` (layers in which no input pixel is read
  twice, e.g. 1x1 convs: SVD of the kernel's blocks, ``spectra.numpy.singular_values(...,
  'matrix')``; ``backend='numpy'`` only). Otherwise matrix-free restarted Lanczos, whose value
  is a Ritz value (a lower bound): labelled ``'lanczos'`` (exact to ``bracket_rtol``) only when
  the certified bracket ``[sigma_max, upper_bound]`` closes within ``bracket_rtol``, else
  ``'lanczos_estimate'``; ``sigma_max_bracket`` holds the bracket, ``sigma_max_residual`` the
  Ritz pair's relative residual.
* ``upper_bound``: the smallest of several certified bounds (``upper_bound_name`` says which;
  ``'per_group'``: the largest over the groups of each group's smallest bound); for ``'fft'``
  layers it is the exact value (``'symbol_grid'``, exact for those layers).
  ``sigma_max_certified`` is true for exact methods and closed brackets.
* ``frobenius``: ``||A||_F`` exactly (:func:`spectra.frobenius_norm_squared`, closed form).
* ``reshaped_sigma_max``: σ_max of the kernel reshaped to ``(kh kw c_in/g, c_out)``: what Miyato
  et al.'s and Flax's ``SpectralNorm`` normalise; not the layer's operator norm.

Length: both backends' plans, the host's per-kernel jobs (one pool over all groups, a conv and
its folded kernel in one job) and the one collection into report rows share the plan tuples and
the result layout; split, each half would re-state them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import spectra
import spectra.numpy as snp
from spectra import ConvSpec
from spectra.numpy._fourier import _axis_reads
from spectra.numpy._operator import axis_geometry
from train.report._types import LayerReport

#: Methods whose σ_max is exact by construction (to rounding): used as certified values in the
#: composition (a ``'lanczos'`` value, exact to ``bracket_rtol``, enters by its upper bound).
EXACT_METHODS = ("fft", "dense", "matrix")
#: The label of a Lanczos σ_max whose certified bracket did not close within ``bracket_rtol``.
ESTIMATE_METHOD = "lanczos_estimate"
#: The per-layer backends of :func:`analyse_convs`.
BACKENDS = ("numpy", "jax")
#: Bounds of the ``'numpy'`` backend, on every non-FFT layer (``symbol_grid`` skipped for 1x1
#: kernels, where ``tap_sum`` is exact): the same bounds as ``spectra``'s of these names.
HOST_BOUNDS = ("tap_sum", "symbol_grid")
#: The ``'numpy'`` backend's extra bound column for grouped layers: the largest over the groups
#: of each group's smallest bound (at most the smallest of the layer-wide bounds).
PER_GROUP_BOUND = "per_group"
#: Zero-padded layers whose input and output dims are both at most this are done densely.
DEFAULT_MAX_DENSE_DIM = 512
#: Most complex entries a per-frequency computation (circulant embedding, spectral density)
#: may hold; above it that bound / spectrum is skipped.
MAX_FREQUENCY_ENTRIES = 16_000_000
#: ``'numpy'`` backend: the Yi approximation of a Lanczos layer's spectrum (for the plot only) is
#: skipped above this many flops (``spectral_density_cost``; ~0.5 s at the ~10 Gflop/s measured):
#: its cost grows with c_out·c_in² per sample; measured 26 s (SVD) for YOLOv8n's 128 -> 256,
#: stride-2 layer at 20x20, which is then drawn without a spectrum.
MAX_SPECTRUM_FLOPS = 5e9
#: Most points of a spectrum kept for the plot (evenly spaced in rank).
MAX_SPECTRUM_POINTS = 1024
#: Bounds tried on every non-FFT layer: ``tap_sum`` (exact for 1x1 kernels, cheap), then
#: ``symbol_grid`` (the exact norm of the circulant embedding: the tightest in practice) when
#: affordable, else ``symbol_sup`` (resolution independent). Measured: the others
#: (``matricisation``, ``gram_iteration``, ...) add ~1-3 s of compilation per layer shape and
#: were never the tightest on ResNet layers.
KERNEL_BOUNDS = ("tap_sum",)
#: Lanczos Krylov dimension per cycle: 32-64 steps were 2-3x faster than the library default
#: (128 at >4k dims) for ResNet layers at 32x32 (restarts are cheap, reorthogonalisation is not).
LANCZOS_STEPS = 48
#: Relative residual ``||AᵀA v − σ² v|| / σ²`` at which the ``'numpy'`` backend's Lanczos stops
#: for float32 kernels (issue 13: "≤ 1e-4 relative"). The Ritz value's own error is far smaller
#: (measured: 4e-7 on an 80x80, 32-channel layer at residual 7e-5; it is quadratic in the
#: residual when the top eigenvalue is separated).
LANCZOS_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One conv layer to analyse.

    Attributes:
      name: the params path.
      kernel: HWIO kernel ``(kh, kw, c_in // groups, c_out)``.
      spec: the layer's operator.
      bn_scale: ``(c_out,)`` per-channel scale of an eval-mode BatchNorm (or any per-channel
        scaling) applied right after the conv, or ``None``.
    """

    name: str
    kernel: np.ndarray
    spec: ConvSpec
    bn_scale: np.ndarray | None = None


fft_applies = snp.fft_applies


def plan(
    spec: ConvSpec, kshape: Sequence[int], max_dense_dim: int
) -> tuple[str, tuple, str | None]:
    """``(sigma_method, bound_names, spectrum_method)`` for a layer (static choices)."""
    if fft_applies(spec):
        return "fft", (), "fft"
    cheap_frequencies = snp.frequency_entries(spec, kshape) <= MAX_FREQUENCY_ENTRIES
    bounds = KERNEL_BOUNDS + (("symbol_grid",) if cheap_frequencies else ("symbol_sup",))
    if max(spec.in_dim(kshape), spec.out_dim(kshape)) <= max_dense_dim:
        return "dense", bounds, "dense"
    return "lanczos", bounds, ("spectral_density" if cheap_frequencies else None)


def plan_numpy(
    spec: ConvSpec, kshape: Sequence[int], max_dense_dim: int
) -> tuple[str, tuple, str | None]:
    """:func:`plan` of the ``'numpy'`` backend: ``'fft'``, ``'dense'`` (per group: each group's
    block at most ``max_dense_dim`` on a side and all of them at most the flops of one
    ``max_dense_dim``-sided SVD), ``'matrix'`` (windows that never share an input pixel) or
    ``'lanczos'``; both host bounds (no size limit: the per-frequency matrices are computed in
    chunks), and for grouped layers the per-group combination of them."""
    if fft_applies(spec):
        return "fft", (), "fft"
    bounds = ("tap_sum",) if tuple(kshape[:2]) == (1, 1) else HOST_BOUNDS
    if spec.feature_group_count > 1:
        bounds = bounds + (PER_GROUP_BOUND,)
    side, flops = snp.dense_cost(spec, kshape)
    if side <= max_dense_dim and flops <= float(max_dense_dim) ** 3:
        return "dense", bounds, "dense"
    if snp.disjoint_windows(spec, kshape):
        return "matrix", bounds, "matrix"
    cheap = snp.spectral_density_cost(spec, kshape) <= MAX_SPECTRUM_FLOPS
    return "lanczos", bounds, ("spectral_density" if cheap else None)


#: Threads over the per-kernel jobs (all groups' in one pool, longest first) of the ``'numpy'``
#: backend. NumPy / LAPACK / FFT release the GIL, so on 2 cores two kernels progress at once
#: (each with single-threaded BLAS, see ``network_report(blas_threads=...)``). Measured (2-core
#: CPU, ResNet-20 @32², lower bound not overlapped): the layers stage 2.8 s with one
#: thread, 2.0 s with two.
HOST_THREADS = 2


def _host_bounds(k, spec, bound_names, with_vector, top=None) -> tuple[dict, np.ndarray, object]:
    """``({name: layer bound}, (g,) per-group best bound, warm start or None)`` on the host.

    The circulant bound is computed first; the tap-sum bound then skips the SVDs of its taps
    in the groups where it is shown to exceed the circulant one (``snp.tap_sum_bound(...,
    floor=...)``: a looser, still certified, value there, never the smaller), so the best
    bound per group and of the layer are the same as with every tap's SVD. ``top``: the
    kernel's :func:`spectra.numpy.circulant_top` when already computed."""
    per_group, start = {}, None
    if "symbol_grid" in bound_names:
        if top is None:
            top = snp.circulant_top(k, spec, with_vector=with_vector)
        per_group["symbol_grid"], start = top.group_bounds, top.vector
    if "tap_sum" in bound_names:
        per_group["tap_sum"] = snp.tap_sum_bound(
            k, spec, per_group=True, floor=per_group.get("symbol_grid")
        )
    bounds = {name: float(np.max(per_group[name])) for name in bound_names if name in per_group}
    group_best = np.min(np.stack(list(per_group.values())), axis=0) if per_group else None
    if PER_GROUP_BOUND in bound_names:
        bounds[PER_GROUP_BOUND] = float(np.max(group_best))
    return bounds, group_best, start


def _with_vector(spec, sigma_method) -> bool:
    """Whether the Lanczos of a layer starts from its (layer-wide) circulant top."""
    return sigma_method == "lanczos" and spec.feature_group_count == 1


@dataclasses.dataclass(frozen=True)
class _Folded:
    """A BatchNorm-folded kernel ``kernel * scale`` (float64, the exact products), computed by
    the job that needs it (:func:`_float64`): all of a network's folded kernels at once cost
    their memory together (WideResNet-50-2: 550 MB of fresh pages before any job started)."""

    kernel: np.ndarray
    scale: np.ndarray

    def __call__(self) -> np.ndarray:
        return np.asarray(self.kernel, np.float64) * np.asarray(self.scale, np.float64)


def _float64(k) -> np.ndarray:
    """A job's kernel as float64 NumPy, once (the functions it calls then use it as is)."""
    return k() if isinstance(k, _Folded) else np.asarray(k, np.float64)


def _analyse_pair_numpy(
    k, folded, scale, spec, sigma_method, bound_names, spectrum_method, rtol, bracket_rtol
) -> tuple[tuple, tuple]:
    """:func:`_analyse_kernel_numpy` of a kernel and of ``folded`` (``k`` times the per-output
    -channel ``scale``, float64; a :class:`_Folded`), their circulant bounds in one pass
    (:func:`spectra.numpy.circulant_tops`: each frequency's Gram computed once for both)."""
    args = (spec, sigma_method, bound_names, spectrum_method, rtol, bracket_rtol)
    k = _float64(k)
    with_vector = _with_vector(spec, sigma_method)
    tops = snp.circulant_tops(k, spec, [scale], with_vector=with_vector)
    if not with_vector:  # Not an ungrouped Lanczos layer: each kernel on its own.
        return (
            _analyse_kernel_numpy(k, True, *args, top=tops[0]),
            _analyse_kernel_numpy(folded, False, *args, top=tops[1]),
        )
    # Ungrouped Lanczos: both runs in lockstep, one read of the kernel per product for the two
    # (snp.lanczos_spectral_norms; the folded operator is diag(scale) A).
    folded = _float64(folded)
    prepared = [_host_bounds(x, spec, bound_names, True, top) for x, top in zip((k, folded), tops)]
    results = snp.lanczos_spectral_norms(
        k,
        spec,
        [scale],
        rtol=rtol,
        initial_vectors=[start for _, _, start in prepared],
        upper_bounds=[None if best is None else float(np.max(best)) for _, best, _ in prepared],
        bracket_rtol=min(bracket_rtol, rtol),
    )
    spectrum = None
    if spectrum_method == "spectral_density":
        spectrum = snp.spectral_density_singular_values(k, spec)
    return tuple(
        (float(r.value), r.residual, spectrum if i == 0 else None,
         [bounds[name] for name in bound_names])
        for i, (r, (bounds, _, _)) in enumerate(zip(results, prepared))
    )


def _analyse_kernel_numpy(
    k, with_spectrum, spec, sigma_method, bound_names, spectrum_method, rtol, bracket_rtol, top=None
) -> tuple[float, float | None, object, list[float]]:
    """``(sigma, residual or None, spectrum or None, bounds)`` of one kernel on the host
    (``top``: its circulant top when already computed)."""
    k = _float64(k)
    grouped = spec.feature_group_count > 1
    if sigma_method == "matrix" and tuple(bound_names) == ("tap_sum",):
        # Ungrouped 1x1 kernel: the 'matrix' spectrum is the kernel's SVD (its values repeated)
        # when some output reads real input; its top is then the tap-sum bound: one SVD.
        if not with_spectrum:  # σ_max only (e.g. the BatchNorm-folded kernel): no full SVD.
            sigma = _one_by_one_sigma_max(k, spec)
            return sigma, None, None, [sigma if sigma > 0 else snp.tap_sum_bound(k, spec)]
        values = snp.singular_values(k, spec, "matrix")
        tap_sum = float(values[0]) if values[0] > 0 else snp.tap_sum_bound(k, spec)
        return float(values[0]), None, values, [tap_sum]
    bounds, group_best, start = _host_bounds(
        k, spec, bound_names, _with_vector(spec, sigma_method), top
    )
    spectrum, residual = None, None
    if sigma_method == "fft":
        if with_spectrum:
            spectrum = snp.singular_values(k, spec, "fft")
            sigma = spectrum[0]
        else:  # Exact for these specs, and cheaper than the whole spectrum.
            sigma = snp.symbol_grid_bound(k, spec)
    elif sigma_method in ("dense", "matrix"):
        values = snp.singular_values(k, spec, sigma_method)
        sigma, spectrum = values[0], values
    else:
        result = snp.lanczos_spectral_norm(
            k,
            spec,
            rtol=rtol,
            initial_vector=start,
            circulant_start=grouped and "symbol_grid" in bound_names,
            group_upper_bounds=group_best,
            bracket_rtol=min(bracket_rtol, rtol),
        )
        sigma, residual = result.value, result.residual
        if with_spectrum and spectrum_method == "spectral_density":
            spectrum = snp.spectral_density_singular_values(k, spec)
    return float(sigma), residual, spectrum, [bounds[name] for name in bound_names]


def _one_by_one_sigma_max(k, spec: ConvSpec) -> float:
    """σ_max of an ungrouped 1x1 layer, exactly (to rounding): every output pixel that reads a
    real input pixel applies the kernel matrix ``K`` ``(c_in, c_out)`` to it, no pixel is read
    twice, so the operator is ``K`` repeated on disjoint blocks: ``||K||_2``
    (:func:`reshaped_sigma_max`, the smaller Gram's top eigenvalue, about 3x faster than the
    SVD) when some output reads real input on both axes, else 0 (the 'matrix' spectrum's top)."""
    if not spec.is_circular and any(
        not np.any(_axis_reads(*geometry) >= 0) for geometry in axis_geometry(spec, np.shape(k))
    ):
        return 0.0
    return reshaped_sigma_max(k)


def uniform_scale(scale) -> float | None:
    """``|c|`` when every entry of a per-channel scale has the same magnitude ``|c|``, else None.

    Then the conv followed by the scaling is ``c D A`` with ``D`` diagonal ``±1`` (orthogonal):
    its singular values are exactly ``|c|`` times ``A``'s, and so are the certified bounds
    (positively homogeneous). E.g. a randomly initialised BatchNorm in eval mode.
    """
    if scale is None:
        return None
    a = np.abs(np.asarray(scale, np.float64)).reshape(-1)
    return float(a[0]) if a.size and np.all(a == a[0]) else None


def _run_jobs(jobs: Sequence, on_last_started=None) -> list:
    """The results of ``jobs`` (callables), in order, :data:`HOST_THREADS` at a time in the given
    order (put the longest first: the last job started then ends soonest).
    ``on_last_started()`` is called when the last job starts."""

    def run(j):
        if j == len(jobs) - 1 and on_last_started is not None:
            on_last_started()
        return jobs[j]()

    if HOST_THREADS > 1 and len(jobs) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(HOST_THREADS, len(jobs))) as pool:
            return list(pool.map(run, range(len(jobs))))
    return [run(j) for j in range(len(jobs))]


def job_cost(spec: ConvSpec, kshape: Sequence[int], sigma_method: str) -> float:
    """A rough flop count of one kernel's host analysis, only to order the jobs (longest first):
    the circulant bound's per-frequency Grams, or the dense / per-window SVDs."""
    if sigma_method == "dense":
        return snp.dense_cost(spec, kshape)[1]
    g = spec.feature_group_count
    cig, cog = kshape[2], kshape[3] // g
    if sigma_method == "matrix":
        return float(math.prod(kshape)) * min(cig, cog)
    emb = spectra.exact_circular_spec(spec, kshape)
    cols = cig * math.prod(emb.strides)
    return float(snp.frequency_entries(spec, kshape)) * min(cols, cog)


def _numpy_group_jobs(
    kernels,
    folded,
    spec,
    sigma_method,
    bound_names,
    spectrum_method,
    rtol,
    bracket_rtol,
    scales=None,
):
    """``([(cost, job)], finish)``: the jobs (one per kernel to analyse, each a callable) of a
    group on the host, and ``finish(results)`` -> the group's dict (see :func:`_analyse_group`).

    Lanczos starts from a random vector plus the top of the circulant embedding (computed for
    the ``symbol_grid`` bound anyway; per group for grouped layers), windowed by the lowest sine
    mode: measured 3x fewer products than a random start on an 80x80, 32-channel layer.

    ``scales``: the per-channel scale of each layer (folded into ``folded``), or ``None``. A
    folded layer whose scale has a uniform magnitude ``|c|`` (:func:`uniform_scale`) is not
    analysed again: its σ_max and bounds are ``|c|`` times the layer's (exact, see there).
    """
    n = len(kernels)
    factors = [None] * n
    if folded is not None and scales is not None:
        factors = [uniform_scale(s) for s in scales]
    todo = [j for j in range(n) if folded is not None and factors[j] is None]
    both = list(kernels) + [folded[j] for j in todo]
    args = (spec, sigma_method, bound_names, spectrum_method, rtol, bracket_rtol)
    cost = job_cost(spec, np.shape(kernels[0]), sigma_method) if n else 0.0
    # A layer and its folded kernel in one job when their circulant bounds share a pass.
    paired = set(todo) if "symbol_grid" in bound_names and scales is not None else set()
    jobs = [
        (
            2 * cost,
            functools.partial(_analyse_pair_numpy, kernels[j], folded[j], scales[j], *args),
        )
        if j in paired
        else (cost, functools.partial(_analyse_kernel_numpy, both[j], j < n, *args))
        for j in range(n)
    ]
    jobs += [
        (cost, functools.partial(_analyse_kernel_numpy, folded[j], False, *args))
        for j in todo
        if j not in paired
    ]

    def finish(results):
        pairs = iter(results[n:])
        results = [r if j not in paired else r[0] for j, r in enumerate(results[:n])] + [
            results[j][1] if j in paired else next(pairs) for j in todo
        ]
        if folded is not None:  # The folded layers in order: computed, or scaled from the layer's.
            computed = dict(zip(todo, results[n:]))
            results = results[:n] + [
                computed[j]
                if factors[j] is None
                else (
                    factors[j] * results[j][0],
                    results[j][1],
                    None,
                    # Rounded up: |c| b in floating point may round below the real product.
                    [float(np.nextafter(factors[j] * b, np.inf)) for b in results[j][3]],
                )
                for j in range(n)
            ]
        out: dict = {
            "sigma": [r[0] for r in results],
            "residual": [r[1] for r in results if r[1] is not None],
            "spectrum": [r[2] for r in results[:n]] if spectrum_method is not None else [],
        }
        out["bounds"] = np.array([r[3] for r in results], np.float64).reshape(
            len(results), len(bound_names)
        )
        out["frobenius_sq"] = np.array([snp.frobenius_norm(k, spec) ** 2 for k in kernels])
        return out

    return jobs, finish


def _after(previous, x):
    """``x``, computed after ``previous``: XLA:CPU can deadlock when several batched LAPACK calls
    run concurrently (see ``train.avoid_cpu_lapack_deadlock``), so the stages are chained."""
    return jax.lax.optimization_barrier((previous, x))[1]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _analyse_group(kernels, folded, spec, sigma_method, bound_names, spectrum_method, rtol):
    """One compiled program for a stack of same-shaped layers (and their BN-folded kernels).

    Returns a dict of stacked arrays: ``sigma``, ``residual``, ``bounds`` (``(n, num_bounds)``)
    for ``concat([kernels, folded])``; ``frobenius_sq``, ``spectrum`` for ``kernels``.
    """
    both = jnp.concatenate([kernels, folded]) if folded is not None else kernels

    out = {}
    if sigma_method == "lanczos":
        # Done per kernel outside this program (vmap turns the convs of the Lanczos matvecs
        # into one grouped conv, measured 2-3x slower on CPU than a loop over the stack).
        previous = both
    else:
        out["sigma"] = jax.vmap(lambda k: spectra.spectral_norm(k, spec, sigma_method))(both)
        previous = out["sigma"]
    bounds = []
    for name in bound_names:
        b = jax.vmap(lambda k, f=spectra.UPPER_BOUNDS[name]: f(k, spec))(_after(previous, both))
        bounds.append(b)
        previous = b
    out["bounds"] = jnp.stack(bounds, axis=1) if bounds else jnp.zeros((both.shape[0], 0))
    k = _after(previous, kernels)
    out["frobenius_sq"] = jax.vmap(lambda k: spectra.frobenius_norm_squared(k, spec))(k)
    if spectrum_method is not None:
        out["spectrum"] = jax.vmap(lambda k: spectra.singular_values(k, spec, spectrum_method))(
            _after(out["frobenius_sq"], k)
        )
    return out


def reshaped_sigma_max(kernel: np.ndarray) -> float:
    """σ_max of the HWIO kernel reshaped to ``(kh kw c_in/g, c_out)`` (Miyato et al. 2018; Flax
    ``SpectralNorm``): exact for that matrix (float64, to rounding), not the layer's norm.

    The square root of the top eigenvalue of the smaller Gram matrix (LAPACK ``eigvalsh``):
    measured 3x faster than the SVD of a ``9216 x 1024`` matrix (WideResNet-50-2's last 3x3)."""
    m = np.asarray(kernel, np.float64).reshape(-1, np.shape(kernel)[-1])
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))


def _subsample(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = values.shape[0]
    if n <= MAX_SPECTRUM_POINTS:
        idx = np.arange(n)
    else:
        idx = np.unique(np.linspace(0, n - 1, MAX_SPECTRUM_POINTS).round().astype(int))
    return values[idx], idx + 1


def _analyse_group_jax(
    raw, scaled, spec, kshape, dtype, sigma_method, bound_names, spectrum_method, rtol
) -> dict:
    """The ``'jax'`` backend's analysis of one group of same-shaped layers (``scaled``: the
    BatchNorm-folded kernels or ``None``): one vmapped program, then Lanczos per kernel."""
    kernels = jnp.asarray(np.stack(raw), dtype)
    folded = None if scaled is None else jnp.asarray(np.stack(scaled), dtype)
    out = jax.device_get(
        _analyse_group(kernels, folded, spec, sigma_method, bound_names, spectrum_method, rtol)
    )
    if sigma_method == "lanczos":
        stack = np.asarray(kernels if folded is None else np.concatenate([kernels, folded]))
        # NumPy start vector: jax.random would compile a program per input size.
        v0 = np.random.default_rng(0).standard_normal(spec.in_dim(kshape)).astype(dtype)
        estimates = [
            spectra.lanczos_spectral_norm(
                k,
                spec,
                num_steps=min(LANCZOS_STEPS, spec.in_dim(kshape)),
                rtol=rtol,
                initial_vector=v0,
            )
            for k in stack
        ]
        out["sigma"] = np.array([float(e.value) for e in estimates])
        out["residual"] = np.array([float(e.residual) for e in estimates])
    return out


def analyse_convs(
    layers: Sequence[ConvLayer],
    *,
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
    rtol: float | None = None,
    bracket_rtol: float = 1e-4,
    compute_spectra: bool = True,
    progress: bool = False,
    backend: str = "numpy",
    on_last_started=None,
) -> list[LayerReport]:
    """Analyses every layer (grouped by kernel shape and spec).

    Args:
      layers: the layers.
      max_dense_dim: zero-padded layers with ``max(in_dim, out_dim)`` at most this are done by
        dense SVD (exact full spectrum, σ_min); larger ones by Lanczos.
      rtol: Lanczos relative residual tolerance (default: ``'numpy'`` backend
        :data:`LANCZOS_RTOL` for float32 kernels, ``1e-10`` for float64 ones; ``'jax'``: that of
        :func:`spectra.lanczos_spectral_norm`, ``1e-5`` / ``1e-10``).
      bracket_rtol: (``'numpy'`` backend) Lanczos also stops, whatever its residual, once the
        best certified bound is within ``min(bracket_rtol, rtol)`` of its Ritz value (the exact
        σ_max is then known to that relative accuracy). A Lanczos σ_max is labelled
        ``'lanczos'`` and ``sigma_max_certified`` when the best certified bound is within this
        relative distance, else ``'lanczos_estimate'``.
      compute_spectra: compute the spectra for the plots.
      progress: show a tqdm bar over the layers.
      backend: ``'numpy'`` (host, float64, no compilation: the fast choice for a one-off report
        on CPU, and on a GPU machine too unless the layers are huge) or ``'jax'`` (compiled
        programs on the default device, in the kernels' dtype); see the module doc. Every
        float64 result is rounded up (down, for the bracket's lower end) by its
        ``rounding_rtol`` (:func:`spectra.numpy.rounding_rtol`); ``'jax'`` results computed in
        float32 carry ``rounding_rtol=0``: exact only up to float32 rounding (~1e-6), which
        the worst-case analysis would bound only loosely (use the default backend for
        certified numbers).
      on_last_started: (``'numpy'`` backend) called when the last of the per-kernel jobs starts
        (they run longest first), e.g. to end work running beside this stage.

    Returns:
      One :class:`LayerReport` per layer, in the order of ``layers``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; expected one of {BACKENDS}")
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        key = (
            tuple(layer.kernel.shape),
            np.dtype(layer.kernel.dtype),
            layer.spec,
            layer.bn_scale is not None,
        )
        groups.setdefault(key, []).append(i)
    results: list[LayerReport | None] = [None] * len(layers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc="layers", unit="layer")
    planned = []
    for (kshape, dtype, spec, has_bn), members in groups.items():
        planner = plan_numpy if backend == "numpy" else plan
        sigma_method, bound_names, spectrum_method = planner(spec, kshape, max_dense_dim)
        if not compute_spectra and sigma_method != "fft":
            spectrum_method = None
        planned.append(
            (kshape, dtype, spec, has_bn, members, (sigma_method, bound_names, spectrum_method))
        )
    if backend == "numpy":
        # Every group's jobs in one pool, the longest first (by job_cost): the threads stay busy
        # to the end instead of waiting for each group's last kernel.
        finishers, jobs = [], []
        for _, dtype, spec, has_bn, members, methods in planned:
            raw = [layers[i].kernel for i in members]
            scaled = None  # The BatchNorm-folded kernels (float64: the exact products).
            if has_bn:
                scaled = [_Folded(layers[i].kernel, layers[i].bn_scale) for i in members]
            tol = rtol if rtol is not None else (1e-10 if dtype == np.float64 else LANCZOS_RTOL)
            group_jobs, finish = _numpy_group_jobs(
                raw,
                scaled,
                spec,
                *methods,
                tol,
                bracket_rtol,
                [layers[i].bn_scale for i in members] if has_bn else None,
            )
            start = len(jobs)
            jobs.extend(group_jobs)
            finishers.append((finish, start, len(jobs)))
        order = sorted(range(len(jobs)), key=lambda j: -jobs[j][0])
        done = _run_jobs([jobs[j][1] for j in order], on_last_started)
        values = [None] * len(jobs)
        for j, value in zip(order, done):
            values[j] = value
        for (finish, a, b), (_, _, spec, has_bn, members, methods) in zip(finishers, planned):
            out = finish(values[a:b])
            _collect(results, layers, members, spec, has_bn, bracket_rtol, out, methods, np.float64)
            if bar is not None:
                bar.update(len(members))
    else:
        for kshape, dtype, spec, has_bn, members, methods in planned:
            raw = [layers[i].kernel for i in members]
            scaled = None
            if has_bn:
                scaled = [layers[i].kernel * np.asarray(layers[i].bn_scale) for i in members]
            out = _analyse_group_jax(raw, scaled, spec, kshape, dtype, *methods, rtol)
            # Float32 programs: no allowance (the worst-case analysis in float32 is loose by
            # orders of magnitude); their values are exact only up to float32 rounding.
            rounding = dtype if np.dtype(dtype) == np.float64 else None
            _collect(results, layers, members, spec, has_bn, bracket_rtol, out, methods, rounding)
            if bar is not None:
                bar.update(len(members))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _collect(results, layers, members, spec, has_bn, bracket_rtol, out, methods, dtype) -> None:
    """The groups' :class:`LayerReport` rows; ``dtype``: that of the arithmetic that computed
    ``out`` (its rounding allowance, :func:`spectra.numpy.rounding_rtol`; ``None``: none)."""
    n = len(members)
    sigma_method, bound_names, _ = methods
    kshape = np.shape(layers[members[0]].kernel)
    rho = 0.0
    if dtype is not None:  # A folded kernel's entries are rounded products (has_bn).
        methods_used = (sigma_method, *bound_names)
        rho = snp.rounding_rtol(kshape, spec, methods_used, dtype, rounded_kernel=has_bn)
    for j, i in enumerate(members):
        results[i] = _layer_report(
            layers[i], spec, *methods, out, j, (n + j) if has_bn else None, bracket_rtol, rho
        )


def _best_bound(sigma: float, bounds: np.ndarray, names: tuple, sigma_method: str, rho: float):
    """``(bound, name)``: the smallest bound (or, for ``'fft'`` layers, the exact σ), rounded up
    by the layer's rounding allowance ``rho`` (:func:`spectra.numpy.round_up`)."""
    if sigma_method == "fft" or not names:
        # The per-frequency SVD is the exact circular norm: Sedghi's bound is exact here.
        return snp.round_up(sigma, rho), "symbol_grid"
    best = int(np.argmin(bounds))
    upper = float(bounds[best])
    if sigma_method != "lanczos":  # Exact σ: never report a bound below it.
        upper = max(upper, sigma)
    return snp.round_up(upper, rho), names[best]


def _layer_report(
    layer, spec, sigma_method, bound_names, spectrum_method, out, j, jf, bracket_rtol, rho
) -> LayerReport:
    kshape = tuple(layer.kernel.shape)
    sigma = float(out["sigma"][j])
    residual = float(out["residual"][j]) if sigma_method == "lanczos" else None
    upper, upper_name = _best_bound(sigma, out["bounds"][j], bound_names, sigma_method, rho)
    certified = sigma_method != "lanczos" or upper <= sigma * (1 + bracket_rtol)
    # A certified bracket on the exact σ_max, widened by the rounding allowance: [σ, σ] for
    # exact methods, [Ritz value (a lower bound), bound] for Lanczos.
    bracket = (
        snp.round_down(sigma, rho),
        upper if sigma_method == "lanczos" else snp.round_up(sigma, rho),
    )
    method = sigma_method if certified else ESTIMATE_METHOD
    frob = math.sqrt(max(float(out["frobenius_sq"][j]), 0.0))
    spectrum = ranks = None
    sigma_min = sigma_min_method = None
    if spectrum_method is not None:
        full = np.asarray(out["spectrum"][j], np.float64)
        if spectrum_method in EXACT_METHODS:
            sigma_min, sigma_min_method = float(full[-1]), spectrum_method
        spectrum, ranks = _subsample(full)
    one_by_one = kshape[:2] == (1, 1) and spec.feature_group_count == 1
    if sigma_method == "matrix" and one_by_one and sigma > 0:
        reshaped = sigma  # The 1x1 kernel's own SVD (the 'matrix' spectrum's top, see there).
    else:
        reshaped = reshaped_sigma_max(layer.kernel)
    bn_sigma = bn_upper = None
    if jf is not None:
        bn_sigma = float(out["sigma"][jf])
        bn_upper, _ = _best_bound(bn_sigma, out["bounds"][jf], bound_names, sigma_method, rho)
    return LayerReport(
        name=layer.name,
        op="conv",
        kernel_shape=kshape,
        input_shape=spec.input_shape,
        strides=spec.strides,
        padding=spec.padding,
        dilation=spec.kernel_dilation,
        groups=spec.feature_group_count,
        sigma_max=sigma,
        sigma_max_method=method,
        sigma_max_residual=residual,
        sigma_max_certified=bool(certified),
        sigma_max_bracket=bracket,
        sigma_max_tolerance=bracket_rtol if sigma_method == "lanczos" else None,
        upper_bound=float(upper),
        upper_bound_name=upper_name,
        reshaped_sigma_max=reshaped,
        frobenius=frob,
        stable_rank=frob**2 / sigma**2 if sigma > 0 else 0.0,
        sigma_min=sigma_min,
        sigma_min_method=sigma_min_method,
        bn_folded_sigma_max=bn_sigma,
        bn_folded_upper_bound=bn_upper,
        spectrum_method=spectrum_method,
        num_singular_values=spec.num_singular_values(kshape),
        spectrum=spectrum,
        spectrum_ranks=ranks,
        rounding_rtol=rho,
    )


def analyse_dense(name: str, weight: np.ndarray) -> LayerReport:
    """A dense layer ``x @ W`` (``W`` of shape ``(in, out)``): exact SVD (NumPy, float64)."""
    w = np.asarray(weight, np.float64)
    sv = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
    sigma = float(sv[0])
    rho = snp.matrix_rtol(*w.reshape(w.shape[0], -1).shape)
    frob = float(np.sqrt(np.sum(sv**2)))
    spectrum, ranks = _subsample(sv)
    return LayerReport(
        name=name,
        op="dense",
        kernel_shape=tuple(w.shape),
        input_shape=None,
        strides=None,
        padding=None,
        dilation=None,
        groups=None,
        sigma_max=sigma,
        sigma_max_method="dense",
        sigma_max_residual=None,
        sigma_max_certified=True,
        sigma_max_bracket=(snp.round_down(sigma, rho), snp.round_up(sigma, rho)),
        upper_bound=snp.round_up(sigma, rho),
        upper_bound_name="dense",
        reshaped_sigma_max=sigma,
        frobenius=frob,
        stable_rank=frob**2 / sigma**2 if sigma > 0 else 0.0,
        sigma_min=float(sv[-1]),
        sigma_min_method="dense",
        spectrum_method="dense",
        num_singular_values=int(sv.size),
        spectrum=spectrum,
        spectrum_ranks=ranks,
        rounding_rtol=rho,
    )
