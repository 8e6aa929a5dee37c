"""Processes for tests: a real `protonmf serve` (free ports, own BENTOML_HOME) and the
helpers to start any server, wait for it and stop it by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(cmd: list[str], log: Path, env: dict | None = None, cwd=None) -> subprocess.Popen:
    """Own session (stopped as a group); output to a file, not a pipe: a full pipe nobody
    reads blocks the server's logging (a hang that looks like the server's fault)."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout} s: {log.read_text()[-3000:]}")


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    grpc_target: str  # 127.0.0.1:PORT
    log: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def serve(artifact: Path, workdir: Path, workers: int = 1, env: dict | None = None):
    """Start the service, wait for /readyz (90 s), yield a ``Served``, then stop it."""
    port, grpc_port = free_port(), free_port()  # gRPC's SO_REUSEPORT would share a taken one
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", PROTONMF_MAX_LATENCY_MS="30000",
               **(env or {}))  # fmt: skip
    # Each server its own BENTOML_HOME: BentoML clears its shared metrics folder at start.
    env["BENTOML_HOME"] = str(workdir / "bentoml")
    log = workdir / "server.log"
    proc = start_process(
        [sys.executable, "-m", "protonmf.cli", "serve", str(artifact), "--port", str(port),
         "--grpc-port", str(grpc_port), "--workers", str(workers)], log, env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", proc, log)
        yield Served(url, f"127.0.0.1:{grpc_port}", log, proc)
    finally:
        stop_process(proc)
