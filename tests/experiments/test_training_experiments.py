"""The training experiments (sedghi_training, yi_training, layer_spectra) on their tiny presets."""

import pathlib

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from absl.testing import absltest  # noqa: E402

from experiments import layer_spectra  # noqa: E402
from experiments import sedghi_training  # noqa: E402
from experiments import yi_training  # noqa: E402
from tests.experiments import tables  # noqa: E402
from train import loop  # noqa: E402


def _check_outputs(test, out: pathlib.Path, name: str, text: str) -> None:
    test.assertEqual((out / f"{name}.md").read_text(), text)
    test.assertGreater((out / f"{name}.png").stat().st_size, 0)
    test.assertIn(f"({name}.png)", text)


class TrainingExperimentsTest(absltest.TestCase):

    def test_sedghi_training(self):
        out = tables.tmpdir(self)
        text = sedghi_training.run("test", out)
        _check_outputs(self, out, "sedghi_training", text)
        rows = {r[0]: r for r in tables.table_rows(text)}
        self.assertEqual(set(rows) - {"run"}, {"baseline", "certified c=1, every 2"})
        self.assertEqual(rows["certified c=1, every 2"][1], "certified, c=1")
        error = float(rows["baseline"][4].split("±")[0])
        self.assertTrue(0 <= error <= 100)
        self.assertIn("6.2% → 5.3%", text)  # The paper's number, quoted as a reference.
        self.assertFalse(any(out.glob("runs")))  # Quick/test run folders are temporary.

    def test_yi_training(self):
        out = tables.tmpdir(self)
        text = yi_training.run("test", out)
        _check_outputs(self, out, "yi_training", text)
        rows = tables.table_rows(text)
        self.assertIn(["0 (baseline)", "-", "1"], [r[:3] for r in rows])
        self.assertIn(["0.01", "gram_iteration", "1"], [r[:3] for r in rows])
        layer_rows = [r for r in rows if r[0].startswith(("conv", "blocks"))]
        self.assertEqual([r[0] for r in layer_rows][0], "conv")  # Depth order: stem first.
        self.assertLen(layer_rows, 7)

    def test_layer_spectra_from_a_checkpoint(self):
        config = sedghi_training.TEST_BASE
        run_dir = tables.tmpdir(self) / "run"
        result = loop.train_and_evaluate(config, run_dir)
        out = tables.tmpdir(self)
        text = layer_spectra.run("test", out, run_dir=run_dir)
        _check_outputs(self, out, "layer_spectra", text)
        rows = [r for r in tables.table_rows(text) if r[0] == "run"]
        self.assertLen(rows, 7)
        self.assertEqual(rows[0][1], "conv")
        self.assertTrue(all(r[5] == "dense (exact)" for r in rows))
        # The checkpoint's exact spectra agree with the σ_max the loop measured at the end.
        for r in rows:
            np.testing.assert_allclose(
                float(r[7]), result["sigma_max"][f"{r[1]}.kernel"], rtol=2e-3
            )
        self.assertEqual(int(rows[0][6]), 12 * 12)  # 1 -> 8 channels at 12x12: 144 values.

    def test_layer_spectra_trains_when_no_checkpoint(self):
        out = tables.tmpdir(self)
        text = layer_spectra.run("test", out)
        _check_outputs(self, out, "layer_spectra", text)
        self.assertLen([r for r in tables.table_rows(text) if r[0] == "baseline"], 7)


if __name__ == "__main__":
    absltest.main()
