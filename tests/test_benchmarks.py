"""Smoke tests of benchmark scripts that have no server: they run and report what they say."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
