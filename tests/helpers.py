"""Plain helpers shared by test modules (no fixtures, no hooks: those are in conftest.py).
Servers and processes: served.py; headless Chromium: browser.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MODEL = REPO / "models" / "fashion-resnet"
FASHION_DATA = REPO / "data" / "fashion-mnist"
MONITORING = REPO / "deploy" / "monitoring"


def run_cli(*args, capsys=None):
    """Run ``protonmf`` in-process; returns (exit code, stdout)."""
    from protonmf.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr().out if capsys else ""
    return code, out


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def run_images(core, blobs: list[bytes]) -> list[dict]:
    """Decode, one graph run, per-image outputs: the data plane's path without its batcher."""
    import numpy as np

    return core.per_image(core.infer(np.stack([core.prepare(b) for b in blobs])))


# --- external tools (deploy tier) ------------------------------------------------------


def tool(name: str) -> str:
    """A tool from .venv/bin (preferred: pinned by the install script) or PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if not found:
        pytest.fail(f"{name} not found: run scripts/install_deploy_tools.sh")
    return found


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured as text, 300 s at most."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          **kwargs)  # fmt: skip


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> dict[str, list[str]]:
    """Panel title -> its PromQL, Grafana variables replaced by what they expand to."""
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$namespace": ".*", "$instance": ".*"}
    out = {}
    for panel in dashboard()["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        for var, value in subst.items():
            exprs = [e.replace(var, value) for e in exprs]
        if exprs:
            out[panel["title"]] = exprs
    return out


def assert_same_body(rest, rpc, path: str = "", same_types: bool = False) -> None:
    """Two answer bodies (REST's and gRPC's read back) equal; heatmap values up to float32,
    the precision gRPC sends them in. ``same_types``: also the same Python types."""
    if isinstance(rest, dict):
        assert rest.keys() == rpc.keys(), path
        for k in rest:
            assert_same_body(rest[k], rpc[k], f"{path}.{k}", same_types)
    elif isinstance(rest, list):
        assert len(rest) == len(rpc), path
        for i, (a, b) in enumerate(zip(rest, rpc, strict=True)):
            assert_same_body(a, b, f"{path}[{i}]", same_types)
    elif isinstance(rest, float) and ".values" in path:
        assert rpc == pytest.approx(rest, rel=1e-6, abs=1e-6), path
    else:
        assert rest == rpc and (not same_types or type(rest) is type(rpc)), path


@functools.cache
def hostile_corpus():
    """scripts/hostile_corpus.py as a module (a script, not a package: loaded by path, once)."""
    spec = importlib.util.spec_from_file_location("hostile_corpus",
                                                  REPO / "scripts" / "hostile_corpus.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def stub_core(spec, limits=None):
    """A service Core without a model, Fashion's manifest layout: enough for ``prepare``
    (decoding, limits) and the checks that need no graph."""
    from types import SimpleNamespace

    import numpy as np

    from protonmf.service.engine.core import Core

    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "boot"]  # fmt: skip
    manifest = {"classes": classes, "p": 3, "feature_grid": [7, 7],
                "graph": {"maps": "all", "scores": "all"},
                "diagnostics": {"per_class": [{"fold": "sum"} for _ in classes]}}  # fmt: skip
    explainer = SimpleNamespace(manifest=manifest, preprocessing=spec, output_shapes={},
                                provider="CPUExecutionProvider",
                                tensors={"coefficients": np.ones((10, 3), np.float32)})  # fmt: skip
    return Core(explainer, limits)
