"""Acceptance run (issue #16): mixed load with every answer checked. ``--clients`` (64)
clients for ``--seconds`` (60): half REST, half gRPC, each alternating Classify and
Explain (heatmaps on) with one or two Fashion test images per request, back to back.
Every answer's top-1 class, per image, must equal the single-request reference taken
before the load (one REST /classify per image, checked against one gRPC Classify).

Passes when there are 0 errors (any non-200 / non-OK, exception or wrong top-1), the
worker RSS after the load is ≤ 1.2× before, and — with ``--settle S`` > 0 — the median
single-request /explain latency S seconds after the load is within 1.5× of before it
(issue #16: "2 minutes after a burst": ``--settle 120``).

    .venv/bin/python -m tests.acceptance.check_load ARTIFACT                  # 64 × 60 s
    .venv/bin/python -m tests.acceptance.check_load ARTIFACT --settle 120     # and the recovery
    .venv/bin/python -m tests.acceptance.check_load ARTIFACT --seconds 10 --clients 16

(from the repository root: tests.acceptance is a package there)

Exit 0: passed; 1: failed (what failed is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from tests.acceptance.common import fashion_images, memory, mib, percentile, served, worker_pids

RSS_GROWTH = 1.2
RECOVERY = 1.5


def top1_classify(r) -> list[str]:
    return [p.top_k[0].class_name for p in r.predictions]


def top1_explain(r) -> list[str]:
    return [e.top_k[0].class_name for e in r.explanations]


async def reference(url: str, target: str, images: list[bytes]) -> list[str]:
    from protonmf.client import AsyncGrpcClient, AsyncRestClient

    async with AsyncRestClient(url) as rest, AsyncGrpcClient(target) as grpc_:
        ref = [top1_classify(await rest.classify([b]))[0] for b in images]
        via_grpc = [top1_classify(await grpc_.classify([b]))[0] for b in images]
    if ref != via_grpc:
        raise SystemExit(f"FAIL: REST and gRPC references differ: {ref} vs {via_grpc}")
    return ref


async def single_latency(url: str, image: bytes, n: int = 30) -> float:
    """Median seconds of ``n`` sequential single-image /explain requests."""
    from protonmf.client import AsyncRestClient

    out = []
    async with AsyncRestClient(url) as rest:
        await rest.explain([image])
        for _ in range(n):
            t = time.perf_counter()
            await rest.explain([image])
            out.append(time.perf_counter() - t)
    return statistics.median(out)


async def client(i: int, url: str, target: str, images, ref, until: float, stats: dict) -> None:
    from protonmf.client import AsyncGrpcClient, AsyncRestClient

    rng = random.Random(i)
    transport = "rest" if i % 2 == 0 else "grpc"
    c = AsyncRestClient(url) if transport == "rest" else AsyncGrpcClient(target)
    async with c:
        n = 0
        while time.monotonic() < until:
            method = ("classify", "explain")[n % 2]
            n += 1
            picks = rng.sample(range(len(images)), rng.choice((1, 1, 2)))
            key = f"{transport} {method}"
            t = time.perf_counter()
            try:
                if method == "classify":
                    got = top1_classify(await c.classify([images[j] for j in picks], top_k=3))
                else:
                    got = top1_explain(await c.explain([images[j] for j in picks], top_k=3))
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                stats["errors"].append(f"{key}: {type(e).__name__}: {str(e)[:200]}")
                continue
            stats["latency"][key].append(time.perf_counter() - t)
            stats["requests"][key] += 1
            stats["images"] += len(picks)
            want = [ref[j] for j in picks]
            if got != want:
                stats["errors"].append(f"{key}: top-1 {got}, reference {want}")


async def load(url, target, images, ref, clients: int, seconds: float) -> dict:
    stats = {"errors": [], "latency": {}, "requests": Counter(), "images": 0}
    for t in ("rest", "grpc"):
        for m in ("classify", "explain"):
            stats["latency"][f"{t} {m}"] = []
    until = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(
        *(client(i, url, target, images, ref, until, stats) for i in range(clients))
    )
    stats["seconds"] = time.monotonic() - t0
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after the load before the recovery check (0: none)",
    )
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    named = fashion_images(3)
    images = [b for _, b in named]
    with served(args.artifact, workers=args.workers) as s:
        ref = asyncio.run(reference(s.url, s.grpc_target, images))
        before_latency = asyncio.run(single_latency(s.url, images[0]))
        pids = worker_pids(s.proc.pid)
        before = {p: memory(p) for p in pids}
        stats = asyncio.run(load(s.url, s.grpc_target, images, ref, args.clients, args.seconds))
        after = {p: memory(p) for p in pids}
        if args.settle > 0:
            time.sleep(args.settle)
        after_latency = asyncio.run(single_latency(s.url, images[0]))
        pids_after = worker_pids(s.proc.pid)
    total = sum(stats["requests"].values())
    print(f"reference: {len(images)} images, top-1 of REST = gRPC: {Counter(ref).most_common()}")
    print(
        f"{args.clients} clients × {stats['seconds']:.1f} s ({args.workers} worker(s)): "
        f"{total} requests, {stats['images']} images "
        f"({stats['images'] / stats['seconds']:.1f} img/s), errors {len(stats['errors'])}"
    )
    for key, lat in stats["latency"].items():
        print(
            f"  {key:14} {len(lat):6} requests  p50 {percentile(lat, 50) * 1000:6.0f} ms  "
            f"p99 {percentile(lat, 99) * 1000:6.0f} ms  max {max(lat, default=0) * 1000:6.0f} ms"
        )
    for e in stats["errors"][:20]:
        print("  error:", e)
    ok = not stats["errors"] and total > 0
    for p in pids:
        b, a = before[p], after.get(p) or {}
        growth = a.get("rss", 0) / b["rss"] if b else float("inf")
        print(
            f"worker {p}: RSS {mib(b['rss'])} before, {mib(a.get('rss', 0))} after "
            f"({growth:.2f}×), peak {mib(a.get('peak', 0))}"
        )
        ok &= growth <= RSS_GROWTH
    if set(pids) != set(pids_after) or not pids:
        print(f"FAIL: workers {pids} before, {pids_after} after (restarted?)")
        ok = False
    ratio = after_latency / before_latency
    print(
        f"single /explain median: {before_latency * 1000:.1f} ms before, "
        f"{after_latency * 1000:.1f} ms {args.settle:g} s after the load ({ratio:.2f}×)"
    )
    if args.settle > 0 and ratio > RECOVERY:
        print(f"FAIL: latency after the load over {RECOVERY}× before")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
