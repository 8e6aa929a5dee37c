"""Self-check of the benchmark scripts: each runs briefly and reports what it says it does.

The test suite does not import or run benchmarks/ (tests cover the product); this is where
the benchmarks' own plumbing is checked. Run from the repository root:

    .venv/bin/python benchmarks/selfcheck.py                  # every check (~1.5 min on 2 cores)
    .venv/bin/python benchmarks/selfcheck.py --only help pool  # some of them
    .venv/bin/python benchmarks/selfcheck.py --list

Each check prints PASS or FAIL (with why). Exit code: 0 when every selected check passed,
1 when one failed, 2 on bad arguments. Checks marked "artifact" use ``--artifact`` (default:
artifacts/fashion-default, converted with `protonmf convert` defaults first if missing or
stale, about a minute on 2 cores). Nothing is written outside a temporary directory except
that artifact.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CHECKS: dict[str, tuple[str, bool]] = {}  # name → (what it checks, needs the artifact)


def check(name: str, needs_artifact: bool = False):
    def register(fn):
        CHECKS[name] = (fn.__doc__.strip().splitlines()[0], needs_artifact)
        fn.check_name = name
        return fn

    return register


def script(name: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/NAME ARGS`` from the repository root; fails with its output."""
    r = subprocess.run([PY, str(HERE / name), *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        raise AssertionError(f"{name} exited {r.returncode}: {(r.stdout + r.stderr)[-3000:]}")
    return r


# ----------------------------------------------------------------------------- checks


@check("help")
def check_help(work: Path, artifact: Path | None) -> None:
    """every bench_*.py imports and answers --help; logits_service.py imports"""
    for path in sorted(HERE.glob("bench_*.py")):
        script(path.name, "--help", timeout=180)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import logits_service"
    r = subprocess.run([PY, "-c", code, str(HERE)], cwd=REPO, capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


@check("gpu_checks")
def check_gpu_checks(work: Path, artifact: Path | None) -> None:
    """gpu_checks.sh parses and refuses an unknown stage with its usage"""
    sh = HERE / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(sh)], check=True)
    r = subprocess.run(["bash", str(sh), "nonsense"], capture_output=True, text=True,
                       env={"OUT": str(work), "WORK": str(work), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 2 and "usage" in r.stderr, (r.returncode, r.stderr)


@check("head_modes")
def check_head_modes(work: Path, artifact: Path | None) -> None:
    """bench_head_modes.py times the black box and both heads per (D, C, batch)"""
    out = work / "modes.json"
    script("bench_head_modes.py", "--dims", 16, "--classes", 4, "--batches", 1, 2,
           "--seconds", 0, "--out", out)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["D"], r["C"], r["batch"]) for r in rows] == [(16, 4, 1), (16, 4, 2)], rows
    for r in rows:
        assert set(r["median_us"]) == {"black-box", "topk", "all"} and r["rounds"] >= 50, r
        assert r["cheaper"] == min(("topk", "all"), key=r["median_us"].get), r


POOL_CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import _machine
path, x_file, out_file = sys.argv[2:]
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


@check("pool", needs_artifact=True)
def check_pool(work: Path, artifact: Path | None) -> None:
    """_machine's shared pool: sessions on it compute what a 2-thread session of its own does"""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from protonmf.graph import create_session

    path = artifact / "model.onnx"
    own, _ = create_session(path, threads=2)
    x = np.random.default_rng(0).random((3, *own.get_inputs()[0].shape[1:]), dtype=np.float32)
    np.save(work / "x.npy", x)
    # a fresh process: the pool comes with onnxruntime's environment (its first session)
    r = subprocess.run([PY, "-c", POOL_CHILD, str(HERE), str(path), str(work / "x.npy"),
                        str(work / "pool.npz")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    want = own.run(None, {own.get_inputs()[0].name: x})
    with np.load(work / "pool.npz") as got:
        assert len(got.files) == 2 * len(want)
        for i, expected in enumerate(want * 2):
            np.testing.assert_array_equal(got[f"arr_{i}"], expected)


@check("core", needs_artifact=True)
def check_core(work: Path, artifact: Path | None) -> None:
    """bench_core.py reports every stage, per-image figures consistent with the batch's"""
    out = work / "core.json"
    script("bench_core.py", artifact, "--rounds", 1, "--threads", 1, "--out", out)
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"decode", "infer cpu b1", "infer cpu b8", "infer cpu b32",
                         "explain cpu"}, set(rows)  # fmt: skip
    assert all(r["images_per_s"] > 0 for r in rows.values())
    b32 = rows["infer cpu b32"]
    assert abs(b32["ms_per_image"] * 32 - b32["median_ms"]) < 1e-9


@check("head", needs_artifact=True)
def check_head(work: Path, artifact: Path | None) -> None:
    """bench_head.py: fresh processes on a shared pool, and only the graphs asked for"""
    head_work = work / "bench_head_work"  # exports made once, reused by the second run
    out = work / "head.json"
    script("bench_head.py", "--artifact", artifact, "--ort-pool", "shared", "--threads", 1, 2,
           "--reps", 2, "--repeats", 3, "--seconds", 0, "--workdir", head_work, "--out", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["settings"]["ort_pool"] == "shared" and result["default"] == "all", result
    assert set(result["threads"]) == {"1", "2"}
    for rows in result["threads"].values():
        assert set(rows) == set(result["nodes"]) >= {"black-box", "topk", "all"}
        for row in rows.values():
            assert row["rounds"] == 6 and len(row["paired_ratio_per_rep"]) == 2, row
        assert rows["black-box"]["paired_ratio_per_rep"] == [1.0, 1.0]
    script("bench_head.py", "--artifact", artifact, "--graphs", "all", "--ort-pool", "own",
           "--threads", 2, "--reps", 1, "--repeats", 2, "--seconds", 0, "--workdir", head_work,
           "--out", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["nodes"]) == set(result["threads"]["2"]) == {"black-box", "all"}, result


# ----------------------------------------------------------------------------- runner


def fashion_artifact(path: Path) -> Path:
    sys.path.insert(0, str(HERE))
    import bench_graph

    return bench_graph.ensure_fashion(path.resolve())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "fashion-default",
                    help="the Fashion-MNIST artifact the artifact checks use (built if missing)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, needs) in CHECKS.items():
            print(f"{name:<11} {what}{'  [artifact]' if needs else ''}")
        return 0
    selected = args.only or list(CHECKS)
    unknown = set(selected) - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; known: {list(CHECKS)}")
    fns = {fn.check_name: fn for fn in globals().values() if hasattr(fn, "check_name")}
    artifact = None
    if any(CHECKS[n][1] for n in selected):
        artifact = fashion_artifact(args.artifact)
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench_selfcheck.") as tmp:
        for name in selected:
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.perf_counter()
            try:
                fns[name](work, artifact)
            except Exception as e:  # report every check, then the exit code
                failed.append(name)
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()
                print(f"FAIL {name} ({time.perf_counter() - t0:.0f} s): {detail}", flush=True)
            else:
                print(f"PASS {name} ({time.perf_counter() - t0:.0f} s): {CHECKS[name][0]}",
                      flush=True)  # fmt: skip
    print(f"\n{len(selected) - len(failed)}/{len(selected)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
