"""The service core's stages without a transport: decode, batched inference, explanation.

Where does a request's time go, and how much does a GPU move it? One process, no BentoML,
the same engine pieces the service runs (``protonmf.service.engine``: ``Model`` and
``Explanations``). For each device asked for (``cpu`` and, with ``--device cuda``,
onnxruntime's CUDA provider, TF32 off):

* ``decode``   untrusted JPEG bytes → uint8 crop (``Model.prepare``), per image, one thread;
* ``infer``    uint8 crops → graph outputs, one onnxruntime run per batch of 1, 8 and 32
               (``Model.infer``: normalisation + run + outputs copied back);
* ``explain``  graph outputs → the /explain JSON dict (top-3, heatmaps; ``Explanations``),
               per image.

Batch sizes and devices are interleaved per round (warm-up call before each timed call),
figures are medians. The ratio that matters for serving is images/s of ``infer`` at batch
32 against the per-image cost of ``decode`` + ``explain``, which the batcher cannot merge.

``--io-binding`` times ``GraphSession.run`` alone instead (a normalised batch → outputs on the
host), at batch 1 and 32, with every output and without the maps: ``session.run`` against
IOBinding on the same session (PROTONMF_IO_BINDING) and, with ``--device cuda``, CUDA graphs
(PROTONMF_CUDA_GRAPHS, buckets 1 and 32, each graph captured before timing). All outputs
are compared with ``session.run``'s (max |Δ|) before timing.

    .venv/bin/python benchmarks/bench_core.py ARTIFACT [--device cuda] [--images DIR]
    .venv/bin/python benchmarks/bench_core.py ARTIFACT --io-binding [--device cuda] [--max-diff D]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import _machine
import numpy as np
from _machine import RESULTS

from protonmf.graph import GraphSession
from protonmf.sample_data import imagenet_photo_files
from protonmf.service.engine.explanations import Explanations
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import ExplainOptions

BATCHES = (1, 8, 32)
BINDING_BATCHES = (1, 32)
MAP_OUTPUTS = {"maps", "topk_maps", "presence", "topk_presence"}


def jpeg_blobs(images: Path | None, n: int = 32) -> list[bytes]:
    """JPEG bytes of up to ``n`` photos (foolbox's ImageNet photos by default), cycled."""
    files = sorted(images.rglob("*.jp*g")) if images else imagenet_photo_files()
    if not files:
        raise SystemExit(f"no JPEG files under {images}")
    return [files[i % len(files)].read_bytes() for i in range(n)]


def timed(fn) -> float:
    fn()  # untimed warm-up right before the timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench(models: dict[str, Model], blobs: list[bytes], rounds: int) -> dict:
    any_model = next(iter(models.values()))
    crops = np.stack([any_model.prepare(b) for b in blobs])  # (32, h, w[, 3]) uint8
    options = ExplainOptions()
    explanations = {name: Explanations(model) for name, model in models.items()}
    out = {name: model.infer(crops[:1]) for name, model in models.items()}
    one = {name: {k: v[0] for k, v in o.items()} for name, o in out.items()}
    ms: dict[str, list[float]] = {}
    for _ in range(rounds):
        ms.setdefault("decode", []).append(timed(lambda: any_model.prepare(blobs[0])))
        for name, model in models.items():
            for b in BATCHES:
                ms.setdefault(f"infer {name} b{b}", []).append(
                    timed(lambda model=model, b=b: model.infer(crops[:b]))
                )
            ex = explanations[name]
            ms.setdefault(f"explain {name}", []).append(
                timed(lambda ex=ex, name=name: ex.explanation(one[name], options))
            )
    rows = []
    for key, ts in ms.items():
        per = int(key.rsplit("b", 1)[1]) if key.startswith("infer") else 1
        median = statistics.median(ts)
        rows.append(
            {
                "stage": key,
                "median_ms": median,
                "ms_per_image": median / per,
                "images_per_s": 1e3 * per / median,
                "samples_ms": ts,
            }
        )
    return {"rows": rows}


def report(result: dict, devices: list[str]) -> None:
    by = {r["stage"]: r for r in result["rows"]}
    print("| stage | median ms | ms/image | images/s |\n|---|---:|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['stage']} | {r['median_ms']:.2f} | {r['ms_per_image']:.2f} | "
            f"{r['images_per_s']:.0f} |"
        )
    per_image = by["decode"]["ms_per_image"]
    for d in devices:
        b32 = by[f"infer {d} b32"]
        serial = per_image + by[f"explain {d}"]["ms_per_image"]
        print(
            f"\n{d}: infer at batch 32 {b32['images_per_s']:.0f} img/s; decode + explain "
            f"{serial:.2f} ms/image on one thread = {1e3 / serial:.0f} img/s per core; "
            f"batch 32 vs batch 1: {by[f'infer {d} b1']['ms_per_image'] / b32['ms_per_image']:.1f}×"
        )
    if len(devices) == 2:
        ratio = by["infer cuda b32"]["images_per_s"] / by["infer cpu b32"]["images_per_s"]
        print(f"cuda/cpu infer throughput at batch 32: {ratio:.1f}×")


def bench_binding(artifact: Path, devices: list[str], threads, rounds: int) -> dict:
    """``GraphSession.run``: session.run vs IOBinding (same session) vs CUDA graphs (CUDA)."""
    runs: dict[str, dict[str, GraphSession]] = {}
    for device in devices:
        plain = GraphSession.load(artifact, device, threads, io_binding="off")
        runs[device] = {"plain": plain, "iobinding": dataclasses.replace(plain, io_binding=True)}
        if device == "cuda":
            graphs = GraphSession.load(
                artifact, device, threads, cuda_graphs=True, buckets=BINDING_BATCHES
            )
            runs[device]["cuda-graphs"] = graphs
    any_ex = runs[devices[0]]["plain"]
    spec = any_ex.preprocessing
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((max(BINDING_BATCHES), spec.channels, spec.height, spec.width))
    batch = batch.astype(np.float32)
    outputs = {
        "all": None,
        "no maps": {n for n in any_ex.manifest["graph"]["outputs"] if n not in MAP_OUTPUTS},
    }
    parity: dict[str, float] = {}
    for device, modes in runs.items():  # warm every size (captures the graphs), then compare
        for b in BINDING_BATCHES:
            for ex in modes.values():
                for _ in range(ex.warm_up_runs):
                    ex.run(batch[:b])
            ref = modes["plain"].run(batch[:b])
            for mode, ex in modes.items():
                got = ex.run(batch[:b])
                parity[f"{device} {mode} b{b}"] = max(
                    float(np.abs(got[k].astype(np.float64) - ref[k]).max()) for k in ref
                )
    ms: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for device, modes in runs.items():
            for b in BINDING_BATCHES:
                for kind, names in outputs.items():
                    for mode, ex in modes.items():
                        run = lambda ex=ex, b=b, names=names: ex.run(batch[:b], names)  # noqa: E731
                        ms.setdefault((device, b, kind, mode), []).append(timed(run))
    rows = []
    for (device, b, kind, mode), ts in ms.items():
        plain = statistics.median(ms[(device, b, kind, "plain")])
        median = statistics.median(ts)
        rows.append(
            {
                "device": device,
                "batch": b,
                "outputs": kind,
                "mode": mode,
                "median_ms": median,
                "vs_plain": median / plain,
                "samples_ms": ts,
            }
        )
    return {"rows": rows, "max_abs_diff_vs_plain": parity}


def report_binding(result: dict) -> None:
    print("| device | batch | outputs | run | median ms | × session.run |")
    print("|---|---:|---|---|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['device']} | {r['batch']} | {r['outputs']} | {r['mode']} | "
            f"{r['median_ms']:.2f} | {r['vs_plain']:.3f} |"
        )
    print(
        "\nmax |Δ| against session.run: "
        + ", ".join(f"{k} {v:.3g}" for k, v in result["max_abs_diff_vs_plain"].items())
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: time the CUDA provider beside the CPU one",
    )
    ap.add_argument("--images", type=Path, default=None, help="folder of JPEGs (default: photos)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--io-binding",
        action="store_true",
        help="time GraphSession.run: session.run vs IOBinding (vs CUDA graphs on cuda)",
    )
    ap.add_argument(
        "--max-diff",
        type=float,
        default=None,
        help="with --io-binding: exit 1 if an output differs from session.run's by "
        "more than this (max |Δ|)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result (default: benchmarks/results/bench_core[_iobinding].json)",
    )
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    if args.io_binding:
        info = _machine.machine_info(ort_threads=args.threads)
        print(
            f"machine: {info['cpu_model']} × {info['cpu_count']}, gpu={info['gpu']}, "
            f"onnxruntime {info['onnxruntime']}",
            flush=True,
        )
        result = bench_binding(args.artifact, devices, args.threads, args.rounds)
        report_binding(result)
        out = RESULTS / "bench_core_iobinding.json"
        _machine.write_result(
            args.out or out,
            {"machine": info, "artifact": str(args.artifact), "rounds": args.rounds, **result},
        )
        worst = max(result["max_abs_diff_vs_plain"].values())
        if args.max_diff is not None and worst > args.max_diff:
            print(f"FAIL: max |Δ| against session.run {worst:.3g} > {args.max_diff:g}")
            return 1
        return 0
    models = {d: Model.load(args.artifact, device=d, threads=args.threads) for d in devices}
    providers = {d: m.graph.provider for d, m in models.items()}
    info = _machine.machine_info(providers=providers, ort_threads=args.threads)
    print(
        f"machine: {info['cpu_model']} × {info['cpu_count']}, gpu={info['gpu']}, "
        f"onnxruntime {info['onnxruntime']}, providers {providers}",
        flush=True,
    )
    result = bench(models, jpeg_blobs(args.images), args.rounds)
    report(result, devices)
    out = {
        "machine": info,
        "artifact": str(args.artifact),
        "rounds": args.rounds,
        "model": models["cpu"].manifest["backbone"].get("architecture"),
        **result,
    }
    _machine.write_result(args.out or RESULTS / "bench_core.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
