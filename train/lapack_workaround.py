"""CPU LAPACK work-arounds: a deadlock of jax 0.10's XLA:CPU, and BLAS thread oversubscription.

Entry points (the training CLI, the experiment scripts, tests and benchmarks that run the
projection or exact spectra) call :func:`avoid_cpu_lapack_deadlock` before the first JAX
computation of the process. :func:`limit_blas_threads` limits the BLAS/LAPACK threads of NumPy
and of XLA:CPU's SVD/eigh for a block of code; :func:`numpy_huge_pages` switches NumPy's
transparent-huge-page advice off for a block of code.
"""

import contextlib
import os

#: XLA flag that avoids a CPU deadlock of jax 0.10 (see :func:`avoid_cpu_lapack_deadlock`).
CPU_DEADLOCK_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_cpu_lapack_deadlock() -> bool:
    """Adds :data:`CPU_DEADLOCK_FLAG` to ``XLA_FLAGS`` if the JAX backend has not started yet.

    jax/jaxlib 0.10 run batched LAPACK calls (SVD, eigh) on XLA:CPU's intra-op thread pool
    (``ParallelBatchMap``) from thunks that themselves occupy the pool's threads; when as many
    independent batched LAPACK calls run concurrently as the pool has threads (2 on a 2-core
    machine), every worker waits for sub-tasks that no free thread can run: the jitted step hangs
    (seen with ``project_conv_operator_norm`` on several layers every step; jax issue reports:
    ffsim PR 684, PyAutoFit issue 1530). Disabling the concurrency-optimised scheduler makes
    XLA reuse buffers between such calls, which orders them; it is a workaround, not a proof.
    Call before the first JAX computation (it is read when the CPU backend starts).

    Returns:
      True when the flag is (now) in ``XLA_FLAGS`` before the backend started, False when the
      backend was already running (nothing can be changed then).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEADLOCK_FLAG.split("=")[0] in flags:
        return True
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_DEADLOCK_FLAG}".strip()
    return True


def limit_blas_threads(threads: int | None = 1) -> contextlib.AbstractContextManager:
    """A context manager limiting BLAS/LAPACK to ``threads`` threads (``None``: unchanged).

    On a shared 2-core machine, multi-threaded OpenBLAS made small LAPACK calls 10-1000x slower
    (spin-waiting threads; measured: batched SVDs of 64-channel ResNet layers 26 s vs 2.5 s).
    ``threadpoolctl`` limits the libraries already loaded: NumPy's OpenBLAS, and SciPy's, which
    XLA:CPU's LAPACK kernels call (``jaxlib`` takes them from ``scipy.linalg.cython_lapack``),
    loaded by importing ``scipy.linalg`` rather than by running a JAX program. The imports are
    here, not at module level: the entry points that only need :func:`avoid_cpu_lapack_deadlock`
    do not load SciPy.
    """
    if threads is None:
        return contextlib.nullcontext()
    import numpy as np
    import scipy.linalg  # noqa: F401 - loads the LAPACK that XLA:CPU calls.
    from threadpoolctl import threadpool_limits

    np.linalg.svd(np.eye(2), compute_uv=False)  # Loads NumPy's BLAS.
    return threadpool_limits(limits=threads)


def _madvise_functions():
    """NumPy's private getter and setter of its ``madvise(MADV_HUGEPAGE)`` switch, or ``None``."""
    import numpy as np

    for owner in ("_core", "core"):  # NumPy 2 names the package ``_core``, NumPy 1 ``core``.
        multiarray = getattr(getattr(np, owner, None), "multiarray", None)
        get = getattr(multiarray, "_get_madvise_hugepage", None)
        set_ = getattr(multiarray, "_set_madvise_hugepage", None)
        if get is not None and set_ is not None:
            return get, set_
    return None


def set_numpy_huge_pages(enabled: bool) -> bool | None:
    """Sets NumPy's transparent-huge-page advice (see :func:`numpy_huge_pages`) for the rest of
    the process; returns the previous setting (``None``: this NumPy has no switch, nothing
    changed). For entry points (the experiment runner, the test session)."""
    functions = _madvise_functions()
    if functions is None:
        return None
    get, set_ = functions
    previous = bool(get())
    set_(bool(enabled))
    return previous


@contextlib.contextmanager
def numpy_huge_pages(enabled: bool | None = False):
    """A context manager setting whether NumPy advises the kernel to back its large arrays with
    transparent huge pages (``madvise(MADV_HUGEPAGE)``, NumPy's default on Linux; the same switch
    as the ``NUMPY_MADVISE_HUGEPAGE`` environment variable). ``None``: unchanged. The previous
    setting is restored on exit. The switch is process-wide: other threads see it meanwhile.

    Why off: on the 2-core VMs this project is measured on (transparent huge pages in
    ``madvise`` mode, synchronous compaction), the first touch of fresh memory cost ~10 ms per MB
    with the advice and ~0.6 ms per MB without (500 MB: 4.9 s against 0.3 s; freed memory is
    handed back to the host within seconds, so it is "fresh" again). The per-layer report
    allocates GBs of short-lived complex matrices: WideResNet-50-2 @96² 51.9 s with the advice,
    39.3 s without (``benchmarks/bench_report.py --large``). The arithmetic is unchanged.
    A NumPy without the (private) switch: no-op.
    """
    previous = None if enabled is None else set_numpy_huge_pages(enabled)
    try:
        yield
    finally:
        if previous is not None:
            set_numpy_huge_pages(previous)
