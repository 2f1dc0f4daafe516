"""The README's example, run as written against the daemon (same environment as test_daemon)."""

import contextlib
import io
import os
import pathlib
import unittest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class Readme(unittest.TestCase):
    def test_the_readme_example_runs_as_written(self):
        for k in ("AMQP_URL", "AMQP_PREFIX", "VOLUME_API_URL", "VM_ID"):
            self.assertTrue(os.environ.get(k), f"the README example needs {k}")
        text = README.read_text()
        block = text.split("<!-- python-client-example -->", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
        printed = out.getvalue()
        self.assertIn("attached", printed)
        self.assertIn("refused: VOLUME_NOT_FOUND", printed)
        self.assertIn("deleted", printed)


if __name__ == "__main__":
    unittest.main()
