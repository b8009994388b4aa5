"""Step time of the data-parallel train step on 1, 2 and 4 simulated devices, in one run.

Run ``python benchmarks/bench_distributed.py [--model resnet8 --width 8 --size 16 --batch 64]``.
One subprocess per device count ``n`` (``XLA_FLAGS=--xla_force_host_platform_device_count=n``
must be set before JAX starts) times, interleaved (median of ``--repeats`` repeats of
``--steps`` steps, ``block_until_ready`` at the end of each repeat, compiled beforehand):

* ``sharded``: the loop's step (:func:`train.steps.make_steps` with the mesh of
  :func:`train.distributed.make_mesh` ``(n)``), each batch made a global array split over
  ``'data'`` (:func:`train.distributed.shard_batch`), the state replicated;
* ``plain`` (``n = 1`` only): the same step without a mesh, fed NumPy batches, as the loop ran
  before it became data-parallel.

It prints a Markdown table and the 1-device overhead ``sharded / plain - 1`` (target: at most
10%). Simulated CPU devices share the machine's cores, so no speed-up is expected from ``n``:
the rows show the cost of the sharded program (collectives included), not a scaling curve.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DEVICE_COUNTS = (1, 2, 4)


def child(args) -> dict:
    from train.lapack_workaround import avoid_cpu_lapack_deadlock

    avoid_cpu_lapack_deadlock()
    import jax
    import numpy as np

    from train import distributed
    from train.config import TrainConfig
    from train.models.registry import build_model
    from train.steps import init_train_state
    from train.steps import make_steps
    from train.steps import split_model
    from train.steps import step_hyperparameters

    config = TrainConfig(model=args.model, width=args.width, batch_size=args.batch,
                         num_steps=1000, progress=False)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    label = rng.integers(0, 10, args.batch).astype(np.int32)
    mask = np.ones(args.batch, np.float32)
    model = build_model(config, 10, 3)
    specs, g_train, g_eval, params, rest = split_model(model, image[:1])
    n = jax.device_count()
    mesh = distributed.make_mesh(n)
    hyper = step_hyperparameters(config)
    variants = {"sharded": make_steps(g_train, g_eval, specs, config, mesh)}
    states = {"sharded": distributed.place_state(
        init_train_state(config, specs, params, rest), mesh)}
    hypers = {"sharded": distributed.place_state(hyper, mesh)}
    if n == 1:
        variants["plain"] = make_steps(g_train, g_eval, specs, config)
        states["plain"] = init_train_state(config, specs, params, rest)
        hypers["plain"] = hyper

    def run(name):
        state = states[name]
        for _ in range(args.steps):
            if name == "sharded":
                batch = distributed.shard_batch(mesh, image, label, mask)
            else:
                batch = (image, label, mask)
            state, _ = variants[name].train_step(state, *batch, hypers[name])
        jax.block_until_ready(state)
        states[name] = state

    for name in variants:  # Compile and warm up.
        run(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            start = time.perf_counter()
            run(name)
            times[name].append((time.perf_counter() - start) / args.steps)
    return {"devices": n, **{name: float(np.median(t)) for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="input height = width")
    parser.add_argument("--batch", type=int, default=64, help="global batch (divisible by 4)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with open(args.out, "w") as f:
            json.dump(child(args), f)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for n in DEVICE_COUNTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = dict(os.environ)
            env["XLA_FLAGS"] = (
                f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
            )
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            argv = [sys.executable, os.path.abspath(__file__), "--child", "--out", out.name]
            for name in ("model", "width", "size", "batch", "steps", "repeats"):
                argv += [f"--{name}", str(getattr(args, name))]
            subprocess.run(argv, env=env, check=True)
            with open(out.name) as f:
                results.append(json.load(f))
    from _timing import fmt_time
    from _timing import markdown

    print(f"{args.model} width {args.width}, {args.size}x{args.size}x3, global batch "
          f"{args.batch}, SGD; median of {args.repeats} x {args.steps} steps per row")
    rows = [[str(r["devices"]), fmt_time(r["sharded"]), fmt_time(r.get("plain"))]
            for r in results]
    print(markdown(["simulated devices", "sharded step", "plain step (no mesh)"], rows))
    one = results[0]
    print(f"1-device overhead of the sharded step: {one['sharded'] / one['plain'] - 1:+.1%}")


if __name__ == "__main__":
    main()
