"""`train.report`'s host (NumPy / SciPy) operator and spectra against the dense operator (float64).

Ground truth: ``spectra.dense_operator`` (built from the real ``lax.conv_general_dilated``) and
its NumPy SVD, over the shared grid of ``tests/spectra/layers.py`` (k 1/2/3/5, c_in != c_out,
strides, dilation, groups, depthwise, SAME/VALID/FULL/explicit asymmetric/CIRCULAR, non-square
inputs) plus a few layers the grid lacks (patchify, 1x1 strided with asymmetric pads, circular
with a stride not dividing the input).
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from tests.spectra.layers import layer_cases
from tests.spectra.layers import random_kernel
from train import report
from train.report import _host
from train.report import _host_spectra
from train.report import _layers

CASES = layer_cases() + [
    ("patchify_VALID", (2, 2, 3, 4), spectra.ConvSpec((6, 7), 2, "VALID")),
    ("patchify2x3_SAME", (2, 3, 3, 4), spectra.ConvSpec((6, 7), (2, 3), "SAME")),
    ("k1_stride2_explicit", (1, 1, 3, 5), spectra.ConvSpec((7, 6), 2, ((1, 0), (0, 2)))),
    ("k1_groups2_stride2_SAME", (1, 1, 2, 6), spectra.ConvSpec((5, 6), 2, "SAME", 1, 2)),
    ("stride2_CIRCULAR_odd", (3, 3, 2, 3), spectra.ConvSpec((7, 6), 2, "CIRCULAR")),
]
_PARAMS = [(c[0], i) for i, c in enumerate(CASES)]
# The JAX reference of the approximation compiles per shape (~1 s each): a subset covering every
# padding mode, stride, dilation, groups and the circular fallback.
_DENSITY_NAMES = {
    "k1_SAME",
    "k2_nonsquare_in_FULL",
    "k3x2_explicit",
    "k5_VALID",
    "stride2_SAME",
    "dilation2x1_stride2_VALID",
    "groups2_SAME",
    "depthwise_mult2_stride2_SAME",
    "groups2_dilation2_stride2_explicit",
    "depthwise_CIRCULAR",
    "stride2_CIRCULAR_odd",
}
_DENSITY_PARAMS = [p for p in _PARAMS if p[0] in _DENSITY_NAMES]


def _case(index):
    name, kshape, spec = CASES[index]
    kernel = random_kernel(kshape, seed=index)
    dense = np.asarray(spectra.dense_operator(kernel, spec))
    return kernel, spec, dense, np.linalg.svd(dense, compute_uv=False)


def _fft_applies(spec):
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


class HostOperatorTest(parameterized.TestCase):
    @parameterized.named_parameters(*_PARAMS)
    def test_operator_adjoint_and_dense(self, index):
        kernel, spec, dense, _ = _case(index)
        op = _host.ConvOperator(kernel, spec)
        rng = np.random.default_rng(index)
        x = rng.standard_normal((2, *op.input_shape))
        y = rng.standard_normal((2, *op.output_shape))
        ax = _host.conv_numpy(kernel, x, spec)
        np.testing.assert_allclose(
            ax.reshape(2, -1), x.reshape(2, -1) @ dense.T, atol=1e-12 * np.abs(dense).sum()
        )
        aty = _host.conv_transpose_numpy(kernel, y, spec)
        np.testing.assert_allclose(
            aty.reshape(2, -1), y.reshape(2, -1) @ dense, atol=1e-12 * np.abs(dense).sum()
        )
        # <A x, y> = <x, Aᵀ y> (the adjoint of the operator itself, not just of the matrix).
        self.assertAlmostEqual(np.vdot(ax, y) / np.vdot(x, aty), 1.0, delta=1e-12)
        np.testing.assert_allclose(_host.dense_operator_numpy(kernel, spec), dense, atol=1e-13)

    def test_bad_shapes(self):
        _, kshape, spec = CASES[0]
        op = _host.ConvOperator(random_kernel(kshape), spec)
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            op.apply(np.zeros((3, 3, 1)))
        with self.assertRaisesRegex(ValueError, "y must have shape"):
            op.adjoint(np.zeros((3, 3, 1)))
        with self.assertRaisesRegex(ValueError, "initial_vector"):
            _host.lanczos_sigma_max_numpy(random_kernel(kshape), spec, initial_vector=np.ones(3))


class HostSpectraTest(parameterized.TestCase):
    @parameterized.named_parameters(*_PARAMS)
    def test_sigma_max_bounds_and_frobenius(self, index):
        kernel, spec, _, exact = _case(index)
        lanczos = _host.lanczos_sigma_max_numpy(kernel, spec, rtol=1e-10)
        self.assertAlmostEqual(lanczos.value / exact[0], 1.0, delta=1e-8)
        self.assertLessEqual(lanczos.residual, 1e-10)
        # The warm start from the circulant top gives the same value.
        bound, start = _host_spectra.circulant_top_numpy(kernel, spec)
        warm = _host.lanczos_sigma_max_numpy(kernel, spec, rtol=1e-4, initial_vector=start)
        self.assertLessEqual(warm.residual, 1e-4)
        self.assertAlmostEqual(warm.value / exact[0], 1.0, delta=1e-4)
        # Certified upper bounds: >= the exact value everywhere (to rounding).
        self.assertGreaterEqual(bound, exact[0] * (1 - 1e-12))
        self.assertEqual(bound, _host_spectra.circulant_sigma_max_numpy(kernel, spec))
        self.assertGreaterEqual(_host.tap_sum_bound_numpy(kernel, spec), exact[0] * (1 - 1e-12))
        if _fft_applies(spec):  # The circulant bound is then the exact value.
            self.assertAlmostEqual(bound / exact[0], 1.0, delta=1e-12)
        if kernel.shape[:2] == (1, 1):  # tap_sum is exact for 1x1 kernels.
            self.assertAlmostEqual(_host.tap_sum_bound_numpy(kernel, spec) / exact[0], 1, 12)
        frob = _host.frobenius_norm_numpy(kernel, spec)
        self.assertAlmostEqual(frob / np.sqrt(np.sum(exact**2)), 1.0, delta=1e-12)

    @parameterized.named_parameters(*_PARAMS)
    def test_exact_spectra(self, index):
        kernel, spec, dense, exact = _case(index)
        atol = 1e-10 * exact[0]
        if _fft_applies(spec):
            got = _host_spectra.circular_singular_values_numpy(kernel, spec)
            np.testing.assert_allclose(got, exact, atol=atol)
        else:
            with self.assertRaisesRegex(ValueError, "spec="):
                _host_spectra.circular_singular_values_numpy(kernel, spec)
        # Disjoint windows <=> no input pixel is read twice, decided from the dense operator:
        # every column has its nonzeros (for a kernel without zeros) in one output pixel's rows.
        c_out = spec.channels(kernel.shape)[1]
        reads = (np.abs(dense) > 0).reshape(dense.shape[0] // c_out, c_out, -1).any(axis=1)
        read_twice = bool((reads.sum(axis=0) > 1).any())
        # (Circular layers are left to the FFT: disjoint_windows is False for them.)
        disjoint = not read_twice and not spec.is_circular
        self.assertEqual(_host_spectra.disjoint_windows(spec, kernel.shape), disjoint)
        if disjoint:
            got = _host_spectra.block_singular_values(kernel, spec)
            np.testing.assert_allclose(got, exact, atol=atol)
        else:
            with self.assertRaisesRegex(ValueError, "spec="):
                _host_spectra.block_singular_values(kernel, spec)

    @parameterized.named_parameters(*_DENSITY_PARAMS)
    def test_spectral_density_matches_spectra(self, index):
        # An approximation has no ground truth but its definition: the host port must give the
        # values of spectra's (JAX) implementation, which is itself tested against its maths.
        kernel, spec, _, exact = _case(index)
        got = _host_spectra.spectral_density_values_numpy(kernel, spec)
        want = np.asarray(spectra.spectral_density_singular_values(kernel, spec))
        self.assertEqual(got.shape, exact.shape)
        np.testing.assert_allclose(got, want, atol=1e-10 * want[0])


class BackendTest(parameterized.TestCase):
    def test_numpy_and_jax_backends_agree(self):
        names = ("k3_SAME", "stride2_explicit", "k1_VALID", "depthwise_CIRCULAR", "groups2_FULL")
        layers = []
        for i, (name, kshape, spec) in enumerate(CASES):
            if name in names:
                scale = np.random.default_rng(i).uniform(0.5, 2.0, kshape[3])
                layers.append(_layers.ConvLayer(name, random_kernel(kshape, seed=i), spec, scale))
        host = _layers.analyse_convs(layers, max_dense_dim=0, backend="numpy")
        jax_ = _layers.analyse_convs(layers, max_dense_dim=0, backend="jax")
        for layer, h, j in zip(layers, host, jax_):
            exact = np.linalg.svd(
                np.asarray(spectra.dense_operator(layer.kernel, layer.spec)), compute_uv=False
            )
            for r in (h, j):
                self.assertAlmostEqual(r.sigma_max / exact[0], 1.0, delta=1e-8)
                self.assertGreaterEqual(r.upper_bound, exact[0] * (1 - 1e-10))
                self.assertIn(r.sigma_max_method, report.METHOD_KINDS)
            expected = "matrix" if layer.name == "k1_VALID" else j.sigma_max_method
            self.assertEqual(h.sigma_max_method, expected)
            self.assertAlmostEqual(h.bn_folded_sigma_max / j.bn_folded_sigma_max, 1.0, delta=1e-8)
            self.assertAlmostEqual(h.frobenius / j.frobenius, 1.0, delta=1e-12)
        with self.assertRaisesRegex(ValueError, "backend"):
            _layers.analyse_convs(layers, backend="torch")


if __name__ == "__main__":
    absltest.main()
