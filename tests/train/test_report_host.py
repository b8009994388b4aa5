"""`train.report`'s two per-layer backends, and grouped layers, against the dense operator.

The host maths itself (``spectra.numpy``) is tested in ``tests/spectra/test_numpy.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import spectra
import spectra.numpy as snp
from spectra import ConvSpec
from tests.spectra.layers import exact_singular_values
from tests.spectra.layers import layer_cases
from tests.spectra.layers import random_kernel
from train import report
from train.report import _layers

CASES = layer_cases()

# A depthwise 3x3 SAME conv on a 6x6 input, 6 channels, whose circulant embedding's top (the
# Lanczos warm start) lies in group 2 while the largest group σ_max is group 4's (found by a
# search over seeds; checked in the test).
_DEPTHWISE = (3, 3, 1, 6)
_DEPTHWISE_SPEC = ConvSpec((6, 6), 1, "SAME", 1, 6)
_DEPTHWISE_SEED = 54  # Adversarial for the circulant grid of circulant_embedding (see the test).


class BackendTest(absltest.TestCase):
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
            exact = exact_singular_values(layer.kernel, layer.spec)
            for r in (h, j):
                self.assertAlmostEqual(r.sigma_max / exact[0], 1.0, delta=1e-8)
                self.assertGreaterEqual(r.upper_bound, exact[0] * (1 - 1e-10))
                self.assertIn(r.sigma_max_method, report.METHOD_KINDS)
                self.assertIn(r.upper_bound_name, report.METHOD_KINDS)
                lower, upper = r.sigma_max_bracket
                self.assertLessEqual(lower, exact[0] * (1 + 1e-12))
                self.assertGreaterEqual(upper, exact[0] * (1 - 1e-10))
                # Exact only by construction or when the certified bracket closes.
                closed = upper <= lower * (1 + 1e-4)
                self.assertEqual(r.sigma_max_certified, closed)
                if r.sigma_max_method.startswith("lanczos"):
                    self.assertEqual(r.sigma_max_method == "lanczos", closed)
            expected = "matrix" if layer.name == "k1_VALID" else j.sigma_max_method
            iterative = expected.startswith("lanczos")
            self.assertEqual(h.sigma_max_method.startswith("lanczos"), iterative)
            if not iterative:
                self.assertEqual(h.sigma_max_method, expected)
            self.assertAlmostEqual(h.bn_folded_sigma_max / j.bn_folded_sigma_max, 1.0, delta=1e-8)
            self.assertAlmostEqual(h.frobenius / j.frobenius, 1.0, delta=1e-12)
        with self.assertRaisesRegex(ValueError, "backend"):
            _layers.analyse_convs(layers, backend="torch")

    def test_grouped_dense_is_per_group(self):
        # 64 depthwise channels on 8x8 (SAME, stride 2): the whole operator is 4096 x 1024, each
        # group's block 16 x 64: dense per group at the default max_dense_dim, exact.
        kernel = random_kernel((3, 3, 1, 64), seed=3)
        spec = ConvSpec((8, 8), 2, "SAME", 1, 64)
        (r,) = _layers.analyse_convs([_layers.ConvLayer("dw", kernel, spec)])
        self.assertEqual(r.sigma_max_method, "dense")
        exact = exact_singular_values(kernel, spec)
        self.assertAlmostEqual(r.sigma_max / exact[0], 1.0, delta=1e-12)
        self.assertAlmostEqual(r.sigma_min, exact[-1], delta=1e-12 * exact[0])
        self.assertTrue(r.sigma_max_certified)
        # Exact to rounding: the bracket is σ widened by the layer's rounding allowance, and
        # holds the dense SVD's value.
        self.assertGreater(r.rounding_rtol, 0.0)
        self.assertLess(r.rounding_rtol, 1e-9)
        lower, upper = r.sigma_max_bracket
        self.assertEqual(upper, snp.round_up(r.sigma_max, r.rounding_rtol))
        self.assertEqual(lower, snp.round_down(r.sigma_max, r.rounding_rtol))
        self.assertLessEqual(lower, exact[0])
        self.assertGreaterEqual(upper, exact[0])


class DepthwiseReportTest(absltest.TestCase):
    def test_network_report_finds_the_largest_group(self):
        kernel = random_kernel(_DEPTHWISE, seed=_DEPTHWISE_SEED)
        top = snp.circulant_top(kernel, _DEPTHWISE_SPEC)
        blocks = snp.ConvOperator(kernel, _DEPTHWISE_SPEC).group_matrices()
        groups = np.array([np.linalg.norm(b, 2) for b in blocks])
        # The case is adversarial: the warm start's group is not the largest, by > 1%.
        warm_group = int(np.argmax(np.abs(top.vector).sum(axis=(0, 1))))
        self.assertEqual(warm_group, int(np.argmax(top.group_bounds)))
        self.assertNotEqual(warm_group, int(np.argmax(groups)))
        self.assertLess(groups[warm_group], groups.max() * 0.99)

        def apply(params, x):
            y = spectra.conv(params["dw"], x[0], _DEPTHWISE_SPEC)
            return jnp.sum(jax.nn.relu(y) * params["head"])

        params = {"dw": jnp.asarray(kernel), "head": jnp.ones((6, 6, 6))}
        x = jnp.zeros((1, 6, 6, 6))
        exact = exact_singular_values(kernel, _DEPTHWISE_SPEC)[0]
        self.assertAlmostEqual(groups.max() / exact, 1.0, delta=1e-12)
        # max_dense_dim=0: the layer goes through Lanczos (warm-started from the circulant top).
        r = report.network_report(apply, params, x, num_points=1, max_dense_dim=0)
        (layer,) = [la for la in r.layers if la.op == "conv"]
        self.assertAlmostEqual(layer.sigma_max / exact, 1.0, delta=1e-6)
        self.assertGreaterEqual(layer.upper_bound, exact * (1 - 1e-12))
        self.assertIn(layer.sigma_max_method, ("lanczos", "lanczos_estimate"))
        lower, upper = layer.sigma_max_bracket
        # The Ritz value rounded down by the rounding allowance, the certified bound.
        self.assertEqual(lower, snp.round_down(layer.sigma_max, layer.rounding_rtol))
        self.assertEqual(upper, layer.upper_bound)
        self.assertEqual(layer.sigma_max_certified, upper <= layer.sigma_max * (1 + 1e-4))
        # At the default max_dense_dim: exact by per-group dense SVD.
        r = report.network_report(apply, params, x, num_points=1)
        (layer,) = [la for la in r.layers if la.op == "conv"]
        self.assertEqual(layer.sigma_max_method, "dense")
        self.assertAlmostEqual(layer.sigma_max / exact, 1.0, delta=1e-12)


if __name__ == "__main__":
    absltest.main()


class FoldedPairTest(absltest.TestCase):
    """A layer and its BatchNorm-folded kernel in one job (one circulant pass for both)."""

    def test_pair_equals_separate_and_bounds_dense(self):
        from unittest import mock

        from spectra.numpy import _fourier

        names = ("k3_SAME", "stride2_explicit", "groups2_FULL", "k1_VALID")
        cases = [c for c in CASES if c[0] in names]
        layers, alone = [], []
        for i, (name, kshape, spec) in enumerate(cases):
            kernel = random_kernel(kshape, seed=40 + i)
            scale = np.random.default_rng(i).uniform(0.3, 1.5, kshape[3])
            layers.append(_layers.ConvLayer(name, kernel, spec, scale))
            folded = np.asarray(kernel, np.float64) * scale
            alone.append(_layers.ConvLayer(name, folded, spec))
        started = []
        for side in (2, 10**9):  # The shared (pruned) pass, and one pass per kernel.
            with mock.patch.object(_fourier, "PRUNE_MIN_SIDE", side):
                paired = _layers.analyse_convs(
                    layers, max_dense_dim=0, on_last_started=lambda: started.append(1)
                )
                separate = _layers.analyse_convs(alone, max_dense_dim=0)
            for layer, p, s in zip(layers, paired, separate):
                folded = layer.kernel * layer.bn_scale
                exact = exact_singular_values(folded, layer.spec)[0]  # Float64 dense operator.
                self.assertAlmostEqual(p.bn_folded_upper_bound / s.upper_bound, 1.0, delta=1e-9)
                self.assertGreaterEqual(p.bn_folded_upper_bound, exact * (1 - 1e-12))
                self.assertLessEqual(p.bn_folded_sigma_max, exact * (1 + 1e-8))
                self.assertAlmostEqual(p.bn_folded_sigma_max / exact, 1.0, delta=1e-4)
                raw = exact_singular_values(layer.kernel, layer.spec)[0]
                self.assertGreaterEqual(p.upper_bound, raw * (1 - 1e-12))
                if layer.kernel.shape[:2] == (1, 1):  # One SVD: spectrum, tap sum, reshaped.
                    self.assertEqual(p.sigma_max_method, "matrix")
                    self.assertAlmostEqual(p.reshaped_sigma_max / p.sigma_max, 1.0, delta=1e-12)
                    self.assertAlmostEqual(p.upper_bound / raw, 1.0, delta=1e-10)
        self.assertEqual(started, [1, 1])  # Once per numpy analysis with the callback.
