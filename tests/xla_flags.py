"""XLA flags for the test subprocesses (their XLA is configured before JAX starts).

:data:`FAST_COMPILE` sets XLA:CPU's LLVM optimisation level to 0. Test workloads are tiny and
their time is almost all compilation: the 6-step ResNet-8 run of
``tests/train/distributed_worker.py reference`` took 23.8 s of CPU at the default level and
8.2 s at level 0 (measured, jax 0.10.2), with the same losses to float32 rounding (~1e-7
relative: the code generated for the same program differs, not the program). Every assertion of
the tests is unchanged. The root ``conftest.py`` sets it for the test processes too.

Level 0 is slow to *run* heavy arithmetic, though: Lanczos and a float64 power iteration on a
256-channel YOLOv8n conv ran 20x slower (190 s vs 9.4 s, measured). Tests that compute on real
network sizes run in a subprocess with :func:`optimised` flags instead.
"""

import re

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_flags(env: dict[str, str], *flags: str) -> dict[str, str]:
    """``env`` (a copy) with ``flags`` and :data:`FAST_COMPILE` appended to ``XLA_FLAGS``; an
    optimisation level already in ``XLA_FLAGS`` is kept (``FAST_COMPILE`` is then left out)."""
    env = dict(env)
    current = env.get("XLA_FLAGS", "")
    fast = [] if FAST_COMPILE.split("=")[0] in current else [FAST_COMPILE]
    env["XLA_FLAGS"] = " ".join([current, *flags, *fast]).strip()
    return env


def optimised(env: dict[str, str]) -> dict[str, str]:
    """``env`` (a copy) with XLA's default optimisation level (``FAST_COMPILE`` removed)."""
    env = dict(env)
    flags = re.sub(r"--xla_backend_optimization_level=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(flags.split())
    return env


__all__ = ["FAST_COMPILE", "optimised", "with_flags"]
