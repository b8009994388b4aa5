"""The TT compression experiment (Garipov et al. 2016) on its tiny ``test`` preset."""

import math
import pathlib
import re
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")

from absl.testing import absltest  # noqa: E402

from experiments import tt_compression  # noqa: E402
from tests.experiments import tables  # noqa: E402
from train.models import garipov  # noqa: E402


class TTCompressionTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.out = pathlib.Path(tempfile.mkdtemp())
        cls.text = tt_compression.run("test", cls.out)
        cls.table = [
            r for r in tables.table_rows(cls.text) if len(r) == len(tt_compression.HEADERS)
        ]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)
        super().tearDownClass()

    def test_outputs(self):
        name = tt_compression.NAME
        self.assertEqual((self.out / f"{name}.md").read_text(), self.text)
        self.assertGreater((self.out / f"{name}.png").stat().st_size, 0)
        self.assertIn(f"({name}.png)", self.text)
        self.assertFalse(any(self.out.glob("runs")))  # Test run folders are temporary.

    def test_rows(self):
        rows = {r[0].split(" (before")[0]: r for r in self.table[1:]}
        expected = [row.label for row in tt_compression.PRESETS["test"].rows]
        self.assertEqual(list(rows), expected)
        self.assertEqual(rows["conv (baseline)"][2], "1.00")
        for label, r in rows.items():
            accuracy = float(r[1])
            self.assertTrue(0 <= accuracy <= 100, label)
            if label != "conv (baseline)":
                self.assertGreater(float(r[2]), 1.0, label)  # Compressed.
                self.assertGreater(float(r[5]), 0.0, label)  # σ_max of a TT conv layer.
        self.assertGreater(float(rows["TT-conv-TT-fc"][6]), 0.0)  # σ_max of a TT-FC layer.
        self.assertEqual(rows["TT-conv-TT-fc"][7:], ["89.7", "41.65"])  # The paper's row.
        decomposed = [r[0] for r in self.table if "decomposed" in r[0]]
        self.assertLen(decomposed, 1)
        match = re.search(r"before fine-tuning: ([\d.]+) %; with BN statistics recalibrated: "
                          r"([\d.]+) %", decomposed[0])
        self.assertIsNotNone(match, decomposed[0])
        self.assertTrue(all(0 <= float(v) <= 100 for v in match.groups()))

    def test_compression_is_measured(self):
        # The parameters column is count_params of the trained network: recount the baseline.
        setting = tt_compression.PRESETS["test"]
        baseline = tt_compression._abstract_params(tt_compression._net_kwargs(setting, "conv"))
        rows = {r[0]: r for r in self.table[1:]}
        self.assertEqual(int(rows["conv (baseline)"][3].replace(",", "")), baseline)
        tt = rows["TT-conv"]
        ratio = baseline / int(tt[3].replace(",", ""))
        self.assertEqual(tt[2], f"{ratio:.2f}")

    def test_released_rows_use_the_released_configs(self):
        setting = tt_compression.PRESETS["paper"]
        released = [row for row in setting.rows if row.released]
        self.assertTrue(released)
        for row in released:
            kwargs = tt_compression.tt_kwargs(setting, row, 1.0)
            config = (garipov.RELEASED_TT_CONV if row.family == "tt_conv"
                      else garipov.RELEASED_TT_CONV_TT_FC)
            self.assertEqual(kwargs, {k: v for k, v in config.items() if k != "variant"})

    def test_choose_scale_hits_a_paper_ratio(self):
        # The paper preset's TT-conv 4.02 row: ranks scaled until the measured compression is
        # the closest one to 4.02 (counts of the abstract full-size network).
        setting = tt_compression.PRESETS["paper"]
        row = next(r for r in setting.rows if r.paper == "TT-conv 4.02")
        baseline = tt_compression._abstract_params(tt_compression._net_kwargs(setting, "conv"))
        scale = tt_compression.choose_scale(setting, row, baseline)

        def ratio(s):
            kwargs = {**tt_compression._net_kwargs(setting, "conv"),
                      **tt_compression.tt_kwargs(setting, row, s)}
            return baseline / tt_compression._abstract_params(kwargs)

        got = ratio(scale)
        self.assertAlmostEqual(got, 4.02, delta=0.15)
        for neighbour in (scale - 1 / 16, scale + 1 / 16):
            self.assertGreaterEqual(abs(math.log(ratio(neighbour) / 4.02)),
                                    abs(math.log(got / 4.02)) - 1e-12)


if __name__ == "__main__":
    absltest.main()
