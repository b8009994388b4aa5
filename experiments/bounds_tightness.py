"""Tightness and cost of every certified spectral-norm upper bound in ``spectra._bounds``.

For each layer of the preset (random Gaussian HWIO kernels, std ``1/sqrt(kh kw c_in/g)``,
float64) this computes the exact σ_max (``spectral_norm(method='fft')`` for circular layers
whose strides divide the input; restarted Lanczos, ``lanczos_spectral_norm``, for zero padding,
whose residual is reported) and, for every entry of ``UPPER_BOUNDS``, the tightness ratio
``bound / σ_max`` (>= 1: certified) and the median time of the jitted bound (after a warm-up
call, ``block_until_ready``). The script fails if a bound falls below the exact value.
"""

from __future__ import annotations

import functools
import math
import pathlib
import statistics
import time

import jax
import numpy as np

from experiments import _report
from spectra import SPEC_DEPENDENT_BOUNDS
from spectra import UPPER_BOUNDS
from spectra import ConvSpec
from spectra import lanczos_spectral_norm
from spectra import spectral_norm
from train.lapack_workaround import limit_blas_threads

NAME = "bounds_tightness"

#: ``layers``: ``(label, HWIO kernel shape, spec)``; ``repeats``: timed calls (median; more for
#: fast bounds until ``min_timing`` seconds are spent). "test" is a tiny preset for the test suite.
PRESETS = {
    "test": dict(
        layers=(
            ("k3 c4 @6 circ", (3, 3, 4, 4), ConvSpec((6, 6), padding="CIRCULAR")),
            ("k3 c4→6 s2 @8 same", (3, 3, 4, 6), ConvSpec((8, 8), 2, "SAME")),
        ),
        repeats=2, min_timing=0.0,
    ),
    "quick": dict(
        layers=(
            ("k3 c16 @12 circ", (3, 3, 16, 16), ConvSpec((12, 12), padding="CIRCULAR")),
            ("k3 c16 @12 same", (3, 3, 16, 16), ConvSpec((12, 12), padding="SAME")),
            ("k5 c16 @16 same", (5, 5, 16, 16), ConvSpec((16, 16), padding="SAME")),
            ("k3 c8→32 s2 @16 same", (3, 3, 8, 32), ConvSpec((16, 16), 2, "SAME")),
            ("k3 c32 s2 @8 circ", (3, 3, 32, 32), ConvSpec((8, 8), 2, "CIRCULAR")),
            ("k3 c32 d2 @16 circ", (3, 3, 32, 32),
             ConvSpec((16, 16), padding="CIRCULAR", kernel_dilation=2)),
            ("dw k3 c32 @16 same", (3, 3, 1, 32),
             ConvSpec((16, 16), padding="SAME", feature_group_count=32)),
        ),
        repeats=5, min_timing=0.05,
    ),
    "paper": dict(
        layers=(
            ("k3 c64 @32 same", (3, 3, 64, 64), ConvSpec((32, 32), padding="SAME")),
            ("k3 c64 @32 circ", (3, 3, 64, 64), ConvSpec((32, 32), padding="CIRCULAR")),
            ("k3 c64→128 s2 @32 same", (3, 3, 64, 128), ConvSpec((32, 32), 2, "SAME")),
            ("k3 c128 @16 same", (3, 3, 128, 128), ConvSpec((16, 16), padding="SAME")),
            ("k3 c256 @16 same", (3, 3, 256, 256), ConvSpec((16, 16), padding="SAME")),
            ("k3 c256 @16 circ", (3, 3, 256, 256), ConvSpec((16, 16), padding="CIRCULAR")),
            ("k1 c64→256 @32 same", (1, 1, 64, 256), ConvSpec((32, 32), padding="SAME")),
            ("dw k3 c256 @16 same", (3, 3, 1, 256),
             ConvSpec((16, 16), padding="SAME", feature_group_count=256)),
        ),
        repeats=5, min_timing=0.2,
    ),
}

MAX_REPEATS = 50
#: Relative slack for rounding (and the Lanczos tolerance) when checking ``bound >= exact``.
CHECK_RTOL = 1e-8


def _kernel(shape: tuple[int, int, int, int], seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    fan_in = shape[0] * shape[1] * shape[2]
    return jax.numpy.asarray(rng.standard_normal(shape) / math.sqrt(fan_in))


def median_time(fn, kernel, repeats: int, min_timing: float) -> tuple[float, float]:
    """``(value, median seconds)`` of a jitted scalar function, after one warm-up call."""
    value = float(jax.block_until_ready(fn(kernel)))
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_timing and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(kernel))
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def exact_norm(kernel, spec: ConvSpec, repeats: int, min_timing: float) -> dict:
    """Exact σ_max: the FFT method where it applies, else restarted Lanczos (with residual)."""
    if spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides)):
        fn = jax.jit(lambda k: spectral_norm(k, spec, method="fft"))
        value, seconds = median_time(fn, kernel, repeats, min_timing)
        return dict(value=value, seconds=seconds, method="fft", residual=0.0)
    estimate = jax.jit(lambda k: lanczos_spectral_norm(k, spec))
    residual = float(estimate(kernel).residual)
    value, seconds = median_time(lambda k: estimate(k).value, kernel, repeats, min_timing)
    return dict(value=value, seconds=seconds, method="lanczos", residual=residual)


def measure(config: dict) -> list[dict]:
    """For every layer: the exact σ_max and, per bound, its value, ratio and median time."""
    results = []
    for i, (label, kshape, spec) in enumerate(config["layers"]):
        kernel = _kernel(kshape, seed=i)
        exact = exact_norm(kernel, spec, config["repeats"], config["min_timing"])
        bounds = {}
        for name, bound in UPPER_BOUNDS.items():
            fn = jax.jit(functools.partial(bound, spec=spec))
            value, seconds = median_time(fn, kernel, config["repeats"], config["min_timing"])
            bounds[name] = dict(value=value, ratio=value / exact["value"], seconds=seconds)
        results.append(dict(label=label, kshape=kshape, spec=spec, exact=exact, bounds=bounds))
    return results


def _padding_label(spec: ConvSpec) -> str:
    return spec.padding if isinstance(spec.padding, str) else str(spec.padding)


def layer_rows(results: list[dict]) -> list[list[object]]:
    rows = []
    for r in results:
        spec, (kh, kw, cig, cout) = r["spec"], r["kshape"]
        g = spec.feature_group_count
        exact = r["exact"]
        rows.append([
            r["label"], f"{kh}x{kw}", f"{cig * g}→{cout}", f"{spec.input_shape[0]}x"
            f"{spec.input_shape[1]}", _padding_label(spec), f"{spec.strides}",
            f"{spec.kernel_dilation}", g, exact["method"], f"{exact['value']:.6g}",
            f"{exact['residual']:.1e}", f"{exact['seconds'] * 1e3:.3g}",
        ])
    return rows


def tightness_rows(results: list[dict]) -> list[list[object]]:
    rows = []
    for name in UPPER_BOUNDS:
        ratios = [r["bounds"][name]["ratio"] for r in results]
        cells = [f"{r['bounds'][name]['ratio']:.4f} ({r['bounds'][name]['seconds'] * 1e3:.3g} ms)"
                 for r in results]
        geo = math.exp(statistics.fmean(math.log(x) for x in ratios))
        scope = "this layer" if name in SPEC_DEPENDENT_BOUNDS else "any size"
        rows.append([f"`{name}`", scope, *cells, f"{geo:.4f}"])
    return rows


def plot(results: list[dict], out_dir: pathlib.Path) -> None:
    """Tightness ratio vs median time, one colour per bound, one point per layer."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    cmap = plt.get_cmap("tab20")
    markers = "os^vD<>ph*X"
    for b, name in enumerate(UPPER_BOUNDS):
        for li, r in enumerate(results):
            entry = r["bounds"][name]
            ax.scatter(entry["seconds"] * 1e3, entry["ratio"], color=cmap(b % 20),
                       marker=markers[li % len(markers)], s=36, alpha=0.85,
                       label=name if li == 0 else None)
    for li, r in enumerate(results):
        ax.scatter([], [], color="gray", marker=markers[li % len(markers)], label=r["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("median time of the jitted bound (ms)")
    ax.set_ylabel("bound / exact σ_max")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Certified spectral-norm upper bounds: tightness vs cost")
    _report.save_figure(fig, out_dir, NAME)


def run(preset: str, out_dir: pathlib.Path) -> str:
    """Measures every bound on the preset's layers; writes ``out_dir/bounds_tightness.{md,png}``."""
    config = _report.preset_config(PRESETS, preset)
    jax.config.update("jax_enable_x64", True)
    start = time.time()
    with limit_blas_threads(1):
        results = measure(config)
    plot(results, out_dir)
    violations = [
        (r["label"], name, b["ratio"]) for r in results for name, b in r["bounds"].items()
        if b["ratio"] < 1 - CHECK_RTOL
    ]
    labels = [r["label"] for r in results]
    text = (
        f"## Certified spectral-norm upper bounds: tightness and cost ({preset})\n\n"
        "Every entry of `spectra._bounds.UPPER_BOUNDS` on random Gaussian kernels (std "
        "1/sqrt(fan_in), float64, single-threaded BLAS, backend "
        f"`{jax.default_backend()}`). Cells: tightness ratio bound / exact σ_max (>= 1 means "
        "certified; 1 is exact) and the median time of the jitted bound (after a warm-up call, "
        "`block_until_ready`). 'this layer': the bound uses the input size and padding; "
        "'any size': it holds for every input size with this kernel, stride and dilation. "
        "Exact σ_max: FFT method (circular) or restarted Lanczos (zero padding).\n\n"
        "Layers:\n\n"
        + _report.markdown_table(
            ["layer", "kernel", "c_in→c_out", "input", "padding", "strides", "dilation",
             "groups", "exact by", "exact σ_max", "Lanczos residual", "exact ms"],
            layer_rows(results))
        + "\nTightness ratio (time):\n\n"
        + _report.markdown_table(["bound", "valid for", *labels, "geo-mean ratio"],
                                 tightness_rows(results))
        + f"\n![Tightness vs time of the bounds]({NAME}.png)\n\n"
        + (f"Every bound >= exact σ_max (relative slack {CHECK_RTOL:g}).\n\n" if not violations
           else f"**Bounds below the exact value: {violations}**\n\n")
        + f"Run time: {time.time() - start:.0f} s.\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    if violations:
        raise AssertionError(f"bounds below the exact σ_max: {violations}")
    return text


if __name__ == "__main__":
    _report.cli(run, "Tightness and cost of the certified spectral-norm upper bounds")
