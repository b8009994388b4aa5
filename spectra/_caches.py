"""Freeing compiled programs in long-running processes: :func:`clear_caches`."""

from __future__ import annotations

import sys

import jax


def clear_caches() -> None:
    """Frees every compiled XLA program and trace cache held by JAX and by ``spectra``.

    Every function of ``spectra`` compiles one XLA program per distinct static configuration
    (kernel shape and dtype, :class:`~spectra.ConvSpec`, method, ...) and JAX keeps each one
    alive for the life of the process. On CPU every compiled executable holds several memory
    mappings, and Linux caps a process at ``vm.max_map_count`` of them (65,530 by default):
    a process that compiles many thousands of distinct programs (a sweep over layer shapes, a
    notebook left running, a whole test suite in one process) then fails inside XLA, which
    cannot raise a Python error there and ends with a segmentation fault.

    Call this between independent workloads (e.g. after each layer shape of a sweep, or each
    experiment): it calls :func:`jax.clear_caches` and empties the ``functools`` caches of
    ``spectra``'s modules. Nothing numerical changes; the next call of a function recompiles
    its program (seconds for large layers). Arrays, models and optimiser states are kept.

    Example:
      >>> import jax.numpy as jnp
      >>> import spectra
      >>> spec = spectra.ConvSpec((8, 8), padding="CIRCULAR")
      >>> before = float(spectra.spectral_norm(jnp.ones((3, 3, 1, 1)), spec))
      >>> spectra.clear_caches()
      >>> float(spectra.spectral_norm(jnp.ones((3, 3, 1, 1)), spec)) == before
      True
    """
    jax.clear_caches()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "spectra" or name.startswith("spectra.")):
            continue
        for value in list(vars(module).values()):
            cache_clear = getattr(value, "cache_clear", None)
            if callable(cache_clear) and hasattr(value, "cache_info"):  # functools caches.
                cache_clear()
