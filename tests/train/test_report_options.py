"""`train.report.ReportOptions`: validated once, passed once, the same report as keywords."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from spectra import ConvSpec
from train import report
from train.report import ReportOptions
from train.report import _options

_SPEC = ConvSpec((6, 6), padding="SAME")


def _apply(params, x):
    return jax.nn.relu(spectra.conv(params["w"], x[0], _SPEC))[None]


def _params():
    w = np.random.default_rng(0).standard_normal((3, 3, 2, 2)).astype(np.float32)
    return {"w": jnp.asarray(w)}


class ReportOptionsTest(parameterized.TestCase):

    @parameterized.parameters(
        ("num_points", 0), ("power_iterations", -1), ("power_iterations", 2.0),
        ("ascent_steps", True), ("check_pairs", -1), ("max_dense_dim", None),
        ("power_rtol", -1e-3), ("compute_spectra", 1), ("blas_threads", 0),
        ("tight_max_work", 1.5), ("backend", "torch"), ("lower_bound_budget", "forever"),
        ("lower_bound_budget", -1.0), ("checkpoint_dir", 3), ("lower_bound_share", 0.0),
        ("lower_bound_share", 1.5), ("lower_bound_share", True), ("huge_pages", 0),
    )
    def test_bad_option_is_named(self, name, value):
        with self.assertRaisesRegex(ValueError, f"^{name}="):
            ReportOptions(**{name: value})
        with self.assertRaisesRegex(ValueError, f"^{name}="):
            report.network_report(_apply, _params(), jnp.zeros((1, 6, 6, 2)), **{name: value})

    def test_frozen_hashable_merged(self):
        options = ReportOptions(num_points=2, lower_bound_budget=None)
        self.assertEqual(hash(options), hash(ReportOptions(num_points=2, lower_bound_budget=None)))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            options.num_points = 3
        self.assertIs(ReportOptions.merged(options), options)
        self.assertEqual(ReportOptions.merged(None), ReportOptions())
        self.assertEqual(ReportOptions.merged(options, seed=3).seed, 3)
        self.assertEqual(ReportOptions.merged(options, seed=3).num_points, 2)
        with self.assertRaisesRegex(ValueError, "options must be a ReportOptions"):
            ReportOptions.merged({"num_points": 2})
        self.assertEqual(_options.split_options({"seed": 1, "train": False}),
                         ({"seed": 1}, {"train": False}))

    def test_options_object_and_keywords_give_the_same_report(self):
        # lower_bound_budget=None: only step counts stop the search (reproducible numbers).
        kwargs = dict(num_points=1, power_iterations=5, ascent_steps=3, compute_spectra=False,
                      lower_bound_budget=None, tight_bound=False, overlap_lower_bound=False)
        params, x = _params(), jnp.zeros((1, 6, 6, 2))
        by_keywords = report.network_report(_apply, params, x, **kwargs)
        options = ReportOptions(**kwargs)
        by_object = report.network_report(_apply, params, x, options=options)
        # Keywords override the object's fields.
        mixed = report.network_report(
            _apply, params, x, options=dataclasses.replace(options, num_points=3), num_points=1
        )
        dense = np.asarray(spectra.dense_operator(np.asarray(params["w"], np.float64), _SPEC))
        exact = np.linalg.svd(dense, compute_uv=False)[0]
        for r in (by_keywords, by_object, mixed):
            (layer,) = r.layers
            self.assertAlmostEqual(layer.sigma_max / exact, 1.0, delta=1e-10)
            self.assertGreaterEqual(r.network["lipschitz_upper"], exact * (1 - 1e-12))
            self.assertLessEqual(r.network["lipschitz_lower"], exact * (1 + 1e-5))
            self.assertEqual(layer.spectrum, by_keywords.layers[0].spectrum)
            self.assertEqual(r.network["lipschitz_lower"], by_keywords.network["lipschitz_lower"])
            self.assertEqual(r.network["lipschitz_upper"], by_keywords.network["lipschitz_upper"])


if __name__ == "__main__":
    absltest.main()
