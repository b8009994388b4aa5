"""Time one training step of ResNet-20 (32x32, batch 128) without and with the projection.

One jitted :func:`train.loop.make_steps` step (forward, backward, BatchNorm statistics, SGD with
momentum 0.9 and weight decay, metric sums) of ResNet-20 (width 16, zero padding, shortcut A,
10 classes) on a fixed random batch of 128 images 32x32x3, float32, compared with the same step
where :func:`train.project_conv_operator_norm` projects all 19 conv kernels every step (radius
``c = 1``) with each method (``certified``, ``sedghi``, ``dykstra``, ``rescale``; one round).
Times are medians over ``--repeats`` steps after ``--warmup`` steps (compilation excluded), each
step timed to ``block_until_ready``, the variants interleaved (one step of each per round), all in
one process, on whatever device JAX uses (CPU here). The last column is the largest exact σ_max
of the convs after the steps (the approximate methods may end above ``c``).

Printed: the median step time per variant, its ratio to the plain step, the overhead
(``ratio - 1``; target ≤ 25%), and the derived amortised overhead when projecting every 100 steps
(``overhead / 100``, the paper's period; computed, not measured).

Usage: ``python benchmarks/bench_train_step.py [--repeats 7] [--warmup 2] [--batch 128]``.
"""

from __future__ import annotations

import os

# Batched small LAPACK calls are sequential per call in XLA:CPU; OpenBLAS threads only
# oversubscribe the cores. Set before NumPy/JAX load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from train import loop  # noqa: E402

loop.avoid_cpu_lapack_deadlock()  # Before the first JAX computation (see its docstring).

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from train import discovery  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.models.resnet import ResNet  # noqa: E402

METHODS = ("certified", "sedghi", "dykstra", "rescale", "power")


class Variant:
    """One variant's jitted train step and its state (ResNet-20, compiled by ``warm_up``)."""

    def __init__(self, config: TrainConfig, batch: tuple):
        model = ResNet(20, 10, in_channels=3, width=config.width, padding=config.padding,
                       rngs=nnx.Rngs(0))
        self.specs = discovery.find_convs_nnx(model, batch[0][:1])
        model.train()
        graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        self.steps = loop.make_steps(graphdef_train, graphdef_eval, self.specs, config)
        self.hyper = loop.step_hyperparameters(config)
        self.state = loop.TrainState(
            params, rest, self.steps.tx.init(params), jnp.zeros([], jnp.int32), loop._zero_sums()
        )
        self.batch = batch
        self.times: list[float] = []

    def step(self, record: bool = True) -> None:
        start = time.perf_counter()
        self.state, _ = self.steps.train_step(self.state, *self.batch, self.hyper)
        jax.block_until_ready(self.state)
        if record:
            self.times.append(time.perf_counter() - start)

    def sigma_max(self) -> float:
        """Largest exact σ_max over the convs now (``train.loop.layer_spectral_norms``:
        Lanczos to 1e-5 for these zero-padded layers)."""
        return float(jnp.max(loop.layer_spectral_norms(self.state.params, self.specs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, nargs="+", default=[1],
                        help="project_rounds values (power iterations for 'power') to time")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    batch = (
        rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
        rng.integers(0, 10, size=args.batch).astype(np.int32),
        np.ones(args.batch, np.float32),
    )
    base = TrainConfig(model="resnet20", width=16, num_steps=1000, progress=False)
    variants = [("plain SGD", base)] + [
        (f"+ projection ({m}, {r} round{'s' * (r > 1)}), every step",
         dataclasses.replace(base, project_max_norm=args.max_norm, project_method=m,
                             project_rounds=r))
        for m in args.methods for r in args.rounds
    ]
    print(f"# ResNet-20, 32x32x3, batch {args.batch}, float32, device "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs visible; median of {args.repeats} steps after "
          f"{args.warmup} warm-up steps")
    runs = {}
    for label, config in variants:
        t0 = time.perf_counter()
        runs[label] = Variant(config, batch)
        for _ in range(args.warmup):
            runs[label].step(record=False)
        print(f"  compiled {label} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # Interleaved: one step of every variant per round, so that slow drifts of the machine's
    # load hit all variants alike; medians over the rounds.
    for _ in range(args.repeats):
        for run in runs.values():
            run.step()
    medians = {label: statistics.median(run.times) for label, run in runs.items()}
    sigmas = {label: run.sigma_max() for label, run in runs.items()}
    plain = medians["plain SGD"]
    print()
    print("| variant | median step (ms) | ratio to plain | overhead | amortised every 100 "
          "| max exact σ_max after the steps |")
    print("|---|---|---|---|---|---|")
    for label, median in medians.items():
        overhead = median / plain - 1
        amortised = "-" if label == "plain SGD" else f"{100 * overhead / 100:.2f}%"
        print(f"| {label} | {1000 * median:.1f} | {median / plain:.3f} | {100 * overhead:.1f}% "
              f"| {amortised} | {sigmas[label]:.4f} |")
    print(f"\nTarget: overhead <= 25% when projecting every step. Radius c = {args.max_norm}; "
          "'power' is approximate (its σ_max may exceed c by the power estimate's error, after "
          f"{args.warmup + args.repeats} steps of warm-started iterations from a random start).")


if __name__ == "__main__":
    main()
