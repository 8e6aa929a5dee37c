"""A/B of one service setting: two `protonmf serve` processes, alternating load windows.

Server A runs the defaults, server B the same artifact with extra environment (e.g.
``PROTONMF_ORT_THREADS=1``). With ``--a-repo`` server A runs another checkout's code
instead (``git worktree add /tmp/before HEAD``; links protonmf/service and
protonmf/converter are made in it so that it runs its own code: bench_service.own_imports),
on ``--a-artifact`` if that code reads an older artifact format: before/after of a change,
same machine, same windows. Both stay up for the whole run (an idle BentoML server costs
next to no CPU) and /explain is loaded on one at a time, A B A B …, with
bench_service.py's closed loop (N clients, one JPEG per request), so drift on a shared
machine hits both. Reports img/s per window and B/A of the pooled throughput.

    .venv/bin/python benchmarks/bench_env_ab.py PROTONMF_ORT_THREADS=1 [--clients 32]
    .venv/bin/python benchmarks/bench_env_ab.py --a-repo /tmp/before --a-artifact OLD
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import _machine
from _machine import REPO, RESULTS
from bench_service import CLIENTS, MAX_BATCH_SIZE, ensure_artifact, own_imports, run_load, server

from protonmf.sample_data import imagenet_photo_files


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def _commit(repo: Path) -> str | None:
    """HEAD of a checkout, '+dirty' when its tracked files differ from it."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("env_b", nargs="*", help="NAME=VALUE settings of server B")
    ap.add_argument(
        "--a-repo", type=Path, help="run server A from this checkout (default: this one)"
    )
    ap.add_argument("--a-artifact", type=Path, help="server A's artifact (default: B's)")
    ap.add_argument("--artifact", type=Path, help="default: Lite0 artifact as in bench_service")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_service_work"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="workers of both servers")
    ap.add_argument("--rounds", type=int, default=3, help="A B windows per round")
    ap.add_argument("--duration", type=float, default=15.0, help="counted seconds per window")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="httpx",
        help="load generator (see bench_service.py)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_env_ab.json")
    args = ap.parse_args(argv)
    if not args.env_b and not args.a_repo:
        ap.error("nothing differs: give NAME=VALUE settings for B and/or --a-repo")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = ensure_artifact(args)
    extra = parse_env(args.env_b)
    payloads = [(f.name, f.read_bytes()) for f in imagenet_photo_files()]
    base = dict(
        os.environ,
        BENTOML_DO_NOT_TRACK="true",
        PROTONMF_WORKERS=str(args.workers),
        PROTONMF_MAX_BATCH_SIZE=str(MAX_BATCH_SIZE),
    )
    cmd = [sys.executable, "-m", "protonmf.cli", "serve", "{artifact}", "--grpc-port", "0"]
    a_repo = (args.a_repo or REPO).resolve()
    if a_repo != REPO:
        for link in own_imports(a_repo):  # A runs its own protonmf.service, not this one's
            print(f"linked {link} → {link.readlink()}", flush=True)
    a_artifact = (args.a_artifact or artifact).resolve()
    envs = {
        "A": dict(base, BENTOML_HOME=str(args.workdir / "bentoml_home_a")),
        "B": dict(base, BENTOML_HOME=str(args.workdir / "bentoml_home_b"), **extra),
    }
    # `python -m` puts the working directory first on sys.path: A imports a_repo's code
    runs = {"A": (a_repo, a_artifact), "B": (REPO, artifact)}
    start = _machine.machine_info()
    windows: dict[str, list[dict]] = {"A": [], "B": []}
    with ExitStack() as stack:
        servers = {
            k: stack.enter_context(
                server(
                    k,
                    [str(runs[k][1]) if c == "{artifact}" else c for c in cmd],
                    env,
                    args.workdir / f"server-ab-{k}.log",
                    cwd=runs[k][0],
                )
            )
            for k, env in envs.items()
        }
        for _ in range(args.rounds):
            for k, (url, pid) in servers.items():
                windows[k].append(
                    run_load(
                        url,
                        "explain",
                        pid,
                        payloads,
                        args.clients,
                        args.warmup,
                        args.duration,
                        args.client,
                        args.workdir,
                    )
                )
    rate = {k: statistics.mean(w["images_per_s"] for w in ws) for k, ws in windows.items()}
    cpu = {
        k: statistics.mean(w["server_cpu_ms_per_image"] for w in ws) for k, ws in windows.items()
    }
    report = {
        "env_b": extra,
        "clients": args.clients,
        "client": CLIENTS[args.client],
        "workers": args.workers,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "artifact": str(artifact),
        "a": {"repo": str(a_repo), "artifact": str(a_artifact), "commit": _commit(a_repo)},
        "b": {"repo": str(REPO), "artifact": str(artifact), "commit": _commit(REPO)},
        "images_per_s": rate,
        "b_over_a": rate["B"] / rate["A"],
        "server_cpu_ms_per_image": cpu,
        "per_window_images_per_s": {
            k: [w["images_per_s"] for w in ws] for k, ws in windows.items()
        },
        "machine": {"start": start, "end": _machine.machine_info()},
        "windows": windows,
    }
    a_name = f"A ({'defaults' if args.a_repo is None else a_repo})"
    b_name = f"B ({' '.join(args.env_b) or REPO})"
    print(
        f"\n{a_name} {rate['A']:.1f} img/s, {b_name} {rate['B']:.1f} img/s: "
        f"B/A = {report['b_over_a']:.2f}; server CPU ms/img A {cpu['A']:.1f}, B {cpu['B']:.1f}"
    )
    _machine.write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
