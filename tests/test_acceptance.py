"""Issue #16's acceptance runs, short versions: each runs its check (tests/acceptance/) the
way docs/testing.md does, ``python -m tests.acceptance.NAME`` from the repository root (it
serves the artifact on free ports and stops it by PID), and expects exit 0. The full runs
and the figures measured with them: docs/testing.md, "Acceptance runs".

    .venv/bin/python -m tests.acceptance.check_schemathesis ARTIFACT  # ≥ 2,000 cases, 0 × 5xx
    .venv/bin/python -m tests.acceptance.check_slow_clients ARTIFACT  # 256 slow clients
    .venv/bin/python -m tests.acceptance.check_shutdown ARTIFACT      # SIGTERM under load
    .venv/bin/python -m tests.acceptance.check_load ARTIFACT          # 64 clients × 60 s
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.e2e


def check(name: str, *args) -> None:
    """``python -m tests.acceptance.NAME ARGS`` from the repository root: exit 0 wanted."""
    r = subprocess.run(
        [sys.executable, "-m", f"tests.acceptance.{name}", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"


def test_schemathesis_finds_no_server_error(fashion_artifact: Path):
    """~450 cases over every operation and phase: no status >= 500."""
    bin_dir = str(Path(sys.executable).parent)
    if not shutil.which("schemathesis", path=bin_dir) and not os.environ.get("SCHEMATHESIS"):
        pytest.fail("schemathesis not installed: .venv/bin/pip install schemathesis")
    check("check_schemathesis", fashion_artifact, "-n", "30", "--min-cases", "300")


def test_slow_clients_do_not_hold_the_service(fashion_artifact: Path):
    """256 header-only connections (32 trickling a byte every 0.5 s) with a 3 s body
    timeout: each gets 408 body_timeout on time, real requests are answered within 2 s."""
    check(
        "check_slow_clients",
        fashion_artifact,
        "--slow",
        "256",
        "--trickle",
        "32",
        "--body-timeout",
        "3",
    )


def test_sigterm_under_load_loses_nothing(fashion_artifact: Path):
    check(
        "check_shutdown",
        fashion_artifact,
        "--rest",
        "4",
        "--grpc",
        "4",
        "--warmup",
        "2",
        "--max-wait",
        "20",
    )


def test_mixed_load_answers_match_the_reference(fashion_artifact: Path):
    check("check_load", fashion_artifact, "--seconds", "10", "--clients", "16")


def test_the_checks_are_a_package_of_the_repository():
    """`python -m tests.acceptance...` finds this repository's checks (nothing installed
    under the name ``tests`` shadows them), and every check has a ``main``."""
    code = (
        "import importlib, sys; from pathlib import Path; "
        "names = ['check_load', 'check_schemathesis', 'check_shutdown', 'check_slow_clients']; "
        "mods = [importlib.import_module('tests.acceptance.' + n) for n in names]; "
        "assert all(callable(m.main) for m in mods); "
        "print(Path(mods[0].__file__).resolve().parent)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == REPO / "tests" / "acceptance"
