"""The svd_training experiment (Yang et al. 2020) on its tiny test preset, end to end."""


import matplotlib

matplotlib.use("Agg")

from absl.testing import absltest  # noqa: E402

from experiments import svd_training  # noqa: E402
from tests.experiments import tables  # noqa: E402


class SVDTrainingExperimentTest(absltest.TestCase):

    def test_test_preset(self):
        out = tables.tmpdir(self)
        text = svd_training.run("test", out)
        self.assertEqual((out / "svd_training.md").read_text(), text)
        self.assertGreater((out / "svd_training.png").stat().st_size, 0)
        self.assertIn("(svd_training.png)", text)
        self.assertFalse(any(out.glob("runs")))  # Test/quick run folders are temporary.
        rows = [r for r in tables.table_rows(text) if r[0] != "model"]
        header = list(svd_training.HEADERS)
        self.assertTrue(all(len(r) == len(header) for r in rows))
        col = {name: i for i, name in enumerate(header)}
        baseline = [r for r in rows if r[col["decomposition"]] == "none (baseline)"]
        self.assertLen(baseline, 1)
        self.assertEqual(baseline[0][col["%FLOPs reduction"]], "0.0")
        # Per variant: the full-rank row, then one row per energy.
        for decomposition, sparsity, weight in svd_training.PRESETS["test"]["models"][0][1]:
            mine = [r for r in rows if r[col["decomposition"]] == decomposition
                    and r[col["sparsity"]] == sparsity]
            self.assertEqual([r[col["e"]] for r in mine], ["- (full rank)", "0.1"])
            self.assertEqual(mine[0][col["λ_s"]], f"{weight:g}")
            full, pruned = mine
            self.assertEqual(full[col["mean kept rank fraction"]], "1.000")
            self.assertLess(int(pruned[col["params"]]), int(full[col["params"]]))
            self.assertLess(int(pruned[col["MACs / example"]]), int(full[col["MACs / example"]]))
            # %FLOPs reduction is recomputed from the MACs column and the baseline's.
            base_macs = int(baseline[0][col["MACs / example"]])
            for r in mine:
                expected = 100 * (1 - int(r[col["MACs / example"]]) / base_macs)
                self.assertAlmostEqual(float(r[col["%FLOPs reduction"]]), expected, delta=0.051)
            fraction = float(pruned[col["mean kept rank fraction"]])
            self.assertTrue(0 < fraction < 1)
            for name in ("test acc % (pruned)", "test acc % (pruned + BN recal.)",
                         "test acc % (final)"):
                self.assertTrue(0 <= float(pruned[col[name]]) <= 100)
            # The SimpleCNN has no BatchNorm: recalibration changes nothing.
            self.assertEqual(pruned[col["test acc % (pruned)"]],
                             pruned[col["test acc % (pruned + BN recal.)"]])
            self.assertEqual(full[col["test acc % (pruned + BN recal.)"]], "-")

    def test_unknown_preset(self):
        with self.assertRaisesRegex(ValueError, "preset='huge'"):
            svd_training.run("huge", tables.tmpdir(self))

    def test_paper_preset_uses_released_weights(self):
        paper = svd_training.PRESETS["paper"]
        self.assertEqual([m for m, _ in paper["models"]],
                         ["resnet20", "resnet32", "resnet56", "resnet110"])
        resnet20 = dict(((d, s), w) for d, s, w in paper["models"][0][1])
        self.assertEqual(resnet20, {("channel", "l1"): 0.3, ("channel", "hoyer"): 0.07,
                                    ("spatial", "l1"): 0.3, ("spatial", "hoyer"): 0.1})
        base = paper["base"]
        self.assertEqual((base.optimizer, base.lr, base.batch_size, base.num_steps),
                         ("adam", 1e-3, 100, 164 * 500))
        self.assertEqual(base.orth_weight, 1.0)


if __name__ == "__main__":
    absltest.main()
