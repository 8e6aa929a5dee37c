"""Smoke tests of benchmark scripts that have no server: they run and report what they say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each runs a benchmark script in its own process


def test_bench_core_reports_every_stage(lite0_artifact, tmp_path):
    out = tmp_path / "core.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_core.py"), str(lite0_artifact),
                    "--rounds", "1", "--threads", "1", "--out", str(out)], check=True)  # fmt: skip
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"decode", "infer cpu b1", "infer cpu b8", "infer cpu b32", "explain cpu"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    b32 = rows["infer cpu b32"]
    assert abs(b32["ms_per_image"] * 32 - b32["median_ms"]) < 1e-9


def test_gpu_checks_script_parses_and_refuses_unknown_stage(tmp_path):
    script = REPO / "benchmarks" / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    r = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "WORK": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 2 and "usage" in r.stderr


def test_bench_head_modes_times_both_heads(tmp_path):
    out = tmp_path / "modes.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_head_modes.py"), "--dims", "16",
                    "--classes", "4", "--batches", "1", "2", "--seconds", "0", "--out", str(out)],
                   check=True)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["D"], r["C"], r["batch"]) for r in rows] == [(16, 4, 1), (16, 4, 2)]
    for r in rows:
        assert set(r["median_us"]) == {"black-box", "topk", "all"} and r["rounds"] >= 50
        assert r["cheaper"] == min(("topk", "all"), key=r["median_us"].get)


@pytest.fixture(scope="module")
def head_work(tmp_path_factory):
    """bench_head's exports (black box, other modes, cuts), made once for these tests."""
    return tmp_path_factory.mktemp("bench_head_work")


def test_bench_head_repeats_in_fresh_processes_on_a_shared_pool(fashion_artifact, head_work,
                                                                 tmp_path):  # fmt: skip
    out = tmp_path / "head.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_head.py"), "--artifact",
                    str(fashion_artifact), "--ort-pool", "shared", "--threads", "1", "2", "--reps", "2",
                    "--repeats", "3", "--seconds", "0", "--workdir", str(head_work),
                    "--out", str(out)], check=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["settings"]["ort_pool"] == "shared" and result["default"] == "all"
    assert set(result["threads"]) == {"1", "2"}
    for rows in result["threads"].values():
        assert set(rows) == set(result["nodes"]) >= {"black-box", "topk", "all"}
        for row in rows.values():
            assert row["rounds"] == 6 and len(row["paired_ratio_per_rep"]) == 2
        assert rows["black-box"]["paired_ratio_per_rep"] == [1.0, 1.0]


def test_bench_head_times_only_the_graphs_asked_for(fashion_artifact, head_work, tmp_path):
    out = tmp_path / "head.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_head.py"), "--artifact",
                    str(fashion_artifact), "--graphs", "all", "--ort-pool", "own", "--threads", "2",
                    "--reps", "1", "--repeats", "2", "--seconds", "0", "--workdir",
                    str(head_work), "--out", str(out)], check=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["nodes"]) == set(result["threads"]["2"]) == {"black-box", "all"}
