"""Test-suite set-up.

* float64 is enabled for ground-truth comparisons (tests that check float32 behaviour create
  float32 arrays explicitly).
* BLAS runs single-threaded: after JAX has started its own thread pool, a multi-threaded
  OpenBLAS makes small ``np.linalg.svd`` calls ~100x slower on a 2-core machine.
* XLA:CPU's concurrency-optimised scheduler is switched off (``avoid_cpu_lapack_deadlock``).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from train.loop import avoid_cpu_lapack_deadlock  # noqa: E402

avoid_cpu_lapack_deadlock()  # Before JAX starts: see its docstring (XLA:CPU LAPACK deadlock).

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
