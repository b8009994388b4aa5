"""Speed of the exact circular spectrum and of σ_max, against Sedghi et al.'s NumPy method.

Run ``python benchmarks/bench_spectra.py [--quick]``. Prints one table, every number measured in
this run (median of ``--repeats`` interleaved repeats; the jit warm-up is an ahead-of-time
compile, ``jax.jit(f).lower(kernel).compile()``, so no timed call compiles; JAX results are
``block_until_ready``-ed), then PASS/FAIL per target:

* exact full spectrum (``singular_values(method='fft')``) >= 3x faster than the NumPy reference
  written from Sedghi et al. 2019 (``np.fft.fft2(K, (n, n), axes=[0, 1])`` +
  ``np.linalg.svd(..., compute_uv=False)``), circular padding;
* σ_max within 1e-4 relative of the exact one (max of our full spectrum) and >= 20x faster than
  the full exact spectrum, for the certified **upper bound** ``circular_norm_bracket(...)[1]``
  (Gram iteration) and for ``spectral_norm(method='fft_gram')`` (Rayleigh value: a **lower
  estimate** converging to the exact);
* exact zero-padded σ_max (``spectral_norm(method='lanczos')``) >= 100x faster than the dense
  SVD (``spectral_norm(method='dense')``) on a small 'SAME' layer where densifying fits.

Everything runs in float64. By default BLAS/LAPACK and XLA are limited to one thread
(``--threads 0`` leaves the environment alone): on a shared machine, oversubscribed OpenBLAS
threads make timings meaningless (a 20x slowdown was measured), and one thread compares
algorithms rather than thread pools.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable

# benchmarks/_timing.py: the script's folder is on sys.path.
from _timing import fmt_time
from _timing import limit_threads
from _timing import markdown
from _timing import time_all

#: Full run: (kh, kw, c_in, c_out, n) circular layers, and the zero-padded 'SAME' layer.
FULL_CIRCULAR = ((3, 3, 64, 64, 32), (3, 3, 256, 256, 16), (3, 3, 512, 512, 8), (5, 5, 64, 64, 12))
FULL_ZERO = (3, 3, 16, 16, 16)
#: ``--quick``: smaller layers of the same shapes of problem (< 1 min in all).
QUICK_CIRCULAR = ((3, 3, 32, 32, 16), (3, 3, 64, 64, 8), (3, 3, 128, 128, 4), (5, 5, 32, 32, 8))
QUICK_ZERO = (3, 3, 8, 8, 12)
#: Layers are densified only when in_dim is at most this (dense SVD is O(in_dim^3)).
MAX_DENSE_DIM = 4096

FULL_SPEEDUP = 3.0
NORM_SPEEDUP = 20.0
NORM_RTOL = 1e-4
LANCZOS_SPEEDUP = 100.0



def _random_kernel(kh: int, kw: int, c_in: int, c_out: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((kh, kw, c_in, c_out)) / np.sqrt(kh * kw * c_in)


def _compiled(fn: Callable, kernel) -> Callable:
    """AOT-compiles ``fn`` for ``kernel`` (the jit warm-up, without running it)."""
    import jax

    compiled = jax.jit(fn).lower(kernel).compile()
    return lambda: jax.block_until_ready(compiled(kernel))




def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _fmt_err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1e}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def bench_circular(layer, repeats: int, num_squarings: int) -> dict:
    """Times the NumPy reference, our full spectrum and our two σ_max on one circular layer."""
    import jax.numpy as jnp
    import numpy as np

    import spectra

    kh, kw, c_in, c_out, n = layer
    kernel_np = _random_kernel(kh, kw, c_in, c_out)
    kernel = jnp.asarray(kernel_np)
    spec = spectra.ConvSpec(input_shape=(n, n), padding="CIRCULAR")

    def numpy_reference():
        transform = np.fft.fft2(kernel_np, (n, n), axes=[0, 1])
        return np.linalg.svd(transform, compute_uv=False)

    fns = {
        "ref": numpy_reference,
        "full": _compiled(lambda k: spectra.singular_values(k, spec, method="fft"), kernel),
        "upper": _compiled(
            lambda k: spectra.circular_norm_bracket(k, spec, num_squarings=num_squarings)[1],
            kernel,
        ),
        "gram": _compiled(
            lambda k: spectra.spectral_norm(
                k, spec, method="fft_gram", num_squarings=num_squarings),
            kernel,
        ),
        "fft": _compiled(lambda k: spectra.frequency_matrices(k, spec).matrices, kernel),
    }
    times = time_all(fns, repeats)
    ref_sv = np.sort(numpy_reference().ravel())[::-1]
    full_sv = np.asarray(fns["full"]())
    exact = float(full_sv[0])
    return {
        "layer": f"({kh},{kw},{c_in},{c_out})@{n}² circular",
        "times": times,
        "spectrum_err": float(np.max(np.abs(full_sv - ref_sv)) / exact),
        "upper_err": (float(fns["upper"]()) - exact) / exact,
        "gram_err": (float(fns["gram"]()) - exact) / exact,
        "dense_fits": n * n * c_in <= MAX_DENSE_DIM,
    }


def bench_zero_padded(layer, repeats: int, lanczos_steps: tuple[int, ...]) -> dict:
    """Times the dense SVD against Lanczos (each ``num_steps``) on a zero-padded 'SAME' layer."""
    import jax.numpy as jnp

    import spectra

    kh, kw, c_in, c_out, n = layer
    kernel = jnp.asarray(_random_kernel(kh, kw, c_in, c_out))
    spec = spectra.ConvSpec(input_shape=(n, n), padding="SAME")
    fns = {"dense": _compiled(lambda k: spectra.spectral_norm(k, spec, method="dense"), kernel)}
    for steps in lanczos_steps:
        fns[f"lanczos{steps}"] = _compiled(
            lambda k, s=steps: spectra.lanczos_spectral_norm(k, spec, num_steps=s).value, kernel
        )
    times = time_all(fns, repeats)
    exact = float(fns["dense"]())
    sweep = {}
    for steps in lanczos_steps:
        estimate = spectra.lanczos_spectral_norm(kernel, spec, num_steps=steps)
        sweep[steps] = {
            "time": times[f"lanczos{steps}"],
            "err": (float(estimate.value) - exact) / exact,
            "restarts": int(estimate.num_restarts),
        }
    best = min(lanczos_steps, key=lambda s: times[f"lanczos{s}"])
    return {
        "layer": f"({kh},{kw},{c_in},{c_out})@{n}² SAME",
        "dense": times["dense"],
        "best_steps": best,
        "sweep": sweep,
    }


def bench_num_squarings(layer, repeats: int, squarings: tuple[int, ...]) -> list[tuple]:
    """Time and accuracy of ``circular_norm_bracket`` against ``num_squarings`` on one layer."""
    import jax.numpy as jnp
    import numpy as np

    import spectra

    kh, kw, c_in, c_out, n = layer
    kernel = jnp.asarray(_random_kernel(kh, kw, c_in, c_out))
    spec = spectra.ConvSpec(input_shape=(n, n), padding="CIRCULAR")
    exact = float(np.asarray(spectra.spectral_norm(kernel, spec, method="fft")))
    fns = {
        t: _compiled(lambda k, t=t: spectra.circular_norm_bracket(k, spec, num_squarings=t), kernel)
        for t in squarings
    }
    times = time_all(fns, repeats)
    rows = []
    for t in squarings:
        lower, upper = (float(v) for v in fns[t]())
        rows.append((t, times[t], (lower - exact) / exact, (upper - exact) / exact))
    return rows



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller layers, < 1 min")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/XLA threads; 0: leave")
    parser.add_argument("--num-squarings", type=int, default=6, help="Gram iteration squarings")
    args = parser.parse_args(argv)
    if args.threads > 0:
        limit_threads(args.threads)

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)

    circular = QUICK_CIRCULAR if args.quick else FULL_CIRCULAR
    zero = QUICK_ZERO if args.quick else FULL_ZERO
    repeats = args.repeats or (5 if args.quick else 3)
    start = time.perf_counter()
    print(
        f"bench_spectra ({'quick' if args.quick else 'full'}) "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}: jax {jax.__version__} "
        f"({jax.default_backend()}: {jax.devices()[0].device_kind}), numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads="
        f"{args.threads or 'default'}, float64, median of {repeats} repeats, random kernels "
        f"N(0, 1/(kh kw c_in)), num_squarings={args.num_squarings}",
        flush=True,
    )

    results = []
    for layer in circular:
        results.append(bench_circular(layer, repeats, args.num_squarings))
        print(f"  measured {results[-1]['layer']}", flush=True)
    lanczos_steps = (32, 64, 128)
    zero_result = bench_zero_padded(zero, repeats, lanczos_steps)
    print(f"  measured {zero_result['layer']}", flush=True)
    squaring_rows = bench_num_squarings(circular[0], repeats, (2, 3, 4, 5, 6, 8))

    headers = [
        "layer", "NumPy ref", "ours full", "(FFT part)", "ref/full", "σmax bound", "full/bound",
        "bound err", "σmax fft_gram", "full/gram", "gram err", "dense SVD", "σmax lanczos",
        "dense/lanczos", "lanczos err",
    ]
    rows = []
    for r in results:
        t = r["times"]
        rows.append([
            r["layer"], fmt_time(t["ref"]), fmt_time(t["full"]), fmt_time(t["fft"]),
            _fmt_ratio(t["ref"] / t["full"]),
            fmt_time(t["upper"]), _fmt_ratio(t["full"] / t["upper"]), _fmt_err(r["upper_err"]),
            fmt_time(t["gram"]), _fmt_ratio(t["full"] / t["gram"]), _fmt_err(r["gram_err"]),
            "n/a", "—", "n/a", "—",
        ])
    z = zero_result
    best = z["sweep"][z["best_steps"]]
    rows.append([
        z["layer"], "n/a", "n/a", "n/a", "n/a", "—", "—", "—", "—", "—", "—",
        fmt_time(z["dense"]), f"{fmt_time(best['time'])} (steps={z['best_steps']})",
        _fmt_ratio(z["dense"] / best["time"]), _fmt_err(best["err"]),
    ])
    print()
    print(markdown(headers, rows))
    print(
        "\nerr = (σ - exact) / exact, exact = max of our full spectrum (circular rows) or of the "
        "dense SVD (SAME row); 'n/a' = does not apply / does not fit in memory; '—' = not run; "
        "(FFT part) = frequency_matrices alone (rfft + layout), the rest of 'ours full' is the "
        "batched complex SVD."
    )
    print(
        "max |ours full - NumPy ref| / σmax (sorted spectra): "
        + ", ".join(f"{r['spectrum_err']:.1e}" for r in results)
    )

    print("\nTargets:")
    for r in results:
        t = r["times"]
        speed = t["ref"] / t["full"]
        print(f"  [{_verdict(speed >= FULL_SPEEDUP)}] full spectrum >= {FULL_SPEEDUP:g}x NumPy "
              f"ref: {speed:.3g}x  {r['layer']}")
    for r in results:
        t = r["times"]
        for key, err_key, label in (
            ("upper", "upper_err", "bound"), ("gram", "gram_err", "fft_gram")
        ):
            speed, err = t["full"] / t[key], abs(r[err_key])
            ok = speed >= NORM_SPEEDUP and err <= NORM_RTOL
            print(f"  [{_verdict(ok)}] σmax {label} within {NORM_RTOL:g} and >= {NORM_SPEEDUP:g}x "
                  f"full: err {err:.1e} [{_verdict(err <= NORM_RTOL)}], {speed:.3g}x "
                  f"[{_verdict(speed >= NORM_SPEEDUP)}]  {r['layer']}")
    speed = z["dense"] / best["time"]
    print(f"  [{_verdict(speed >= LANCZOS_SPEEDUP)}] zero-padded σmax lanczos >= "
          f"{LANCZOS_SPEEDUP:g}x dense SVD: {speed:.3g}x (err {best['err']:+.1e})  {z['layer']}")

    print(f"\nTuning: Lanczos num_steps on {z['layer']} (dense SVD {fmt_time(z['dense'])})")
    print(markdown(
        ["num_steps", "time", "dense/lanczos", "err", "cycles"],
        [[str(s), fmt_time(v["time"]), _fmt_ratio(z["dense"] / v["time"]), _fmt_err(v["err"]),
          str(v["restarts"])] for s, v in z["sweep"].items()],
    ))
    full_time = results[0]["times"]["full"]
    print(f"\nTuning: circular_norm_bracket num_squarings on {results[0]['layer']} "
          f"(ours full {fmt_time(full_time)})")
    print(markdown(
        ["num_squarings", "time", "full/bracket", "lower err", "upper err"],
        [[str(t), fmt_time(s), _fmt_ratio(full_time / s), _fmt_err(lo), _fmt_err(up)]
         for t, s, lo, up in squaring_rows],
    ))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
