"""pytest set-up shared by the tests and the docstring examples (``--doctest-modules``).

Docstring examples are documentation: they run under JAX's default float32 (what a user who
copies them gets), even in a process where ``tests/conftest.py`` enabled float64 for the
ground-truth tests. Compiled programs are freed after each module's examples, as after each
test module (``tests/conftest.py``).

The whole suite compiles with XLA:CPU's backend optimisation level 0
(``--xla_backend_optimization_level=0``, :data:`tests.xla_flags.FAST_COMPILE`), set here before
the backend starts. Test workloads are tiny and their time is almost all compilation; the
level changes the machine code generated for a program, not the program, so results agree to
rounding (measured: spectra tests -37% time, ``tests/train/test_loop.py`` 170 s -> 136 s, every
assertion unchanged). A level already given in ``XLA_FLAGS`` is kept (e.g.
``XLA_FLAGS=--xla_backend_optimization_level=2`` to test the default code generation).
"""

import os

from tests.xla_flags import with_flags

os.environ["XLA_FLAGS"] = with_flags(os.environ)["XLA_FLAGS"]

import jax  # noqa: E402
import pytest  # noqa: E402

import spectra  # noqa: E402


@pytest.fixture(autouse=True)
def _docstring_examples_in_float32(request):
    """Runs each doctest item with ``jax_enable_x64`` off; other tests are left as they are."""
    if isinstance(request.node, pytest.DoctestItem):
        with jax.enable_x64(False):
            yield
    else:
        yield


def pytest_runtest_teardown(item, nextitem):
    """Frees compiled programs after the last docstring example of each module."""
    if isinstance(item, pytest.DoctestItem) and (nextitem is None or nextitem.path != item.path):
        spectra.clear_caches()
