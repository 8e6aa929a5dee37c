"""Shared by the acceptance checks (tests/acceptance/check_*.py; not a check itself): the
served process (tests/served.py), the Fashion test images, worker processes and their memory.

Every check serves the artifact it is given on free loopback ports, in its own
BENTOML_HOME under a temporary folder, and stops it by PID (process group) at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from tests.served import Served, serve

REPO = Path(__file__).resolve().parents[2]
FASHION_TEST = REPO / "data" / "fashion-mnist" / "test"
WORKER_MARK = "_bentoml_impl.worker"

__all__ = [
    "REPO",
    "Served",
    "served",
    "fashion_images",
    "worker_pids",
    "memory",
    "percentile",
    "mib",
]


@contextlib.contextmanager
def served(artifact: Path, workers: int = 1, env: dict | None = None, keep: Path | None = None):
    """``serve`` in a temporary folder (or ``keep``: the server log stays there)."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        with serve(Path(artifact), keep, workers=workers, env=env) as s:
            yield s
        return
    with tempfile.TemporaryDirectory(prefix="protonmf-check-") as tmp:
        with serve(Path(artifact), Path(tmp), workers=workers, env=env) as s:
            try:
                yield s
            except BaseException:
                print(
                    "--- server log tail ---\n" + s.log.read_text(errors="replace")[-3000:],
                    file=sys.stderr,
                )
                raise


def fashion_images(per_class: int = 3) -> list[tuple[str, bytes]]:
    """(folder name, PNG bytes): the first ``per_class`` test images of each class."""
    out = []
    for folder in sorted(p for p in FASHION_TEST.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.png"))[:per_class]:
            out.append((folder.name, path.read_bytes()))
    if not out:
        raise SystemExit(f"no test images under {FASHION_TEST}")
    return out


def worker_pids(pid: int) -> list[int]:
    """BentoML's service workers among the descendants of the server process ``pid``."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any(WORKER_MARK in part for part in child.cmdline()):
                out.append(child.pid)
    return out


def memory(pid: int) -> dict[str, int]:
    """{"rss", "peak"} in bytes (VmRSS, VmHWM) of ``pid``; {} if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {
        "rss": int(fields["VmRSS"].split()[0]) << 10,
        "peak": int(fields["VmHWM"].split()[0]) << 10,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
