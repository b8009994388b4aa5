"""experiments/certified_robustness.py on its tiny preset."""

import matplotlib

matplotlib.use("Agg")

import dataclasses  # noqa: E402

from absl.testing import absltest  # noqa: E402
from flax.core import FrozenDict  # noqa: E402

from experiments import __main__ as experiments_main  # noqa: E402
from experiments import certified_robustness  # noqa: E402
from tests.experiments import tables  # noqa: E402


class CertifiedRobustnessExperimentTest(absltest.TestCase):
    def test_tiny_preset(self):
        out = tables.tmpdir(self)
        text = certified_robustness.run("test", out)
        self.assertEqual((out / "certified_robustness.md").read_text(), text)
        self.assertGreater((out / "certified_robustness.png").stat().st_size, 0)
        rows = {r[0]: r for r in tables.table_rows(text) if r[0] != "model"}
        self.assertEqual(
            set(rows),
            {"baseline", "Sedghi clip c=1, every 2", "Sedghi clip c=3, every 2",
             "BN-aware clip c=3, every 2", "BatchCentering, clip c=3, every 2",
             "Sedghi clip c=1.5, every 2, adam + margin loss",
             "capped BatchNorm c=1.5, adam + margin loss", "1-Lipschitz LipResNet"})
        for row in rows.values():
            clean, upper, lower, gap = (float(v) for v in row[1:5])
            self.assertGreaterEqual(upper, lower)
            self.assertAlmostEqual(gap, upper / lower, delta=1e-3 * gap)
            certified = [float(v) for v in row[5:8]]
            self.assertEqual(certified, sorted(certified, reverse=True))
            self.assertLessEqual(certified[0], clean)
        # The 1-Lipschitz net's certified bound is its logit scale (4 in the test preset).
        self.assertLessEqual(float(rows["1-Lipschitz LipResNet"][2]), 4.0 * (1 + 1e-5))
        self.assertIn("LiResNet++ 87.0 / 78.1", text)
        # The plain and the BN-aware clip compared at the same c (3).
        self.assertIn("At c = 3: the BN-aware clip's certified network bound is", text)
        self.assertIn("At c = 3: the BatchCentering ResNet's certified network bound is", text)
        self.assertIn("At c = 1.5: the capped-BatchNorm ResNet's certified network bound is",
                      text)
        self.assertFalse(any(out.glob("runs")))

    def test_same_c_pairs_need_the_same_recipe(self):
        # Rows are compared only at the same c with the same optimiser / loss / steps.
        base = certified_robustness.PRESETS["test"]["base"]
        rows = [
            ("plain", dataclasses.replace(base, project_max_norm=3.0), {"upper": 100.0,
                                                                         "clean": 0.9}),
            ("bn", dataclasses.replace(base, project_max_norm=3.0, project_bn_aware=True),
             {"upper": 10.0, "clean": 0.8}),
            ("bn adam", dataclasses.replace(base, project_max_norm=3.0, project_bn_aware=True,
                                            optimizer="adam"), {"upper": 1.0, "clean": 0.8}),
            ("bn c=2", dataclasses.replace(base, project_max_norm=2.0, project_bn_aware=True),
             {"upper": 1.0, "clean": 0.8}),
            ("bn every 5", dataclasses.replace(base, project_max_norm=3.0, project_bn_aware=True,
                                               project_every=5), {"upper": 1.0, "clean": 0.8}),
            # The capped row is not projected during training: paired across project_every.
            ("capped", dataclasses.replace(
                base, project_max_norm=3.0, project_bn_aware=True, project_every=10**6,
                model_kwargs=FrozenDict(norm="capped", cap=3.0)), {"upper": 4.0, "clean": 0.85}),
        ]
        text = certified_robustness._same_c_summary(rows)
        self.assertEqual(
            text,
            "At c = 3: the BN-aware clip's certified network bound is 10 × lower than the "
            "plain clip's (10 vs 100); test error 20.00% vs 10.00%.\n"
            "At c = 3: the capped-BatchNorm ResNet's certified network bound is 25 × lower than "
            "the plain clip's (4 vs 100); test error 15.00% vs 10.00%.\n")

    def test_registered(self):
        self.assertIn("certified_robustness", experiments_main.EXPERIMENTS)


if __name__ == "__main__":
    absltest.main()
