"""The benchmark scripts still run and report what they say they do.

The tests import nothing from benchmarks/, so a renamed helper breaks a script silently
(bench_grpc.py did after #17): every script answers ``--help`` here, in a subprocess, and
short smoke runs check their plumbing (result files, the shared onnxruntime pool).

Tiers: the quick checks are e2e and run with the suite. The slow smoke runs carry ``bench``
besides and run only when ``-m`` selects it (benchmarks/README.md):

    .venv/bin/python -m pytest -m bench tests/test_benchmarks.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

BENCH = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def script(name: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/NAME ARGS`` from the repository root; fails with its output."""
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{name} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
    )
    return done


def bench_selected(config) -> bool:
    """Whether ``-m`` names ``bench`` (a plain `pytest` runs every tier)."""
    return bool(re.search(r"(?<!not )\bbench\b", config.option.markexpr or ""))


def slow(fn):
    """A smoke run too slow for CI: ``bench`` (and the e2e tier), skipped unless selected.
    The skip is decided before the fixtures are set up (no artifact converted for it)."""
    skip = pytest.mark.skipif(
        "not bench_selected(config)", reason="a slow benchmark smoke run: select it with -m bench"
    )
    return pytest.mark.bench(pytest.mark.e2e(skip(fn)))


# ----------------------------------------------------------------------------- quick


@pytest.mark.e2e
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_answers_help(name):
    assert "usage:" in script(name, "--help", timeout=180).stdout


@pytest.mark.e2e
def test_logits_service_imports():
    """bench_service.py serves it as ``benchmarks.logits_service:LogitsService``."""
    done = subprocess.run(
        [sys.executable, "-c", "import logits_service; logits_service.LogitsService"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.e2e
def test_gpu_checks_parses_and_refuses_an_unknown_stage(tmp_path):
    sh = BENCH / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(sh)], check=True)
    done = subprocess.run(
        ["bash", str(sh), "nonsense"],
        capture_output=True,
        text=True,
        env={"OUT": str(tmp_path), "WORK": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "usage" in done.stderr, (done.returncode, done.stderr)


POOL_CHILD = """
import sys
import numpy as np
import _machine
path, x_file, out_file = sys.argv[1:]
assert _machine.shared_pool_threads() is None
_machine.set_shared_thread_pool(2)
assert _machine.shared_pool_threads() == 2
sessions = [_machine.session(path)[0] for _ in range(2)]  # both on the one pool
assert all(s.get_session_options().use_per_session_threads is False for s in sessions)
try:
    _machine.session(path, threads=1)
    sys.exit("a 1-thread session was accepted beside the 2-thread shared pool")
except ValueError:
    pass
x = np.load(x_file)
outputs = [s.run(None, {s.get_inputs()[0].name: x}) for s in sessions]
np.savez(out_file, *outputs[0], *outputs[1])
"""


def small_model(path: Path) -> Path:
    """A two-output ONNX graph with a dynamic batch: (N, 8) → MatMul → (N, 4), Relu of it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["r"])],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("y", "r")],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.e2e
def test_shared_pool_sessions_compute_what_a_session_of_its_own_does(tmp_path):
    """_machine's shared pool, in a fresh process (the pool comes with onnxruntime's
    environment, made by its first session), as ``import _machine`` from benchmarks/."""
    from protonmf.graph import create_session

    path = small_model(tmp_path / "small.onnx")
    own, _ = create_session(path, threads=2)
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            POOL_CHILD,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "pool.npz"),
        ],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = own.run(None, {"x": x})
    with np.load(tmp_path / "pool.npz") as got:
        assert len(got.files) == 2 * len(want)
        for i, expected in enumerate(want * 2):
            np.testing.assert_array_equal(got[f"arr_{i}"], expected)


@pytest.mark.e2e
def test_core_reports_every_stage(fashion_artifact, tmp_path):
    """Per-image figures consistent with the batch's."""
    out = tmp_path / "core.json"
    script("bench_core.py", fashion_artifact, "--rounds", 1, "--threads", 1, "--out", out)
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "decode",
        "infer cpu b1",
        "infer cpu b8",
        "infer cpu b32",
        "explain cpu",
    }, set(rows)
    assert all(r["images_per_s"] > 0 for r in rows.values())
    b32 = rows["infer cpu b32"]
    assert abs(b32["ms_per_image"] * 32 - b32["median_ms"]) < 1e-9


# ----------------------------------------------------------------------------- slow (-m bench)


@slow
def test_head_modes_times_the_black_box_and_both_heads(tmp_path):
    out = tmp_path / "modes.json"
    script(
        "bench_head_modes.py",
        "--dims",
        16,
        "--classes",
        4,
        "--batches",
        1,
        2,
        "--seconds",
        0,
        "--out",
        out,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["D"], r["C"], r["batch"]) for r in rows] == [(16, 4, 1), (16, 4, 2)], rows
    for r in rows:
        assert set(r["median_us"]) == {"black-box", "topk", "all"} and r["rounds"] >= 50, r
        assert r["cheaper"] == min(("topk", "all"), key=r["median_us"].get), r


@slow
def test_head_runs_fresh_processes_on_a_shared_pool_and_only_the_graphs_asked_for(
    fashion_artifact, tmp_path
):
    work = tmp_path / "bench_head_work"  # exports made once, reused by the second run
    out = tmp_path / "head.json"
    script(
        "bench_head.py",
        "--artifact",
        fashion_artifact,
        "--ort-pool",
        "shared",
        "--threads",
        1,
        2,
        "--reps",
        2,
        "--repeats",
        3,
        "--seconds",
        0,
        "--workdir",
        work,
        "--out",
        out,
    )
    result = json.loads(out.read_text())
    assert result["settings"]["ort_pool"] == "shared" and result["default"] == "all", result
    assert set(result["threads"]) == {"1", "2"}
    for rows in result["threads"].values():
        assert set(rows) == set(result["nodes"]) >= {"black-box", "topk", "all"}
        for row in rows.values():
            assert row["rounds"] == 6 and len(row["paired_ratio_per_rep"]) == 2, row
        assert rows["black-box"]["paired_ratio_per_rep"] == [1.0, 1.0]
    script(
        "bench_head.py",
        "--artifact",
        fashion_artifact,
        "--graphs",
        "all",
        "--ort-pool",
        "own",
        "--threads",
        2,
        "--reps",
        1,
        "--repeats",
        2,
        "--seconds",
        0,
        "--workdir",
        work,
        "--out",
        out,
    )
    result = json.loads(out.read_text())
    assert set(result["nodes"]) == set(result["threads"]["2"]) == {"black-box", "all"}, result


@slow
def test_service_loads_both_servers_and_reports_the_ratios(fashion_artifact, tmp_path):
    """bench_service.py end to end, as short as it goes: the black box exported, protonmf
    and the logits-only service served (protonmf.launcher) and loaded at 1 client."""
    out = tmp_path / "service.json"
    script(
        "bench_service.py",
        "--artifact",
        fashion_artifact,
        "--workdir",
        tmp_path / "work",
        "--client",
        "httpx",
        "--clients",
        1,
        "--endpoints",
        "explain",
        "--duration",
        2,
        "--warmup",
        1,
        "--repeats",
        1,
        "--raw-seconds",
        0.5,
        "--out",
        out,
    )
    report = json.loads(out.read_text())
    runs = {r["endpoint"]: r for r in report["runs"]}
    assert set(runs) == {"explain", "logits"}, runs
    for r in runs.values():
        assert r["ok"] > 0 and r["errors"] == 0 and r["batch"]["requests"] > 0, r
    assert report["top1_agreement"] == 1.0
    assert {"explain_over_logits", "explain_over_raw_windows"} <= set(report["ratios"])
