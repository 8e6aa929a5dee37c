"""What the benchmarks record about the machine they ran on (shared by the scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path


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
            capture_output=True, text=True, check=True, timeout=30,
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
