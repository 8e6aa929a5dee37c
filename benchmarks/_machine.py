"""What the benchmark scripts share: the repository's paths, what they record about the
machine they ran on, their result files, and one onnxruntime thread pool per process.

The scripts import the installed package (``protonmf``, an editable install in .venv) and
this module as ``import _machine``: ``python benchmarks/NAME.py`` puts benchmarks/ first
on sys.path."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # the scripts' default --out folder


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def top_snapshot() -> tuple[list[str], list[str]]:
    """(`top -bn1 | head -5`, header + 3 busiest processes): the load beside the run."""
    try:
        lines = subprocess.run(["top", "-bn1"], capture_output=True, text=True, check=False).stdout
    except OSError:  # no procps (bare GPU images)
        return ["top: not installed"], []
    lines = lines.splitlines()
    return lines[:5], lines[6:10]


def gpu_name() -> str | None:
    """The first GPU's name and driver from nvidia-smi, or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine_info(**extra) -> dict:
    """CPU, platform, onnxruntime version and the load beside the run; ``extra`` adds the
    script's own settings (threads, library versions)."""
    import os
    import platform

    import onnxruntime

    top, busiest = top_snapshot()
    load = os.getloadavg()
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "gpu": gpu_name(),
        **extra,
        "top": top,  # `top -bn1 | head -5`
        "busiest_processes": busiest,  # header + 3 busiest, to name other load
        "load_1min": load[0],
        "load_avg": list(load),
    }


def write_result(path, report: dict) -> None:
    """The benchmark's JSON result file (folders made as needed), and say where it went."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


# ----------------------------------------------------------------- shared thread pool
#
# Benchmarks interleave several onnxruntime sessions in one process on few cores: with a
# pool per session, each session's workers keep spinning after its run on the cores the
# next session's run needs. One pool for all of a process's sessions avoids that. The
# service holds one session per process and does not need it (it lives here, not in
# protonmf.graph).

_shared_pool_threads: int | None = None


def set_shared_thread_pool(threads: int) -> None:
    """From now on, sessions made by ``session``/``shared_session`` in this process run on
    one pool of ``threads`` intra-op threads (spinning: onnxruntime's default).

    Call before the process's first onnxruntime session: the pool comes with onnxruntime's
    environment, which the first session creates."""
    import onnxruntime as ort

    global _shared_pool_threads
    if threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    if _shared_pool_threads not in (None, threads):
        raise RuntimeError(f"the shared pool already has {_shared_pool_threads} threads")
    ort.set_global_thread_pool_sizes(threads, 1)  # onnxruntime's public API
    _shared_pool_threads = threads


def shared_pool_threads() -> int | None:
    """The shared pool's size once ``set_shared_thread_pool`` ran, else None."""
    return _shared_pool_threads


def shared_session(model_path, device: str = "cpu"):
    """(session, provider in use) on the shared pool: ``use_per_session_threads = False``,
    full graph optimisation, providers as ``protonmf.graph.create_session``."""
    import onnxruntime as ort

    from protonmf.graph import ProviderError, cuda_options

    if _shared_pool_threads is None:
        raise RuntimeError("shared_session before set_shared_thread_pool")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.use_per_session_threads = False
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", cuda_options()))
    s = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    if device == "cuda" and s.get_providers()[0] != "CUDAExecutionProvider":
        raise ProviderError(f"CUDA was requested but onnxruntime runs on {s.get_providers()[0]}")
    return s, s.get_providers()[0]


def session(model_path, device: str = "cpu", threads: int | None = None):
    """(session, provider in use): on the shared pool once ``set_shared_thread_pool`` ran
    (``threads`` must then be None or the pool's size), else ``create_session``'s own pool."""
    if _shared_pool_threads is None:
        from protonmf.graph import create_session

        return create_session(model_path, device, threads=threads)
    if threads not in (None, _shared_pool_threads):
        raise ValueError(
            f"this process runs its sessions on a shared pool of "
            f"{_shared_pool_threads} threads; got threads={threads}"
        )
    return shared_session(model_path, device)
