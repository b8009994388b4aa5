"""Time one operator-norm projection of all conv kernels against one `optax.sgd` update.

Two kernel sets, 3x3 convs with SAME padding, float32:

* ``small_cnn``: the Flax MNIST CNN (1 -> 32 @ 28 px, 32 -> 64 @ 14 px).
* ``resnet20``: the CIFAR ResNet-20 convs: 7 at 32 px (3 -> 16, then 6 of 16 -> 16), 6 with 32
  channels (16 -> 32 stride 2 from 32 px, then 5 of 32 -> 32 @ 16 px), 6 with 64 channels
  (32 -> 64 stride 2 from 16 px, then 5 of 64 -> 64 @ 8 px).

Each projection is one jitted function of the whole parameter dict (kernels of the same shape and
layer are stacked and vmapped); the SGD update is ``optax.sgd`` + ``optax.apply_updates`` on the
same dict, jitted. Times are medians over ``--repeats`` runs after a warm-up (compile excluded).

Usage: ``python benchmarks/bench_projection.py [--repeats 5] [--num-rounds 1] [--max-norm 1.0]``.
"""

from __future__ import annotations

import os

# Batched small LAPACK calls (one per frequency) are sequential in XLA:CPU; OpenBLAS threads only
# oversubscribe the cores. Set before NumPy/JAX load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from spectra import ConvSpec  # noqa: E402
from spectra import clip_operator_norm  # noqa: E402


def small_cnn_layers() -> dict[str, tuple[tuple[int, int, int, int], ConvSpec]]:
    return {
        "conv1": ((3, 3, 1, 32), ConvSpec((28, 28), padding="SAME")),
        "conv2": ((3, 3, 32, 64), ConvSpec((14, 14), padding="SAME")),
    }


def resnet20_layers() -> dict[str, tuple[tuple[int, int, int, int], ConvSpec]]:
    layers = {"conv1": ((3, 3, 3, 16), ConvSpec((32, 32), padding="SAME"))}
    c_prev, size = 16, 32
    for stage, channels in enumerate((16, 32, 64)):
        for i in range(6):
            stride = 2 if (i == 0 and stage > 0) else 1
            layers[f"stage{stage}_conv{i}"] = (
                (3, 3, c_prev, channels), ConvSpec((size, size), strides=stride, padding="SAME"))
            c_prev = channels
            size //= stride
    return layers


def init_params(layers, key) -> dict[str, jax.Array]:
    params = {}
    for name, (shape, _) in layers.items():
        key, sub = jax.random.split(key)
        fan_in = shape[0] * shape[1] * shape[2]
        params[name] = jax.random.normal(sub, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
    return params


def make_projection(layers, method: str, num_rounds: int, max_norm: float):
    """A jitted ``params -> params`` projecting every kernel; same-shaped layers are vmapped."""
    groups = defaultdict(list)
    for name, (shape, spec) in layers.items():
        groups[(shape, spec)].append(name)

    @jax.jit
    def project(params):
        out, previous = {}, None
        for (_, spec), names in groups.items():
            stacked = jnp.stack([params[n] for n in names])
            if previous is not None:
                # Run the groups one after the other: on XLA:CPU (jaxlib 0.10.2) concurrent
                # batched LAPACK calls can all block the intra-op thread pool waiting for their
                # own sub-tasks: an intermittent deadlock, seen here on 2 cores. A real data
                # dependency orders them (optimization_barrier is removed before scheduling).
                stacked = stacked + jnp.zeros((), stacked.dtype) * previous[(0,) * previous.ndim]
            clip = jax.vmap(lambda k, spec=spec: clip_operator_norm(
                k, spec, max_norm, method=method, num_rounds=num_rounds).kernel)
            previous = clip(stacked)
            for name, kernel in zip(names, previous):
                out[name] = kernel
        return out

    return project


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # Compile and warm up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-rounds", type=int, default=1)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args()

    optimizer = optax.sgd(0.1)

    @jax.jit
    def sgd_step(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    methods = [
        ("certified", args.num_rounds),
        ("certified", 0),
        ("sedghi", args.num_rounds),
        ("dykstra", args.num_rounds),
        ("rescale", 0),
    ]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), float32, "
          f"max_norm={args.max_norm}, median of {args.repeats}")
    print("| kernel set | #convs | method | rounds | projection (ms) | sgd update (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for set_name, layers in (("small_cnn", small_cnn_layers()), ("resnet20", resnet20_layers())):
        params = init_params(layers, jax.random.PRNGKey(0))
        grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
        opt_state = optimizer.init(params)
        t_sgd = median_time(sgd_step, params, opt_state, grads, repeats=args.repeats)
        for method, rounds in methods:
            project = make_projection(layers, method, rounds, args.max_norm)
            t_proj = median_time(project, params, repeats=args.repeats)
            rounds_text = "-" if method == "rescale" else str(rounds)
            print(f"| {set_name} | {len(layers)} | {method} | {rounds_text} | {1e3 * t_proj:.1f} "
                  f"| {1e3 * t_sgd:.3f} | {t_proj / t_sgd:.0f} |", flush=True)


if __name__ == "__main__":
    main()
