"""Sedghi et al. 2019's timing comparison: the FFT method vs the SVD of the dense operator.

For circular padding, stride 1 and k x k kernels, this times

* the FFT method, ``spectra.singular_values(method='fft')`` (exact: per-frequency SVDs of the
  ``c_out x c_in`` matrices over the rfft half plane, ``O(n^2 c^2 (c + log n))``), jitted, the
  median of several calls after a warm-up; against
* the dense method, ``np.linalg.svd`` of ``spectra.dense_operator`` (exact, ``O(n^6 c^3)``),
  one call (building the matrix included),

as the channels grow at a fixed input size and as the input size grows at fixed channels, and
checks wherever the dense method runs that both sorted spectra agree to ``1e-8 * σ_max``. The
dense method runs only while its predicted time (cubic extrapolation in the matrix size from the
last dense time measured in the same sweep) stays within the preset's budget. The last rows use
an 11 x 11 kernel on a 64 x 64 input, where the dense matrix (``4096 c`` square) cannot be
handled. BLAS/LAPACK run single-threaded (``threadpoolctl``) so that both methods get the same
one core; kernels are random Gaussian (std ``1/sqrt(k^2 c)``), float64.
"""

from __future__ import annotations

import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _report
from spectra import ConvSpec
from spectra import dense_operator
from spectra import singular_values
from train.lapack_workaround import limit_blas_threads

NAME = "sedghi_timing"

#: ``channels``: the sweep at ``n_fixed`` (k=3); ``sizes``: the sweep at ``c_fixed`` channels
#: (k=3); ``large``: ``(k, n, c)`` layers where dense is not attempted; ``dense_budget``: seconds
#: a dense SVD may be predicted to take; ``repeats``: timed FFT calls (median). "test" is a tiny
#: preset for the test suite.
PRESETS = {
    "test": dict(
        n_fixed=6, channels=(1, 2, 3), c_fixed=2, sizes=(3, 4, 6), large=((5, 12, 2),),
        dense_budget=1.0, repeats=2, min_timing=0.0,
    ),
    "quick": dict(
        n_fixed=16, channels=(1, 2, 4, 8, 16, 32, 64, 128), c_fixed=4,
        sizes=(4, 8, 12, 16, 24, 32, 48, 64), large=((11, 64, 4), (11, 64, 16)),
        dense_budget=10.0, repeats=3, min_timing=0.25,
    ),
    "paper": dict(
        n_fixed=16, channels=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), c_fixed=16,
        sizes=(4, 8, 12, 16, 24, 32, 48, 64), large=((11, 64, 4), (11, 64, 16), (11, 64, 64)),
        dense_budget=10.0, repeats=3, min_timing=0.25,
    ),
}

AGREEMENT_RTOL = 1e-8
MAX_REPEATS = 100
HEADERS = [
    "sweep", "k", "c_in = c_out", "n", "matrix size", "FFT time (s)", "dense time (s)",
    "dense / FFT", "max abs Δσ / σ_max",
]


def _kernel(k: int, c: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((k, k, c, c)) / np.sqrt(k * k * c))


def time_fft(
    kernel: jax.Array, spec: ConvSpec, repeats: int, min_timing: float
) -> tuple[float, np.ndarray]:
    """Median time of the jitted FFT method after one warm-up call, and its spectrum.

    At least ``repeats`` calls, more for fast layers (until ``min_timing`` seconds are spent, at
    most ``MAX_REPEATS``), so that a load spike on a shared machine does not set the median.
    """
    fn = jax.jit(lambda k: singular_values(k, spec, method="fft"))
    values = np.asarray(jax.block_until_ready(fn(kernel)))
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_timing and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(kernel))
        times.append(time.perf_counter() - start)
    return statistics.median(times), values


def time_dense(kernel: jax.Array, spec: ConvSpec) -> tuple[float, np.ndarray]:
    """Time of one dense SVD (building the matrix included; its jit compiled beforehand)."""
    build = jax.jit(lambda k: dense_operator(k, spec)).lower(kernel).compile()
    start = time.perf_counter()
    values = np.linalg.svd(np.asarray(build(kernel)), compute_uv=False)
    return time.perf_counter() - start, values


def measure(sweep: str, points: list[tuple[int, int, int]], config: dict,
            try_dense: bool = True) -> list[dict]:
    """Times every ``(k, n, c)`` point; dense only while predicted within the preset's budget."""
    rows = []
    last_dense: tuple[int, float] | None = None  # (matrix size, seconds)
    for i, (k, n, c) in enumerate(points):
        spec = ConvSpec(input_shape=(n, n), padding="CIRCULAR")
        kernel = _kernel(k, c, seed=i)
        size = n * n * c
        fft_time, fft_values = time_fft(kernel, spec, config["repeats"], config["min_timing"])
        row = dict(sweep=sweep, k=k, c=c, n=n, size=size, fft=fft_time, dense=None, diff=None)
        predicted = 0.0 if last_dense is None else last_dense[1] * (size / last_dense[0]) ** 3
        if try_dense and predicted <= config["dense_budget"]:
            dense_time, dense_values = time_dense(kernel, spec)
            last_dense = (size, dense_time)
            row["dense"] = dense_time
            row["diff"] = float(np.max(np.abs(fft_values - dense_values)) / dense_values[0])
        rows.append(row)
    return rows


def table_rows(rows: list[dict]) -> list[list[object]]:
    def fmt(value):
        return "—" if value is None else value

    out = []
    for r in rows:
        ratio = None if r["dense"] is None else r["dense"] / r["fft"]
        diff = None if r["diff"] is None else f"{r['diff']:.1e}"
        out.append([r["sweep"], r["k"], r["c"], r["n"], f"{r['size']} x {r['size']}",
                    r["fft"], fmt(r["dense"]), fmt(ratio), fmt(diff)])
    return out


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Log-log least-squares slope over the last (up to) 4 points; ``None`` if fewer than 2."""
    xs, ys = xs[-4:], ys[-4:]
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(channel_rows: list[dict], size_rows: list[dict], large_rows: list[dict],
         config: dict, out_dir: pathlib.Path) -> dict[str, float | None]:
    """Log-log time plots of both sweeps; returns the fitted log-log slopes."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    slopes = {}
    for ax, rows, key, label in (
        (axes[0], channel_rows, "c", f"channels c (k=3, n={config['n_fixed']})"),
        (axes[1], size_rows, "n", f"input size n (k=3, c={config['c_fixed']})"),
    ):
        xs = [r[key] for r in rows]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot(xs, [r["fft"] for r in rows], "o-", label="FFT method (ours)")
        dense = [r for r in rows if r["dense"] is not None]
        ax.plot([r[key] for r in dense], [r["dense"] for r in dense], "s-",
                label="dense SVD (np.linalg.svd)")
        slopes[f"fft_{key}"] = _slope(xs, [r["fft"] for r in rows])
        slopes[f"dense_{key}"] = _slope([r[key] for r in dense], [r["dense"] for r in dense])
        if key == "n":
            for r in large_rows:
                ax.plot([r["n"]], [r["fft"]], "^", label=f"FFT, {r['k']}x{r['k']}, c={r['c']}")
            xs = sorted(set(xs) | {r["n"] for r in large_rows})
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Exact singular values of a circular conv layer: FFT method vs dense SVD")
    _report.save_figure(fig, out_dir, NAME)
    return slopes


def run(preset: str, out_dir: pathlib.Path) -> str:
    """Runs the timing sweeps; writes ``out_dir/sedghi_timing.{md,png}``; returns the section."""
    config = _report.preset_config(PRESETS, preset)
    jax.config.update("jax_enable_x64", True)
    start = time.time()
    budget, repeats = config["dense_budget"], config["repeats"]
    with limit_blas_threads(1):
        channel_rows = measure(
            "channels", [(3, config["n_fixed"], c) for c in config["channels"]], config)
        size_rows = measure("input size", [(3, n, config["c_fixed"]) for n in config["sizes"]],
                            config)
        large_rows = measure("large kernel", [tuple(p) for p in config["large"]], config,
                             try_dense=False)
    rows = channel_rows + size_rows + large_rows
    slopes = plot(channel_rows, size_rows, large_rows, config, out_dir)
    checked = [r for r in rows if r["diff"] is not None]
    worst = max(r["diff"] for r in checked)
    agree = worst <= AGREEMENT_RTOL
    ratios = [r["dense"] / r["fft"] for r in checked]
    biggest = max(checked, key=lambda r: r["size"])

    def slope(key):
        value = slopes.get(key)
        return "n/a" if value is None else f"{value:.2f}"

    text = (
        f"## Sedghi et al. 2019: FFT method vs dense SVD timing ({preset})\n\n"
        "Exact singular values of a circular-padding conv layer (stride 1, c_in = c_out, random "
        "Gaussian kernels, float64, single-threaded BLAS): `singular_values(method='fft')` "
        "(jitted; median of "
        f">= {repeats} calls after a warm-up) vs `np.linalg.svd(dense_operator(...))` (one call; "
        f"run only while predicted to take <= {budget:g} s: '—' marks the points skipped). "
        f"Matrix size = n²c.\n\n"
        f"Agreement where both ran ({len(checked)} layers): max |Δσ| / σ_max = {worst:.1e} "
        f"({'within' if agree else 'NOT within'} {AGREEMENT_RTOL:g}). Dense / FFT time ratio: "
        f"{min(ratios):.3g}x to {max(ratios):.3g}x (largest dense layer: "
        f"{biggest['size']} x {biggest['size']}, {biggest['dense'] / biggest['fft']:.3g}x). "
        "Fitted log-log slopes over the last points (theory: dense n^6 c^3; FFT c^2 (c + log n) "
        f"n^2): FFT vs c {slope('fft_c')}, dense vs c {slope('dense_c')}, FFT vs n "
        f"{slope('fft_n')}, dense vs n {slope('dense_n')}.\n\n"
        + _report.markdown_table(HEADERS, table_rows(rows))
        + f"\n![FFT vs dense SVD time]({NAME}.png)\n\n"
        f"Run time: {time.time() - start:.0f} s.\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    if not agree:
        raise AssertionError(
            f"FFT and dense spectra differ by {worst:.1e} * σ_max > {AGREEMENT_RTOL:g}; "
            f"see {out_dir / (NAME + '.md')}"
        )
    return text


if __name__ == "__main__":
    _report.cli(run, "Sedghi et al. 2019: FFT method vs dense SVD timing")
