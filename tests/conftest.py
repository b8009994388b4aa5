"""Test-suite set-up.

* float64 is enabled for ground-truth comparisons (tests that check float32 behaviour create
  float32 arrays explicitly). Docstring examples (``--doctest-modules``) run under JAX's default
  float32 instead: see the root ``conftest.py``.
* BLAS runs single-threaded: after JAX has started its own thread pool, a multi-threaded
  OpenBLAS makes small ``np.linalg.svd`` calls ~100x slower on a 2-core machine.
* XLA:CPU's concurrency-optimised scheduler is switched off (``avoid_cpu_lapack_deadlock``).
* NumPy's transparent-huge-page advice is off (``train.lapack_workaround.set_numpy_huge_pages``):
  on the 2-core CI VMs it made first-touched memory ~15x slower.
* Compiled programs are freed after every test module (:func:`spectra.clear_caches`): each
  XLA:CPU executable keeps memory mappings alive, and the whole suite in one process
  (``python -m pytest -p no:cacheprovider``, no ``-n``) otherwise passes the kernel's
  ``vm.max_map_count`` (65,530) and segfaults inside XLA compilation.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from train.lapack_workaround import avoid_cpu_lapack_deadlock  # noqa: E402
from train.lapack_workaround import set_numpy_huge_pages  # noqa: E402

avoid_cpu_lapack_deadlock()  # Before JAX starts: see its docstring (XLA:CPU LAPACK deadlock).
set_numpy_huge_pages(False)

import jax  # noqa: E402

import spectra  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_runtest_teardown(item, nextitem):
    """Frees the compiled programs after the last test of each module (see the module doc)."""
    if nextitem is None or nextitem.path != item.path:
        spectra.clear_caches()
