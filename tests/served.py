"""A real `protonmf serve` subprocess for tests: free ports, own BENTOML_HOME, stopped by PID."""

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


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    grpc_target: str  # 127.0.0.1:PORT
    log: Path
    pid: int


@contextlib.contextmanager
def serve(artifact: Path, workdir: Path, workers: int = 1, env: dict | None = None):
    """Start the service, wait for /readyz (90 s), yield a ``Served``, then stop it."""
    port, grpc_port = free_port(), free_port()
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", PROTONMF_WORKERS=str(workers),
               PROTONMF_MAX_LATENCY_MS="30000", **(env or {}))  # fmt: skip
    # Each server its own BENTOML_HOME: BentoML clears its shared metrics folder at start.
    env["BENTOML_HOME"] = str(workdir / "bentoml")
    # A file, not a pipe: nobody reads a pipe during the test, and a full one blocks the
    # server's request logging (a hang that looks like the server's fault).
    log = workdir / "server.log"
    log_file = open(log, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "protonmf.cli", "serve", str(artifact), "--port", str(port),
         "--grpc-port", str(grpc_port)],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"server not ready in 90 s: {log.read_text()[-3000:]}")
        yield Served(url, f"127.0.0.1:{grpc_port}", log, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()
