"""Speed of TTConv's two forward paths against a dense conv of the same shape.

Run ``python benchmarks/bench_tt.py [--quick]``. For each layer (channel modes, Garipov ranks
``(r, r, r, 1)``, 3x3 kernel, 'SAME', stride 1, batch ``--batch``, square input) it times, in one
run (median of ``--repeats`` interleaved repeats, AOT-compiled so no timed call compiles, results
``block_until_ready``-ed, float32):

* ``dense``: ``lax.conv_general_dilated`` with a dense HWIO kernel of the same shape (what
  ``nnx.Conv`` runs);
* ``full``: ``TTConv(impl="full")``: contract the cores into the kernel, then the same conv;
* ``cores``: ``TTConv(impl="cores")``: Garipov's core-by-core ``tt_conv`` (depthwise spatial conv
  with ``r_0`` filters, then one contraction per channel core);

forward alone, and forward + backward (gradient of ``sum(y * g)`` for a fixed random ``g``
w.r.t. the parameters and the input). It prints the ratios, the multiply-add counts of both TT
paths (``train.layers.tt.tt_conv_flops``), the measured per-multiply-add cost of "cores" relative
to "full" (the factor behind ``impl="auto"``: "cores" is chosen when ``factor * cores_flops <
full_flops``) and whether the rule picked the faster path at each layer.

By default BLAS and XLA use one thread (``--threads 0`` leaves the environment alone): the
machine is shared, and one thread compares algorithms rather than thread pools.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

# benchmarks/_timing.py: the script's folder is on sys.path.
from _timing import fmt_time
from _timing import limit_threads
from _timing import markdown
from _timing import time_all

#: (in_modes, out_modes): 64 -> 64 and 128 -> 128 channels, Garipov's modes.
FULL_LAYERS = (((4, 4, 4), (4, 4, 4)), ((4, 8, 4), (4, 8, 4)))
FULL_RANKS = (4, 8, 16, 32)
FULL_SIZES = (16, 32)
QUICK_LAYERS = (((4, 4, 4), (4, 4, 4)),)
QUICK_RANKS = (4, 16)
QUICK_SIZES = (16,)






def bench_layer(in_modes, out_modes, rank: int, size: int, batch: int, repeats: int,
                max_cores_macs: float) -> dict:
    """Times dense / full / cores, forward and forward + backward, on one layer.

    The cores path is not timed when it needs more than ``max_cores_macs`` times the
    multiply-adds of the full path (it is then slower by construction, and its backward is the
    longest part of a run).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax import lax

    from train.layers.tt import TTConv

    d = len(in_modes)
    ranks = (rank,) * d + (1,)
    layer = TTConv(in_modes, out_modes, ranks, 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    kernel = layer.kernel()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, layer.in_features)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, size, size, layer.out_features)), jnp.float32)

    def tt_forward(impl):
        def fn(params, x):
            model = nnx.merge(graphdef, params)
            model.impl = impl
            return model(x)
        return fn

    def dense_forward(kernel, x):
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def with_backward(fn):
        return jax.grad(lambda p, x: jnp.sum(fn(p, x) * g), argnums=(0, 1))

    def compiled(fn, p):
        exe = jax.jit(fn).lower(p, x).compile()
        return lambda: jax.block_until_ready(exe(p, x))

    flops = layer.flops((size, size), batch)
    time_cores = flops["cores"] <= max_cores_macs * flops["full"]
    fns = {
        "dense": compiled(dense_forward, kernel),
        "full": compiled(tt_forward("full"), params),
        "dense_bwd": compiled(with_backward(dense_forward), kernel),
        "full_bwd": compiled(with_backward(tt_forward("full")), params),
    }
    if time_cores:
        fns["cores"] = compiled(tt_forward("cores"), params)
        fns["cores_bwd"] = compiled(with_backward(tt_forward("cores")), params)
        err = float(jnp.max(jnp.abs(fns["cores"]() - fns["full"]()))
                    / jnp.max(jnp.abs(fns["full"]())))
    else:
        err = float("nan")
    times = time_all(fns, repeats)
    return {
        "layer": f"{layer.in_features}->{layer.out_features} {in_modes} r={rank} @{size}²",
        "times": times,
        "flops": flops,
        "auto": layer.chosen_impl((size, size), batch),
        "err": err,
        "params": layer.num_params,
        "dense_params": 9 * layer.in_features * layer.out_features,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small layers, < 20 s")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/XLA threads; 0: leave")
    parser.add_argument("--max-cores-macs", type=float, default=3.0,
                        help="skip timing the cores path above this MACs ratio cores/full "
                             "(inf: time every layer; the full run then takes ~6 min)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        limit_threads(args.threads)

    import jax
    import numpy as np

    from train.layers import tt

    layers = QUICK_LAYERS if args.quick else FULL_LAYERS
    ranks = QUICK_RANKS if args.quick else FULL_RANKS
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    start = time.perf_counter()
    print(
        f"bench_tt ({'quick' if args.quick else 'full'}) "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}: jax {jax.__version__} "
        f"({jax.default_backend()}: {jax.devices()[0].device_kind}), numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads="
        f"{args.threads or 'default'}, float32, batch {args.batch}, 3x3 'SAME' stride 1, ranks "
        f"(r, r, r, 1), median of {args.repeats} repeats",
        flush=True,
    )
    results = []
    for size in sizes:
        for in_modes, out_modes in layers:
            for rank in ranks:
                results.append(bench_layer(in_modes, out_modes, rank, size, args.batch,
                                           args.repeats, args.max_cores_macs))
                print(f"  measured {results[-1]['layer']}", flush=True)

    headers = ["layer", "params TT/dense", "dense fwd", "full fwd", "cores fwd", "full/dense",
               "cores/full", "dense f+b", "full f+b", "cores f+b", "full/dense f+b",
               "cores/full f+b", "MACs cores/full", "per-MAC cost cores/full", "auto", "faster"]
    rows, factors = [], []
    for r in results:
        t, f = r["times"], r["flops"]
        mac_ratio = f["cores"] / f["full"]
        if "cores" not in t:
            rows.append([
                r["layer"], f"{r['params']}/{r['dense_params']}", fmt_time(t["dense"]),
                fmt_time(t["full"]), "skipped", f"{t['full'] / t['dense']:.3g}x", "—",
                fmt_time(t["dense_bwd"]), fmt_time(t["full_bwd"]), "skipped",
                f"{t['full_bwd'] / t['dense_bwd']:.3g}x", "—", f"{mac_ratio:.3g}", "—",
                r["auto"], "full (MACs)",
            ])
            continue
        factor = (t["cores"] / t["full"]) / mac_ratio
        factor_bwd = (t["cores_bwd"] / t["full_bwd"]) / mac_ratio
        factors += [factor, factor_bwd]
        faster = "cores" if t["cores"] + t["cores_bwd"] < t["full"] + t["full_bwd"] else "full"
        rows.append([
            r["layer"], f"{r['params']}/{r['dense_params']}", fmt_time(t["dense"]),
            fmt_time(t["full"]), fmt_time(t["cores"]), f"{t['full'] / t['dense']:.3g}x",
            f"{t['cores'] / t['full']:.3g}x", fmt_time(t["dense_bwd"]),
            fmt_time(t["full_bwd"]), fmt_time(t["cores_bwd"]),
            f"{t['full_bwd'] / t['dense_bwd']:.3g}x", f"{t['cores_bwd'] / t['full_bwd']:.3g}x",
            f"{mac_ratio:.3g}", f"{factor:.3g} / {factor_bwd:.3g}", r["auto"], faster,
        ])
    print()
    print(markdown(headers, rows))
    print(
        "\nf+b = forward + backward (grads w.r.t. params and input). MACs = multiply-adds of the "
        "forward (tt_conv_flops). per-MAC cost cores/full = (time cores / time full) / (MACs "
        "cores / MACs full), forward / forward+backward: the factor of impl='auto'. faster = "
        "the TT path with the smaller forward + f+b time; 'skipped': cores not timed (more than "
        f"{args.max_cores_macs:g}x the MACs of full)."
    )
    errs = [r["err"] for r in results if r["err"] == r["err"]]
    if errs:
        print(f"max |cores - full| / max |full| (forward): {max(errs):.1e}")
    if factors:
        print(f"per-MAC cost factor: median {statistics.median(factors):.3g}, range "
              f"[{min(factors):.3g}, {max(factors):.3g}]; AUTO_CORES_COST_FACTOR = "
              f"{tt.AUTO_CORES_COST_FACTOR:g}")
    agree = sum(row[-1].startswith(r["auto"]) for r, row in zip(results, rows))
    print(f"auto picked the faster TT path at {agree}/{len(results)} layers")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
