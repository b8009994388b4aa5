"""`train.report` per layer: every number against the dense operator (float64) on a grid."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
import spectra.numpy as snp
from tests.spectra.layers import exact_singular_values
from tests.spectra.layers import layer_cases
from tests.spectra.layers import random_kernel
from train.report import _layers as layers_mod

# A subset of the shared grid: k 1/2/3/5, c_in != c_out, strides, dilation, groups, depthwise,
# every padding mode (CIRCULAR with and without strides dividing the input), non-square inputs.
_NAMES = {
    "k1_SAME",
    "k2_nonsquare_in_FULL",
    "k3x2_explicit",
    "k5_VALID",
    "stride2_SAME",
    "stride2_CIRCULAR",
    "stride2x1_explicit",
    "dilation2_CIRCULAR",
    "dilation2_SAME",
    "dilation2x1_stride2_VALID",
    "groups2_SAME",
    "depthwise_CIRCULAR",
    "depthwise_mult2_stride2_SAME",
    "groups2_dilation2_stride2_explicit",
}
CASES = [c for c in layer_cases() if c[0] in _NAMES]
# A circular layer whose stride does not divide the input (no exact FFT: Lanczos).
CASES.append(("stride2_CIRCULAR_odd", (3, 3, 2, 3), spectra.ConvSpec((7, 6), 2, "CIRCULAR")))
# A 1x1 layer with strides and pads that some outputs read through ('matrix', σ_max only for the
# folded kernel).
CASES.append(("k1_stride2_pads", (1, 1, 3, 4), spectra.ConvSpec((5, 4), 2, ((1, 0), (0, 1)))))


def _layers():
    layers = []
    for i, (name, kshape, spec) in enumerate(CASES):
        scale = np.random.default_rng(100 + i).uniform(0.2, 3.0, size=kshape[3])
        layers.append(layers_mod.ConvLayer(name, random_kernel(kshape, seed=i), spec, scale))
    return layers


class LayerReportTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        layers = _layers()
        cls.layers = layers
        # max_dense_dim=0: every zero-padded layer goes through Lanczos; 10**6: dense SVD.
        cls.lanczos = layers_mod.analyse_convs(layers, max_dense_dim=0)
        cls.dense = layers_mod.analyse_convs(layers, max_dense_dim=10**6)

    def _check(self, layer, r, exact):
        self.assertAlmostEqual(r.sigma_max / exact[0], 1.0, delta=1e-8)
        # Sound to rounding: the bounds are rounded up by the layer's allowance, so they hold
        # against the float64 dense SVD with no tolerance at all (exact methods included, whose
        # bound equals the computed σ but for the allowance).
        self.assertGreaterEqual(r.upper_bound, exact[0])
        self.assertLess(r.rounding_rtol, 1e-9)
        self.assertIn(r.upper_bound_name, (*spectra.UPPER_BOUNDS, "per_group"))
        lower, upper = r.sigma_max_bracket
        self.assertLessEqual(lower, exact[0])
        self.assertGreaterEqual(upper, exact[0])
        self.assertAlmostEqual(r.frobenius / np.sqrt(np.sum(exact**2)), 1.0, delta=1e-10)
        self.assertAlmostEqual(
            r.stable_rank, np.sum(exact**2) / exact[0] ** 2, delta=1e-7 * r.stable_rank
        )
        flat = np.asarray(layer.kernel).reshape(-1, layer.kernel.shape[-1])
        self.assertAlmostEqual(
            r.reshaped_sigma_max, np.linalg.svd(flat, compute_uv=False)[0], delta=1e-10
        )
        folded = exact_singular_values(layer.kernel * layer.bn_scale, layer.spec)[0]
        self.assertAlmostEqual(r.bn_folded_sigma_max / folded, 1.0, delta=1e-8)
        self.assertGreaterEqual(r.bn_folded_upper_bound, folded)
        self.assertEqual(
            (r.input_shape, r.strides, r.padding, r.groups),
            (
                layer.spec.input_shape,
                layer.spec.strides,
                layer.spec.padding,
                layer.spec.feature_group_count,
            ),
        )
        if r.sigma_min_method is not None:  # exact methods: sigma_min and the whole spectrum.
            self.assertIn(r.sigma_min_method, ("fft", "dense", "matrix"))
            self.assertAlmostEqual(r.sigma_min, exact[-1], delta=1e-9 * exact[0])
            np.testing.assert_allclose(
                r.spectrum, exact[r.spectrum_ranks - 1], atol=1e-9 * exact[0]
            )
            self.assertEqual(r.num_singular_values, exact.size)

    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(CASES)])
    def test_against_dense_operator(self, index):
        layer = self.layers[index]
        exact = exact_singular_values(layer.kernel, layer.spec)
        for r in (self.lanczos[index], self.dense[index]):
            self._check(layer, r, exact)
        expected = "fft" if _fft(layer.spec) else "lanczos"
        if expected == "lanczos" and snp.disjoint_windows(layer.spec, layer.kernel.shape):
            expected = "matrix"  # No input pixel read twice (1x1): exact block SVD.
        got = self.lanczos[index]
        if expected == "lanczos":  # Exact only when the certified bracket closes.
            closed = got.upper_bound <= got.sigma_max * (1 + 1e-4)
            self.assertEqual(got.sigma_max_method, "lanczos" if closed else "lanczos_estimate")
            self.assertEqual(got.sigma_max_certified, closed)
        else:
            self.assertEqual(got.sigma_max_method, expected)
        self.assertEqual(self.dense[index].sigma_max_method, "fft" if _fft(layer.spec) else "dense")
        if expected == "lanczos":
            self.assertLessEqual(self.lanczos[index].sigma_max_residual, 1e-4)
            self.assertEqual(self.lanczos[index].spectrum_method, "spectral_density")
            self.assertIsNone(self.lanczos[index].sigma_min)
        elif expected == "fft":  # Circular, strides dividing the input: the bound is exact.
            self.assertAlmostEqual(self.lanczos[index].upper_bound, exact[0], delta=1e-9)

    @parameterized.named_parameters((n, n) for n in ("stride2_SAME", "groups2_SAME", "k1_SAME"))
    def test_uniform_scale_reuses_the_layer(self, name):
        # A per-channel scale of one magnitude (signs flipped): the folded layer's numbers are
        # |c| times the layer's, checked against the folded kernel's dense operator.
        _, kshape, spec = next(c for c in CASES if c[0] == name)
        signs = np.where(np.random.default_rng(1).random(kshape[3]) < 0.5, -1.0, 1.0)
        layer = layers_mod.ConvLayer(name, random_kernel(kshape, seed=5), spec, 0.7 * signs)
        (r,) = layers_mod.analyse_convs([layer], max_dense_dim=0)
        folded = exact_singular_values(layer.kernel * layer.bn_scale, spec)[0]
        self.assertAlmostEqual(r.bn_folded_sigma_max / folded, 1.0, delta=1e-8)
        self.assertAlmostEqual(r.bn_folded_sigma_max, 0.7 * r.sigma_max, delta=1e-12)
        self.assertGreaterEqual(r.bn_folded_upper_bound, folded * (1 - 1e-10))
        self.assertIsNone(layers_mod.uniform_scale(np.array([1.0, -2.0])))
        self.assertEqual(layers_mod.uniform_scale(np.array([-2.0, 2.0])), 2.0)

    def test_one_by_one_reading_only_pads(self):
        # Every output of this 1x1 layer reads padding: the operator (and its folded one) is 0.
        spec = spectra.ConvSpec((1, 1), 2, ((1, 1), (1, 1)))
        kernel = random_kernel((1, 1, 2, 3), seed=2)
        self.assertEqual(np.abs(exact_singular_values(kernel, spec)).max(), 0.0)
        layer = layers_mod.ConvLayer("pads", kernel, spec, np.array([0.5, 2.0, 1.5]))
        (r,) = layers_mod.analyse_convs([layer], max_dense_dim=0)
        self.assertEqual((r.sigma_max_method, r.sigma_max, r.bn_folded_sigma_max), ("matrix", 0, 0))
        self.assertGreaterEqual(r.bn_folded_upper_bound, 0.0)

    def test_dense_layer(self):
        w = random_kernel((5, 3), seed=3)
        r = layers_mod.analyse_dense("head", w)
        sv = np.linalg.svd(w, compute_uv=False)
        self.assertAlmostEqual(r.sigma_max, sv[0], delta=1e-12)
        self.assertAlmostEqual(r.sigma_min, sv[-1], delta=1e-12)
        self.assertAlmostEqual(r.frobenius, np.linalg.norm(w), delta=1e-12)

    def test_float32_lanczos_residual_within_1e4(self):
        name, kshape, spec = next(c for c in CASES if c[0] == "stride2_SAME")
        layer = layers_mod.ConvLayer(name, random_kernel(kshape, dtype=np.float32), spec)
        (r,) = layers_mod.analyse_convs([layer], max_dense_dim=0)
        exact = exact_singular_values(layer.kernel, spec)[0]
        self.assertLessEqual(r.sigma_max_residual, 1e-4)
        self.assertAlmostEqual(r.sigma_max / exact, 1.0, delta=1e-4)
        self.assertGreaterEqual(r.upper_bound, exact * (1 - 1e-5))


def _fft(spec):
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


if __name__ == "__main__":
    absltest.main()
