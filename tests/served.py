"""Processes for tests: a real `protonmf serve` (free ports, own BENTOML_HOME) and the
helpers to start any server, wait for it and stop it by PID — the product's launcher
(protonmf/launcher.py, which the benchmarks use too) under the names the tests import."""

from __future__ import annotations

import contextlib
from pathlib import Path

from protonmf import launcher
from protonmf.launcher import Server as Served
from protonmf.launcher import free_port, wait_ready
from protonmf.launcher import start as start_process
from protonmf.launcher import stop as stop_process

__all__ = ["Served", "free_port", "serve", "start_process", "stop_process", "wait_ready"]


@contextlib.contextmanager
def serve(artifact: Path, workdir: Path, workers: int = 1, env: dict | None = None):
    """Start the service (PROTONMF_MAX_LATENCY_MS=30000 unless ``env`` says otherwise),
    wait for /readyz (90 s), yield a ``Served``, then stop it."""
    env = {"PROTONMF_MAX_LATENCY_MS": "30000", **(env or {})}
    with launcher.serve(artifact, workdir, workers=workers, env=env) as served:
        yield served
