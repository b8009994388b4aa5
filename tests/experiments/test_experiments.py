"""Tests of the experiment scripts (tiny "test" presets) and of ``python -m experiments``."""

import importlib
import pathlib
import shutil
import tempfile
from unittest import mock

import matplotlib

matplotlib.use("Agg")

from absl.testing import absltest  # noqa: E402
from absl.testing import parameterized  # noqa: E402

from experiments import _report  # noqa: E402
from experiments import sedghi_timing  # noqa: E402
from tests.experiments import tables  # noqa: E402
from train.config import TrainConfig  # noqa: E402

experiments_main = importlib.import_module("experiments.__main__")




class RunVariantsTest(absltest.TestCase):
    """The variants × seeds skeleton, with a recording stand-in for training."""

    def test_order_configs_and_temporary_root(self):
        base = TrainConfig(width=4, num_steps=2)
        calls, roots = [], set()

        def run_one(config, root, seed):
            calls.append((config.project_max_norm, config.seed, seed))
            roots.add(root)
            self.assertTrue(root.is_dir())
            return 10 * seed

        variants = [("baseline", {}), ("c=1", dict(project_max_norm=1.0))]
        out = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        results = _report.run_variants("test", out, base, variants, (3, 5), run_one)
        self.assertEqual(calls, [(None, 3, 3), (None, 5, 5), (1.0, 3, 3), (1.0, 5, 5)])
        self.assertEqual(
            results, [("baseline", {}, [30, 50]), ("c=1", dict(project_max_norm=1.0), [30, 50])]
        )
        (root,) = roots
        self.assertFalse(root.exists())  # Temporary for quick/test presets.
        self.assertFalse((out / "runs").exists())
        self.assertEqual(_report.fmt_or_dash(None), "—")
        self.assertEqual(_report.fmt_or_dash(1.234567), "1.235")


class SedghiTimingTest(absltest.TestCase):
    def test_test_preset_writes_table_and_plot(self):
        out = tables.tmpdir(self)
        text = sedghi_timing.run("test", out)
        md, png = out / "sedghi_timing.md", out / "sedghi_timing.png"
        self.assertTrue(md.is_file())
        self.assertTrue(png.is_file())
        self.assertGreater(png.stat().st_size, 0)
        self.assertEqual(md.read_text(), text)
        self.assertIn("![", text)
        self.assertIn("(sedghi_timing.png)", text)

        config = sedghi_timing.PRESETS["test"]
        channels = [r for r in tables.table_rows(text) if r[0] == "channels"]
        sizes = [r for r in tables.table_rows(text) if r[0] == "input size"]
        large = [r for r in tables.table_rows(text) if r[0] == "large kernel"]
        self.assertEqual([int(r[2]) for r in channels], list(config["channels"]))
        self.assertEqual([int(r[3]) for r in sizes], list(config["sizes"]))
        self.assertEqual([(int(r[1]), int(r[3]), int(r[2])) for r in large],
                         [tuple(p) for p in config["large"]])
        header = next(line for line in text.splitlines() if line.startswith("| sweep"))
        self.assertLen(header.strip().strip("|").split("|"), len(sedghi_timing.HEADERS))
        # The tiny layers all fit the dense budget: every one is checked against the dense SVD.
        for row in channels + sizes:
            self.assertGreater(float(row[5]), 0.0)  # FFT time
            self.assertGreater(float(row[6]), 0.0)  # dense time
            self.assertLessEqual(float(row[8]), sedghi_timing.AGREEMENT_RTOL)
        for row in large:  # Dense is never attempted for the large-kernel rows.
            self.assertEqual(row[6], "—")

    def test_unknown_preset_raises(self):
        out = tables.tmpdir(self)
        with self.assertRaisesRegex(ValueError, "preset='huge'"):
            sedghi_timing.run("huge", out)


class NumericalExperimentsTest(parameterized.TestCase):
    """The other numerical experiments run end to end on their tiny ``test`` preset."""

    @parameterized.parameters("yi_approximation", "bounds_tightness")
    def test_test_preset_writes_table_and_plot(self, name):
        module = importlib.import_module(f"experiments.{name}")
        out = tables.tmpdir(self)
        text = module.run("test", out)
        self.assertIn("|---", text)
        self.assertIn(f"({name}.png)", text)
        self.assertTrue((out / f"{name}.md").exists())
        self.assertGreater((out / f"{name}.png").stat().st_size, 1000)


class MainTest(absltest.TestCase):
    def test_writes_report(self):
        out = tables.tmpdir(self) / "results"
        with mock.patch.object(experiments_main, "EXPERIMENTS", ["sedghi_timing"]):
            self.assertEqual(experiments_main.main(["--preset", "test", "--out", str(out)]), 0)
        report = (out / "REPORT.md").read_text()
        self.assertTrue(report.startswith("# "))
        self.assertIn("Date:", report)
        self.assertIn("JAX", report)
        self.assertIn("Total time:", report)
        self.assertIn("`sedghi_timing`", report)
        self.assertIn("## Sedghi et al. 2019", report)
        self.assertTrue((out / "sedghi_timing.png").is_file())
        self.assertTrue((out / "sedghi_timing.md").is_file())

    def test_missing_experiment_fails_before_running_anything(self):
        out = tables.tmpdir(self)
        names = ["sedghi_timing", "no_such_experiment"]
        with mock.patch.object(experiments_main, "EXPERIMENTS", names):
            with self.assertRaisesRegex(ModuleNotFoundError, "no_such_experiment"):
                experiments_main.run_all("test", out)
        self.assertFalse((out / "REPORT.md").exists())
        self.assertFalse((out / "sedghi_timing.md").exists())

    def test_default_list_names_every_experiment(self):
        scripts = sorted(
            p.stem for p in pathlib.Path(experiments_main.__file__).parent.glob("[!_]*.py"))
        self.assertEqual(sorted(experiments_main.EXPERIMENTS), scripts)


if __name__ == "__main__":
    absltest.main()
