"""Tests of :mod:`train.lapack_workaround`'s context managers."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from threadpoolctl import threadpool_info

from train import lapack_workaround


def _huge_pages_now() -> bool:
    functions = lapack_workaround._madvise_functions()
    assert functions is not None, "this NumPy has no madvise switch"
    return bool(functions[0]())


class NumpyHugePagesTest(parameterized.TestCase):

    def test_numpy_has_the_switch(self):
        self.assertIsNotNone(lapack_workaround._madvise_functions())

    @parameterized.parameters(True, False)
    def test_sets_then_restores(self, initial):
        _, set_ = lapack_workaround._madvise_functions()
        before = _huge_pages_now()
        try:
            set_(initial)
            for wanted in (True, False):
                with lapack_workaround.numpy_huge_pages(wanted):
                    self.assertEqual(_huge_pages_now(), wanted)
                    x = np.ones(1 << 20)  # Large enough for the advice; values unchanged.
                    self.assertEqual(float(x.sum()), float(1 << 20))
                self.assertEqual(_huge_pages_now(), initial)
            with lapack_workaround.numpy_huge_pages(None):
                self.assertEqual(_huge_pages_now(), initial)
        finally:
            set_(before)

    def test_set_returns_the_previous_setting(self):
        before = _huge_pages_now()
        try:
            self.assertEqual(lapack_workaround.set_numpy_huge_pages(True), before)
            self.assertTrue(_huge_pages_now())
            self.assertTrue(lapack_workaround.set_numpy_huge_pages(False))
            self.assertFalse(_huge_pages_now())
        finally:
            lapack_workaround.set_numpy_huge_pages(before)

    def test_restores_after_an_error(self):
        before = _huge_pages_now()
        with self.assertRaises(RuntimeError):
            with lapack_workaround.numpy_huge_pages(not before):
                raise RuntimeError("inside")
        self.assertEqual(_huge_pages_now(), before)


class LimitBlasThreadsTest(absltest.TestCase):

    def test_limits_blas_then_restores(self):
        def threads():
            return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

        before = threads()
        with lapack_workaround.limit_blas_threads(1):
            self.assertTrue(threads())
            self.assertEqual(set(threads()), {1})
        self.assertEqual(threads()[: len(before)], before)


if __name__ == "__main__":
    absltest.main()
