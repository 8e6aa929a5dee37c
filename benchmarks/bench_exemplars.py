"""Conversion time with and without exemplars (issue: at most +20% on the Fashion default).

Runs ``protonmf convert`` (defaults) in fresh processes, alternating ``--exemplars 0`` and
``--exemplars 8`` so that load on the machine hits both alike; reports each run's wall
time and the ratio of medians. Usage: python benchmarks/bench_exemplars.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_info


def convert_seconds(exemplars: int, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "protonmf.cli",
        "convert",
        "--quiet",
        "--exemplars",
        str(exemplars),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "bench_exemplars.json")
    )
    args = ap.parse_args()
    runs = {0: [], 8: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            for m in (0, 8):
                runs[m].append(convert_seconds(m, Path(tmp) / f"art{m}"))
                print(f"--exemplars {m}: {runs[m][-1]:.1f} s", flush=True)
    ratio = statistics.median(runs[8]) / statistics.median(runs[0])
    result = {
        "machine": machine_info(),
        "seconds": {str(k): v for k, v in runs.items()},
        "ratio_median_with_over_without": ratio,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"conversion time with exemplars / without: {ratio:.3f} (medians of {args.reps})")


if __name__ == "__main__":
    main()
