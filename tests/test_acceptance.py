"""Issue #16's acceptance runs, short versions: each calls its script's ``main`` (which
serves the artifact on free ports and stops it by PID) and expects exit 0. The full runs
and the figures measured with them: docs/testing.md, "Acceptance runs".

    .venv/bin/python scripts/check_schemathesis.py ARTIFACT     # ≥ 2,000 cases, 0 × 5xx
    .venv/bin/python scripts/check_slow_clients.py ARTIFACT     # 256 slow clients
    .venv/bin/python scripts/check_shutdown.py ARTIFACT         # SIGTERM under load
    .venv/bin/python scripts/check_load.py ARTIFACT             # 64 clients × 60 s
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.e2e


def script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    folder = str(REPO / "scripts")
    if folder not in sys.path:
        sys.path.insert(0, folder)  # for their `from check_common import ...`
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schemathesis_finds_no_server_error(fashion_artifact: Path, capsys):
    """~450 cases over every operation and phase: no status >= 500."""
    module = script("check_schemathesis")
    bin_dir = str(Path(sys.executable).parent)
    if not shutil.which("schemathesis", path=bin_dir) and not module.os.environ.get("SCHEMATHESIS"):
        pytest.fail("schemathesis not installed: .venv/bin/pip install schemathesis")
    code = module.main([str(fashion_artifact), "-n", "30", "--min-cases", "300"])
    out = capsys.readouterr().out
    assert code == 0, out


def test_slow_clients_do_not_hold_the_service(fashion_artifact: Path, capsys):
    """256 header-only connections (32 trickling a byte every 0.5 s) with a 3 s body
    timeout: each gets 408 body_timeout on time, real requests are answered within 2 s."""
    code = script("check_slow_clients").main(
        [str(fashion_artifact), "--slow", "256", "--trickle", "32", "--body-timeout", "3"])
    out = capsys.readouterr().out
    assert code == 0, out


def test_sigterm_under_load_loses_nothing(fashion_artifact: Path, capsys):
    code = script("check_shutdown").main(
        [str(fashion_artifact), "--rest", "4", "--grpc", "4", "--warmup", "2", "--max-wait", "20"])
    out = capsys.readouterr().out
    assert code == 0, out


def test_mixed_load_answers_match_the_reference(fashion_artifact: Path, capsys):
    code = script("check_load").main([str(fashion_artifact), "--seconds", "10", "--clients", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
