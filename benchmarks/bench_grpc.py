"""gRPC vs REST: the same server, the same images, /explain vs protonmf.v1.ProtoNMF/Explain.

One `protonmf serve` (`--workers`, default 1; max_batch_size 32) with both transports. Closed loops of N
concurrent clients (one JPEG per request, heatmaps on, top-3): REST through one
httpx.AsyncClient, gRPC through one grpc.aio channel. The two transports alternate in
windows (REST, gRPC, REST, gRPC, …) so drift on this shared machine hits both; per
transport the windows are pooled: throughput = answers / counted seconds, latency
percentiles over all answers. Adaptive batch sizes are deltas of
bentoml_service_adaptive_batch_size over each window (both transports use one batcher).
After the server stops, the same script times raw onnxruntime in-process at batch 32 on
preprocessed tensors (black-box graph and the artifact's graph, ORT's default threads as
the server), so each transport's throughput is also a ratio against raw onnxruntime.

    .venv/bin/python benchmarks/bench_grpc.py              # 32 clients, 4 × 10 s per transport
    .venv/bin/python benchmarks/bench_grpc.py --quick      # 2 × 4 s
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from pathlib import Path

import _machine
import grpc
import httpx
import numpy as np
from _machine import RESULTS
from bench_service import (
    ensure_artifact,
    ensure_blackbox,
    hist_delta,
    machine_info,
    parse_metrics,
    raw_ort,
    server,
)

from protonmf.artifact import Preprocessing, load_manifest
from protonmf.client import grpc_channel_options
from protonmf.launcher import free_port
from protonmf.sample_data import imagenet_photo_files
from protonmf.service.grpc.server import pb, pb_grpc

TIMEOUT_S = 60
BATCH_METRIC = "protonmf_inference_batch_size"  # the data plane's batches, both transports


async def closed_loop(send, payloads, clients: int, warmup: float, duration: float) -> dict:
    """N tasks; each sends, waits, sends the next. Returns answers and latencies in the window."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    t_window, t_end = t0 + warmup, t0 + warmup + duration
    latencies, errors = [], {}

    async def task(i: int) -> None:
        k = i
        while loop.time() < t_end:
            blob = payloads[k % len(payloads)]
            k += clients
            start = loop.time()
            status = await send(blob)
            end = loop.time()
            if start >= t_window and end <= t_end:
                if status == "OK":
                    latencies.append((end - start) * 1e3)
                else:
                    errors[status] = errors.get(status, 0) + 1

    await asyncio.gather(*(task(i) for i in range(clients)))
    return {"latencies_ms": latencies, "errors": errors, "seconds": duration}


async def rest_window(url, payloads, clients, warmup, duration):
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as c:

        async def send(blob):
            try:
                r = await c.post("/explain", files={"images": ("x.jpg", blob, "image/jpeg")})
            except httpx.HTTPError as e:
                return type(e).__name__
            if r.status_code == 200:
                r.json()  # the client's share of the work: parse the answer
                return "OK"
            return str(r.status_code)

        return await closed_loop(send, payloads, clients, warmup, duration)


async def grpc_window(target, payloads, clients, warmup, duration, channels=1):
    """``channels`` > 1: one connection each (service/client.py's options), calls spread
    round-robin — how one client reaches several workers."""
    options = grpc_channel_options(64 << 20, own_connection=channels > 1)
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    stubs = [pb_grpc.ProtoNMFStub(c) for c in opened]
    turn = itertools.count()

    async def send(blob):
        stub = stubs[next(turn) % channels]
        try:
            await stub.Explain(pb.ExplainRequest(images=[blob]), timeout=TIMEOUT_S)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    try:
        return await closed_loop(send, payloads, clients, warmup, duration)
    finally:
        for channel in opened:
            await channel.close()


def summarise(windows: list[dict], batches: list[dict]) -> dict:
    lat = np.array([x for w in windows for x in w["latencies_ms"]])
    seconds = sum(w["seconds"] for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    n_batches = sum(b["count"] for b in batches)
    return {
        "answers": int(lat.size),
        "images_per_s": lat.size / seconds,
        "images_per_s_by_window": [len(w["latencies_ms"]) / w["seconds"] for w in windows],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
        "mean_batch": sum(b["sum"] for b in batches) / n_batches if n_batches else None,
        "batches": int(n_batches),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="default: Lite0 artifact as in bench_service")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_service_work"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server workers (onnxruntime threads: the service's default split)",
    )
    ap.add_argument(
        "--grpc-channels",
        default="1",
        help="gRPC connections the load is spread over (several reach several "
        "workers); a comma list adds one gRPC window per value, e.g. 1,2",
    )
    ap.add_argument("--windows", type=int, default=4, help="windows per transport")
    ap.add_argument("--duration", type=float, default=10.0, help="counted seconds per window")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_grpc.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.windows, args.duration = 2, 4.0
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.blackbox = None
    artifact = ensure_artifact(args)
    manifest = load_manifest(artifact)
    blackbox = ensure_blackbox(args, artifact, manifest)
    payloads = [f.read_bytes() for f in imagenet_photo_files()]
    grpc_port = free_port()
    env = dict(
        os.environ,
        BENTOML_DO_NOT_TRACK="true",
        PROTONMF_MAX_BATCH_SIZE="32",
        PROTONMF_WORKERS=str(args.workers),
        BENTOML_HOME=str(args.workdir / "bentoml_home_grpc"),
    )
    cmd = [
        sys.executable,
        "-m",
        "protonmf.cli",
        "serve",
        str(artifact),
        "--grpc-port",
        str(grpc_port),
    ]
    start = machine_info()
    channels = [int(n) for n in str(args.grpc_channels).split(",")]
    grpc_names = {n: "grpc" if i == 0 else f"grpc-{n}ch" for i, n in enumerate(channels)}
    results: dict[str, dict] = {k: {"w": [], "b": []} for k in ("rest", *grpc_names.values())}
    with server("protonmf", cmd, env, args.workdir / "server-grpc.log") as (url, _pid):
        target = f"127.0.0.1:{grpc_port}"
        for _ in range(100):  # gRPC health turns SERVING shortly after /readyz
            try:
                with grpc.insecure_channel(target) as ch:
                    pb_grpc.ProtoNMFStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        windows = {
            "rest": lambda: rest_window(url, payloads, args.clients, args.warmup, args.duration)
        }
        for n, name in grpc_names.items():
            windows[name] = lambda n=n: grpc_window(
                target, payloads, args.clients, args.warmup, args.duration, n
            )
        for i in range(args.windows):
            for name, window in windows.items():
                before = parse_metrics(httpx.get(f"{url}/metrics").text)
                w = asyncio.run(window())
                after = parse_metrics(httpx.get(f"{url}/metrics").text)
                results[name]["w"].append(w)
                results[name]["b"].append(hist_delta(before, after, BATCH_METRIC))
                print(
                    f"  window {i + 1} {name:<9}: {len(w['latencies_ms']) / w['seconds']:6.1f} img/s, "
                    f"errors {w['errors'] or 0}",
                    flush=True,
                )
    summary = {k: summarise(v["w"], v["b"]) for k, v in results.items()}
    raw = raw_ort(
        artifact, blackbox, Preprocessing.from_dict(manifest["preprocessing"]), None, repeats=10
    )
    raw32 = raw["black-box"]["32"]["images_per_s"]
    report = {
        "settings": {
            "artifact": str(artifact),
            "clients": args.clients,
            "windows": args.windows,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "grpc_channels": grpc_names,
            "max_batch_size": 32,
            "payloads": "20 foolbox ImageNet JPEGs, one per request",
            "request": "explain, top_k 3, heatmaps on",
        },
        "machine": {"start": start, "end": machine_info()},
        **summary,
        "grpc_over_rest_images_per_s": summary["grpc"]["images_per_s"]
        / summary["rest"]["images_per_s"],
        "grpc_over_rest_p99": summary["grpc"]["p99_ms"] / summary["rest"]["p99_ms"],
        "raw_onnxruntime": raw,
        "over_raw_blackbox_batch32": {k: summary[k]["images_per_s"] / raw32 for k in summary},
    }
    print(
        "\n| transport | img/s | p50 ms | p99 ms | mean batch | errors |\n|---|---:|---:|---:|---:|---:|"
    )
    for k in summary:
        s = summary[k]
        print(
            f"| {k} | {s['images_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{s['mean_batch'] or 0:.1f} | {sum(s['errors'].values())} |"
        )
    print(
        f"\ngRPC / REST throughput = {report['grpc_over_rest_images_per_s']:.2f} (target ≥ 0.9), "
        f"p99 ratio = {report['grpc_over_rest_p99']:.2f}"
    )
    print(
        f"raw onnxruntime black-box at batch 32: {raw32:.1f} img/s (fused graph "
        f"{raw['fused']['32']['images_per_s']:.1f}); over raw: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["over_raw_blackbox_batch32"].items())
        + " (target ≥ 0.6)"
    )
    _machine.write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
