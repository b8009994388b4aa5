"""pytest set-up shared by the tests and the docstring examples (``--doctest-modules``).

Docstring examples are documentation: they run under JAX's default float32 (what a user who
copies them gets), even in a process where ``tests/conftest.py`` enabled float64 for the
ground-truth tests. Compiled programs are freed after each module's examples, as after each
test module (``tests/conftest.py``).
"""

import jax
import pytest

import spectra


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
