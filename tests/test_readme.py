"""The README's Python examples run as written (they are the documentation users copy)."""

import pathlib
import re

from absl.testing import absltest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class ReadmeTest(absltest.TestCase):

    def test_python_blocks_run(self):
        blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
        self.assertNotEmpty(blocks)
        for i, block in enumerate(blocks):
            with self.subTest(block=i):
                exec(compile(block, f"README.md[python block {i}]", "exec"), {})

    def test_first_lines_give_the_two_commands(self):
        head = README.read_text().splitlines()[:8]
        self.assertTrue(any("python -m experiments" in line for line in head))
        self.assertTrue(any("pytest" in line for line in head))


if __name__ == "__main__":
    absltest.main()
