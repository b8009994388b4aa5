"""Helpers shared by the experiment tests: a temporary folder and the cells of Markdown tables."""

import pathlib
import shutil
import tempfile

from absl.testing import absltest


def tmpdir(test: absltest.TestCase) -> pathlib.Path:
    """A fresh temporary folder removed after the test (works under pytest and absltest)."""
    path = pathlib.Path(tempfile.mkdtemp())
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every Markdown table row, header rows included, separator lines excluded."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows
