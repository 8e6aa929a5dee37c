"""Decoding in processes (PROTONMF_DECODE_PROCESSES) against the worker's decode threads:
what the hop to a process costs, and images/s.

JPEG photos (foolbox's 512 × 512 ImageNet photos by default) to the model's crop (a
Lite0-like 224 × 224 RGB crop, bicubic from 256, unless --artifact names one):

* ``in-process``  ``decode_crop`` (what ``Model.prepare`` runs) on one thread, one image at
                  a time: CPU-ms and wall-ms per image; the baseline.
* ``hop``         one image at a time through a pool of one process, per transport (the
                  crop back through the pipe, or through a shared-memory slot): the worker's
                  CPU-ms per image (``time.process_time``), the child's
                  (``/proc/PID/schedstat``), the latency. hop = worker + child − baseline.
* ``throughput``  every image in flight at once: images/s and the worker's CPU-ms per image
                  for a pool of --processes processes, a thread pool of as many threads (the
                  DataPlane's default path) and one thread.

Rounds interleave the variants; figures are medians over the rounds. Ratios are against the
in-process baseline.

    .venv/bin/python benchmarks/bench_decode.py [--processes 2] [--rounds 3] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _machine
from _machine import RESULTS

TRANSPORTS = ("pipe", "shm")
TINY = " (64 px JPEG)"


def photos(images: Path | None) -> list[bytes]:
    from PIL import Image

    from protonmf.sample_data import imagenet_photo_files

    if images is None:  # the 512 × 512 ones (19 of foolbox's 20)
        files = [f for f in imagenet_photo_files() if Image.open(f).size == (512, 512)]
    else:
        files = sorted(images.rglob("*.jp*g"))
    if not files:
        raise SystemExit(f"no JPEG files under {images}")
    return [f.read_bytes() for f in files]


def child_cpu_s(pids: list[int]) -> float:
    """CPU seconds the processes have run (schedstat: nanoseconds on a CPU)."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids) / 1e9


async def one_at_a_time(variants: dict, blobs: list[bytes]) -> dict[str, dict]:
    """Each image through every variant in turn (background load drifts apart from none of
    them): wall, worker CPU and child CPU (``pids``) per image. ``variants``: name →
    (async prepare, child pids or None)."""
    sums = {name: [0.0, 0.0, 0.0] for name in variants}
    for b in blobs:
        for name, (prepare, pids) in variants.items():
            c0 = child_cpu_s(pids) if pids else 0.0
            t0, p0 = time.perf_counter(), time.process_time()
            await prepare(b)
            p1, t1 = time.process_time(), time.perf_counter()
            c1 = child_cpu_s(pids) if pids else 0.0
            acc = sums[name]
            acc[0], acc[1], acc[2] = acc[0] + t1 - t0, acc[1] + p1 - p0, acc[2] + c1 - c0
    rows = {}
    for name, (wall, worker, child) in sums.items():
        n = len(blobs)
        rows[name] = {"ms_per_image": 1e3 * wall / n, "worker_cpu_ms_per_image": 1e3 * worker / n}
        if variants[name][1]:
            rows[name]["child_cpu_ms_per_image"] = 1e3 * child / n
    return rows


async def all_at_once(prepare, blobs: list[bytes], pids: list[int] | None = None) -> dict:
    c0 = child_cpu_s(pids) if pids else 0.0
    t0, p0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(prepare(b) for b in blobs))
    wall, worker = time.perf_counter() - t0, time.process_time() - p0
    n = len(blobs)
    row = {"images_per_s": n / wall, "worker_cpu_ms_per_image": 1e3 * worker / n}
    if pids:
        row["child_cpu_ms_per_image"] = 1e3 * (child_cpu_s(pids) - c0) / n
    return row


def tiny_jpeg() -> bytes:
    """A 64 × 64 JPEG: decoding it costs little, so the hop is most of its cost."""
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


async def bench(blobs: list[bytes], spec, processes: int, rounds: int, repeat: int) -> dict:
    import numpy as np

    from protonmf.service.decode.images import Limits
    from protonmf.service.decode.pool import DecodePool, decode_crop

    limits = Limits()
    loop = asyncio.get_running_loop()
    seq = blobs * repeat
    many = blobs * repeat * processes

    async def inline(b):
        return decode_crop(b, limits, spec)

    threads = ThreadPoolExecutor(processes, thread_name_prefix="decode")
    one_thread = ThreadPoolExecutor(1, thread_name_prefix="decode1")
    pools = {}
    for transport in TRANSPORTS:
        hop = DecodePool(1, limits, spec, transport=transport)
        wide = DecodePool(processes, limits, spec, transport=transport)
        await hop.start()
        await wide.start()
        pools[transport] = (hop, wide)
    try:
        reference = [decode_crop(b, limits, spec) for b in blobs]
        for hop, wide in pools.values():  # the same crops, or no figures
            for pool in (hop, wide):
                got = await asyncio.gather(*(pool.prepare(b) for b in blobs))
                assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
        samples: dict[str, list[dict]] = {}
        variants = {"in-process": (inline, None)}
        variants |= {f"hop {t}": (hop.prepare, hop.pids()) for t, (hop, _) in pools.items()}
        tiny = [tiny_jpeg()] * len(seq)
        for _ in range(rounds):
            for name, row in (await one_at_a_time(variants, seq)).items():
                samples.setdefault(name, []).append(row)
            for name, row in (await one_at_a_time(variants, tiny)).items():
                samples.setdefault(name + TINY, []).append(row)
            for transport, (_, wide) in pools.items():
                samples.setdefault(f"{processes} processes {transport}", []).append(
                    await all_at_once(wide.prepare, many, wide.pids())
                )
            for name, executor in ((f"{processes} threads", threads), ("1 thread", one_thread)):
                run = lambda b, ex=executor: loop.run_in_executor(ex, decode_crop, b, limits, spec)  # noqa: E731
                samples.setdefault(name, []).append(await all_at_once(run, many))
    finally:
        for hop, wide in pools.values():
            hop.close()
            wide.close()
        threads.shutdown()
        one_thread.shutdown()
    rows = []
    for name, runs in samples.items():
        row = {"variant": name}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
            row[f"{key}_samples"] = [r[key] for r in runs]
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    base_ips = by["1 thread"]["images_per_s"]
    for r in rows:
        if r["variant"].startswith("hop"):
            base = by["in-process" + (TINY if r["variant"].endswith(TINY) else "")]
            base_cpu = base["worker_cpu_ms_per_image"]
            r["hop_cpu_ms_per_image"] = (
                r["worker_cpu_ms_per_image"] + r["child_cpu_ms_per_image"] - base_cpu
            )
            r["cpu_vs_in_process"] = (
                r["worker_cpu_ms_per_image"] + r["child_cpu_ms_per_image"]
            ) / base_cpu
            r["latency_vs_in_process"] = r["ms_per_image"] / base["ms_per_image"]
        if "images_per_s" in r:
            r["throughput_vs_1_thread"] = r["images_per_s"] / base_ips
    return {
        "rows": rows,
        "images": len(blobs),
        "sequential_images": len(seq),
        "in_flight_images": len(many),
    }


def report(result: dict) -> None:
    print(
        "| variant | ms/image | images/s | worker CPU-ms/image | child CPU-ms/image | "
        "hop CPU-ms/image | vs baseline |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in result["rows"]:
        ratio = r.get("cpu_vs_in_process") or r.get("throughput_vs_1_thread")
        cells = [
            r.get(k)
            for k in (
                "ms_per_image",
                "images_per_s",
                "worker_cpu_ms_per_image",
                "child_cpu_ms_per_image",
                "hop_cpu_ms_per_image",
            )
        ]
        text = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
        print(f"| {r['variant']} | {text} | {'' if ratio is None else f'{ratio:.2f}x'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="decode processes and threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the photos per round")
    ap.add_argument("--images", type=Path, default=None, help="folder of JPEGs (default: photos)")
    ap.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="its preprocessing (default: 224 × 224 RGB, bicubic from 256)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_decode.json")
    args = ap.parse_args(argv)

    from protonmf.artifact import Preprocessing

    if args.artifact:
        import json

        spec = Preprocessing.from_dict(
            json.loads((args.artifact / "manifest.json").read_text())["preprocessing"]
        )
    else:
        spec = Preprocessing(height=224, width=224, resize=256, interpolation="bicubic")
    blobs = photos(args.images)
    info = _machine.machine_info(processes=args.processes)
    print(
        f"machine: {info['cpu_model']} × {info['cpu_count']}, load {info['load_avg']}", flush=True
    )
    result = asyncio.run(bench(blobs, spec, args.processes, args.rounds, args.repeat))
    report(result)
    _machine.write_result(
        args.out,
        {"machine": info, "preprocessing": spec.to_dict(), "rounds": args.rounds, **result},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
