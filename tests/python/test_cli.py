"""`python3 -m vkg` command line: --help, export-demo, inspect."""

import os
import subprocess
import sys
import tempfile
import unittest

TOOLS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                      "tools", "python"))
sys.path.insert(0, TOOLS)

import vkg  # noqa: E402
from vkg import demos, reference  # noqa: E402


def run_vkg(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = TOOLS + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vkg"] + list(args), env=env,
                          capture_output=True, text=True, timeout=300)


class Cli(unittest.TestCase):
    def test_help(self):
        r = run_vkg("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("inspect", r.stdout)
        self.assertIn("export-demo", r.stdout)

    def test_export_demo_and_inspect(self):
        import numpy as np
        import torch
        with tempfile.TemporaryDirectory() as d:
            for kind in demos.KINDS:
                path = os.path.join(d, kind + ".vkg")
                r = run_vkg("export-demo", kind, "-o", path)
                self.assertEqual(r.returncode, 0, r.stderr)
                r = run_vkg("inspect", path)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn("x ", r.stdout)
                self.assertIn("output", r.stdout)
                self.assertIn("model_name = ", r.stdout)
                self.assertIn("producer = vkg.export " + vkg.__version__, r.stdout)
                # the fixed seed makes the exported model the one demos.make builds
                m, x = demos.make(kind)
                with torch.no_grad():
                    want = m(x).numpy()
                got = reference.run(path, [x.numpy()])["output"]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def test_inspect_bad_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.vkg")
            with open(path, "wb") as f:
                f.write(b"not a graph" * 10)
            r = run_vkg("inspect", path)
            self.assertEqual(r.returncode, 1)
            self.assertIn("bad magic", r.stderr)


if __name__ == "__main__":
    unittest.main()
