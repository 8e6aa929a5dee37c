"""The unit tier collects and runs where only the serving extra is installed
(``pip install .[serve]`` + pytest: no torch, no timm, no scikit-learn, no cvxpy).

The check runs pytest in a subprocess whose imports of those packages fail, as they do
there: conftest.py and the test modules must import none of them at collection time, and
the unit tests that need one skip themselves (``pytest.importorskip``)."""

import subprocess
import sys

from helpers import REPO

# The convert extra's and the dev extra's heavy packages: none is in the serving install.
BLOCKED = ("torch", "torchvision", "timm", "sklearn", "skimage", "cvxpy", "onnxscript")

# pytest with the BLOCKED packages unimportable (a finder ahead of every other one).
PYTEST_WITHOUT_TORCH = f"""
import sys


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)


sys.meta_path.insert(0, Blocked())
import pytest

code = pytest.main(sys.argv[1:])
assert not {{m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r}}}
sys.exit(code)
"""

# The modules that use torch, timm, scikit-learn or cvxpy somewhere: their unit tests run.
TORCH_MODULES = [
    "test_evaluate.py",
    "test_exemplars.py",
    "test_graph.py",
    "test_head.py",
    "test_nmf.py",
    "test_preprocessing.py",
    "test_zoo.py",
]


def test_the_unit_tier_collects_and_skips_without_torch():
    """One pytest run (a collection error fails it: exit 2): every module collected, the
    unit tests of TORCH_MODULES run; those that need a blocked package skip."""
    cmd = [
        sys.executable,
        "-c",
        PYTEST_WITHOUT_TORCH,
        "-p",
        "no:cacheprovider",
        "-q",
        "-m",
        "unit",
        "-k",
        " or ".join(TORCH_MODULES),
        "tests",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stdout.splitlines() if line.startswith(("ERROR ", "FAILED "))]
    assert r.returncode == 0, f"without torch: {errors}\n" + (r.stdout + r.stderr)[-6000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" in summary, summary
    assert "failed" not in summary and "error" not in summary, summary
    assert "could not import 'torch'" in r.stdout, "the torch tests skip (-ra lists why)"
