"""Start a server as a subprocess, wait until it answers, stop it: the one launcher the
tests (tests/served.py) and the benchmarks (benchmarks/bench_service.py and the scripts on
it) share.

    from protonmf import launcher

    with launcher.serve(artifact, workdir) as server:   # `protonmf serve` on free ports
        httpx.post(f"{server.url}/classify", ...)        # server.grpc_target, .log, .proc

    with launcher.running(cmd, log, ready_url) as proc:  # any command, ready when
        ...                                              # ready_url answers 200

Each process runs in a session of its own (its workers in its process group), with its
output in a log file, not a pipe (a full pipe nobody reads blocks the server's logging: a
hang that looks like the server's fault). Ready means an HTTP 200 from a URL (``/readyz``
for the service); a process that exits first or a timeout raises with the log's tail.
Stopping sends SIGTERM to the process group, then SIGKILL if it has not exited after a
grace period. BentoML's telemetry is off in every environment started here
(``BENTOML_DO_NOT_TRACK=true``).

The standard library only (subprocess, socket, urllib): no torch, no server imports.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
HOST = "127.0.0.1"

# Loopback only: no proxy from the environment (http_proxy would route 127.0.0.1 through it).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def environment(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``env`` (default: this process's environment) plus ``extra``, telemetry off."""
    return {**(os.environ if env is None else env), **extra, "BENTOML_DO_NOT_TRACK": "true"}


def start(
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout and stderr to ``log`` (truncated).

    ``env`` is the whole environment (default: this process's), telemetry turned off."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(c) for c in cmd],
            env=environment(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_tail(log: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of ``log`` ('' if it cannot be read)."""
    try:
        return Path(log).read_bytes()[-chars:].decode(errors="replace")
    except OSError:
        return ""


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers HTTP 200 now."""
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, 503 (URLError)
        return False


def wait_ready(
    url: str,
    proc: subprocess.Popen,
    log: Path,
    timeout: float = READY_TIMEOUT_S,
    interval: float = 0.3,
) -> float:
    """Poll ``url`` until it answers 200; the seconds it took. RuntimeError with the log's
    tail if the process exits first, TimeoutError with it after ``timeout`` seconds."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{_name(proc)} exited ({proc.returncode}) before {url} answered; "
                f"{log}:\n{log_tail(log)}"
            )
        if answers(url):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(
                f"{_name(proc)} (pid {proc.pid}): {url} not ready in {timeout:g} s; "
                f"{log}:\n{log_tail(log)}"
            )
        time.sleep(interval)


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM to the process's group; SIGKILL to the group if its leader has not exited
    after ``timeout`` seconds. The leader's exit code. A process that exited before is left
    as it is, and so is what outlives a leader that exited by itself: a test can see it."""
    if proc.poll() is not None:
        return proc.returncode
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running(
    cmd: Sequence[str],
    log: Path,
    ready_url: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> Iterator[subprocess.Popen]:
    """``start``, ``wait_ready`` on ``ready_url``, yield the process, then ``stop`` it."""
    proc = start(cmd, log, env, cwd)
    try:
        wait_ready(ready_url, proc, log, timeout)
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    grpc_target: str | None  # 127.0.0.1:PORT, None when gRPC is off
    log: Path
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


def serve_command(
    artifact: Path | str,
    port: int,
    grpc_port: int = 0,
    host: str = HOST,
    workers: int | None = None,
    device: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """``protonmf serve`` (it execs ``bentoml serve``: the PID started is the server's);
    ``grpc_port`` 0: no gRPC."""
    cmd = [
        python,
        "-m",
        "protonmf.cli",
        "serve",
        str(artifact),
        "--host",
        host,
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if device is not None:
        cmd += ["--device", device]
    return cmd


@contextlib.contextmanager
def serve(
    artifact: Path | str,
    workdir: Path,
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
    grpc: bool = True,
    device: str | None = None,
    cwd: Path | str | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> Iterator[Server]:
    """``protonmf serve ARTIFACT`` on free loopback ports, ready on /readyz: yields a
    ``Server``, then stops it. ``env`` is added to this process's environment; the server
    gets its own BENTOML_HOME (``workdir/bentoml`` unless ``env`` names one: BentoML empties
    its metrics folder at start, which would reset another server's counters) and logs to
    ``workdir/server.log``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # two picks: gRPC's SO_REUSEPORT would share a port that is taken
    port, grpc_port = free_port(), free_port() if grpc else 0
    full = environment(None, BENTOML_HOME=str(workdir / "bentoml"), **(env or {}))
    log = workdir / "server.log"
    cmd = serve_command(artifact, port, grpc_port, workers=workers, device=device)
    url = f"http://{HOST}:{port}"
    with running(cmd, log, f"{url}/readyz", full, cwd, timeout) as proc:
        yield Server(url, f"{HOST}:{grpc_port}" if grpc else None, log, proc)


def _name(proc: subprocess.Popen) -> str:
    args = proc.args if isinstance(proc.args, (list, tuple)) else [proc.args]
    return " ".join(str(a) for a in args[:5])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group's id is the leader's pid
    except (ProcessLookupError, PermissionError):  # the group is gone
        pass
