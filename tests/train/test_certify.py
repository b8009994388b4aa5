"""`train.certify`: certified params against the dense SVD (float64) over the layer grid, the
report's bounds >= exact, untouched layers, float32 params, metadata and errors."""

import json

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from tests.spectra import layers
from train.certify import CertificationReport
from train.certify import certified_upper_bound
from train.certify import certify_conv_operator_norm
from train.transforms import CERTIFIED_METHODS

_TAGS = ("k1", "k3x2", "stride2", "dilation2x1_stride2", "groups2", "depthwise_mult2_stride2")


def grid():
    """Shapes of the shared grid, two paddings each in turn (every padding mode appears with
    strides, dilation and groups; circular only with strides dividing the input)."""
    paddings = ("CIRCULAR", "SAME", "VALID", "FULL", "explicit")
    wanted = {f"{t}_{paddings[(i + j) % len(paddings)]}" for i, t in enumerate(_TAGS)
              for j in (0, 2)}
    return {name: (kshape, spec) for name, kshape, spec in layers.layer_cases()
            if name in wanted}


def exact_norm(kernel, spec) -> float:
    return float(layers.exact_singular_values(kernel, spec)[0])


class CertifyTest(parameterized.TestCase):

    @parameterized.parameters(*CERTIFIED_METHODS)
    def test_grid_is_certified_and_bounds_hold(self, method):
        cases = grid()
        params, specs, max_norm, exact_in = {}, {}, {}, {}
        for i, (name, (kshape, spec)) in enumerate(cases.items()):
            kernel = layers.random_kernel(kshape, seed=i)
            exact_in[name] = exact_norm(kernel, spec)
            # Even layers well outside the ball, odd ones well inside the circular ball.
            radius = 0.5 * exact_in[name] if i % 2 == 0 else 2.0 * certified_upper_bound(
                kernel, spec)
            params[name], specs[name], max_norm[name] = jnp.asarray(kernel), spec, radius
        params["bias"], specs["bias"], max_norm["bias"] = jnp.ones(3), None, 0.0
        new, report = certify_conv_operator_norm(params, specs, max_norm, method=method)
        self.assertIsInstance(report, CertificationReport)
        self.assertEqual(report.method, method)
        self.assertEqual(report.layers, tuple(f"['{n}']" for n in sorted(cases)))
        np.testing.assert_array_equal(new["bias"], params["bias"])
        for j, name in enumerate(sorted(cases)):
            spec, c = specs[name], max_norm[name]
            exact = exact_norm(new[name], spec)
            self.assertLessEqual(exact, c * (1 + 1e-4), name)
            bound = report.upper_bounds[j]
            self.assertGreaterEqual(bound, exact * (1 - 1e-12), name)  # A real upper bound.
            if spec.is_circular:  # Exact there.
                self.assertAlmostEqual(bound, exact, delta=1e-9 * exact)
            inside = list(cases).index(name) % 2 == 1
            self.assertEqual(report.changed[j], not inside, name)
            if inside:
                np.testing.assert_array_equal(new[name], params[name])
            else:
                self.assertLess(exact, 0.6 * exact_in[name])
            self.assertEqual(report.max_norms[j], c)
        self.assertTrue(report.certified)
        self.assertTrue(report.any_changed)
        self.assertEqual(report.max_upper_bound, max(report.upper_bounds))
        self.assertLessEqual(report.max_ratio, 1 + 1e-4)
        meta = json.loads(json.dumps(report.as_metadata()))
        self.assertIs(meta["certified"], True)
        self.assertEqual(len(meta["certified_layers"]), len(cases))

    def test_float32_params_scalar_radius(self):
        spec = spectra.ConvSpec((8, 8), padding="SAME")
        kernel = layers.random_kernel((3, 3, 4, 4), seed=1, dtype=np.float32)
        params = {"a": jnp.asarray(kernel), "b": jnp.asarray(kernel)}
        new, report = certify_conv_operator_norm(params, {"a": spec, "b": spec}, 1.0)
        for name in params:
            self.assertEqual(new[name].dtype, jnp.float32)
            self.assertLessEqual(exact_norm(new[name], spec), 1 + 1e-4)
        self.assertTrue(report.certified)
        self.assertEqual(report.max_norms, (1.0, 1.0))

    def test_not_certified_when_the_bound_exceeds(self):
        report = CertificationReport("certified", ("a",), (1.0,), (1.001,), (True,), 1e-4)
        self.assertFalse(report.certified)
        self.assertFalse(report.as_metadata()["certified"])

    @parameterized.named_parameters(
        ("method_approximate", dict(method="sedghi"), "method"),
        ("method_power", dict(method="power"), "method"),
        ("tolerance", dict(tolerance=-1.0), "tolerance"),
    )
    def test_bad_options(self, kwargs, name):
        params = {"w": jnp.ones((3, 3, 2, 2))}
        with self.assertRaisesRegex(ValueError, name):
            certify_conv_operator_norm(params, {"w": spectra.ConvSpec((8, 8))}, 1.0, **kwargs)

    def test_bad_max_norm(self):
        params = {"w": jnp.ones((3, 3, 2, 2))}
        with self.assertRaisesRegex(ValueError, "max_norm"):
            certify_conv_operator_norm(params, {"w": spectra.ConvSpec((8, 8))}, -1.0)


if __name__ == "__main__":
    absltest.main()
