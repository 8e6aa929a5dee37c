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
    lines = subprocess.run(["top", "-bn1"], capture_output=True, text=True, check=False).stdout
    lines = lines.splitlines()
    return lines[:5], lines[6:10]


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
        **extra,
        "top": top,  # `top -bn1 | head -5`
        "busiest_processes": busiest,  # header + 3 busiest, to name other load
        "load_1min": load[0],
        "load_avg": list(load),
    }
