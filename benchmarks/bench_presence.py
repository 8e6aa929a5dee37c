"""Latency of the Fashion default's graph (format 4: with ``pooled``) and of the same graph
with Eq. 9's presence maps (``--presence``) vs the black box, in one process.

All three run by onnxruntime on the CPU on one shared pool of 2 threads, interleaved in
shuffled rounds (``bench_graph.interleaved``); figures are medians over rounds, ratios are
against the black box measured in the same rounds. Usage:

    .venv/bin/python benchmarks/bench_presence.py [--artifact DIR] [--seconds 20] \
        [--extra format3=OLD/model.onnx]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bench_graph as bg
from _machine import REPO, RESULTS, machine_info, set_shared_thread_pool, shared_session

from protonmf.artifact import MODEL_FILE, Preprocessing, load_manifest, load_tensors
from protonmf.converter.export import export_onnx
from protonmf.converter.reexport import prototype_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "fashion-default")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per batch size")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another ONNX graph to time beside them (e.g. an older format's)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_presence.json")
    args = ap.parse_args()
    set_shared_thread_pool(bg.THREADS)
    manifest = load_manifest(args.artifact)
    tensors = load_tensors(args.artifact, manifest)
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    shape = (prep.channels, prep.height, prep.width)
    graph = manifest["graph"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "default": args.artifact / MODEL_FILE,
            "black-box": bg.export_blackbox(
                prototype_model(manifest, tensors).backbone, shape, Path(tmp) / "bb.onnx"
            ),
        }
        presence = prototype_model(manifest, tensors, graph["maps"], graph["scores"], presence=True)
        paths["presence"] = export_onnx(presence, shape, Path(tmp) / "presence.onnx")
        paths.update(dict(e.split("=", 1) for e in args.extra))
        sessions = {k: shared_session(p)[0] for k, p in paths.items()}
        pool = bg.image_pool(REPO / "data" / "fashion-mnist" / "test", manifest)
        rows = []
        for batch in (1, 32):
            x = bg.batch_of(pool, batch)
            fns = {k: bg.ort_fn(s, x) for k, s in sessions.items()}
            times = bg.interleaved(fns, rounds=30, seconds=args.seconds)
            for row in bg.summarise(times, "black-box", batch):
                row.pop("samples_ms")
                rows.append(row)
                print(
                    f"batch {batch:>2}  {row['variant']:>9}  {row['median_ms']:.3f} ms  "
                    f"{row['ratio_vs_baseline']:.3f}x black box "
                    f"(paired {row['paired_ratio_vs_baseline']:.3f})"
                )
    args.out.write_text(
        json.dumps(
            {"machine": machine_info(threads=bg.THREADS), "graph": graph, "rows": rows}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
