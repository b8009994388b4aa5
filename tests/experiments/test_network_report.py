"""experiments/network_report.py on its tiny preset."""

import matplotlib

matplotlib.use("Agg")

from absl.testing import absltest  # noqa: E402

from experiments import network_report  # noqa: E402
from tests.experiments import tables  # noqa: E402


class NetworkReportExperimentTest(absltest.TestCase):
    def test_tiny_preset(self):
        out = tables.tmpdir(self)
        text = network_report.run("test", out)
        self.assertEqual((out / "network_report.md").read_text(), text)
        self.assertGreater((out / "network_report.png").stat().st_size, 0)
        rows = {r[0]: r for r in tables.table_rows(text) if r[0] != "model"}
        self.assertEqual(set(rows), {"baseline", "projected c=1, every 10"})
        for row in rows.values():
            naive, upper, lower, gap = (float(row[i]) for i in (3, 4, 7, 9))
            self.assertGreaterEqual(naive, upper)
            self.assertGreaterEqual(upper, lower)
            self.assertAlmostEqual(gap, upper / lower, delta=1e-3 * gap)
            self.assertRegex(row[8], r"^(pair|jacobian) \(power ")
            violations, pairs = (int(v) for v in row[10].split(" / "))
            self.assertEqual(violations, 0)
            self.assertGreaterEqual(pairs, 256)
        self.assertFalse(any(out.glob("runs")))


if __name__ == "__main__":
    absltest.main()
