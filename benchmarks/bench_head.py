"""What each part of the explanation head costs at batch 1, against the black box.

The top-k graph (scores="topk", maps="topk") is cut down to nested sets of outputs with
``onnx.utils.extract_model`` (each keeps only the nodes its outputs need), and every cut
runs beside the black-box graph of the same backbone and the all-class graphs, interleaved
in an order shuffled each round, one untimed call before each timed one
(``bench_graph.interleaved``):

    logits      the prototype model's logits alone (pooled · Σ_i a_i b'_i + bias)
    +topk       … and the top-k classes (TopK)
    +maps       … and their k·p similarity maps (Gather, MatMul, Reshapes)
    +terms      … and their scores, contributions and bias (ReduceMean, Gathers, Mul)
    topk        the whole top-k graph (… and ``pooled``)
    allscores   scores="all", maps="topk"
    all         scores="all", maps="all": one 1×1 conv of C·p filters, means, a, bias

One of the last three is the artifact's own graph (``default`` in the result: for the
10-class Fashion model, ``all``); the others are the same prototypes exported in that mode.

``--extra NAME=PATH`` adds other graphs, e.g. the artifact exported by an earlier commit
(a before/after of the head in one process); ``--graphs NAME…`` keeps only those beside
the black box.

Each repetition runs in a fresh process: the default graph's ratio to the black box moved
by ~3% from one process to the next (1.011–1.042 on 2 threads over 8 processes,
``results/bench_head_pair.json``), so one process is one sample. By default a process's
sessions share one onnxruntime thread pool (``--ort-pool shared``): with a pool per
session, each session's workers keep spinning after its run, on the 2 cores the next
session's run needs, and the logits-only cut (the black box's own nodes) read 0.93–1.04×
the black box on 2 threads (``results/bench_head_own_pools.json``).

Run from the repository root (defaults: the Fashion-MNIST default artifact, 1 and 2
onnxruntime threads, 3 processes × 20 s per thread count):

    .venv/bin/python benchmarks/bench_head.py --workdir /tmp/bench_head
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _machine
import bench_graph
import numpy as np
import onnx
from _machine import REPO, RESULTS

from protonmf.data import find_split

CUTS = {
    "logits": ["logits"],
    "+topk": ["logits", "topk_classes"],
    "+maps": ["logits", "topk_classes", "topk_maps"],
    "+terms": [
        "logits",
        "topk_classes",
        "topk_maps",
        "topk_scores",
        "topk_contributions",
        "topk_bias",
    ],
}


def cut_graphs(model_path: Path, work: Path) -> dict[str, Path]:
    """Each cut of a top-k graph, written into ``work``."""
    graph = onnx.load(str(model_path))
    inputs = [i.name for i in graph.graph.input]
    paths = {}
    for name, outputs in CUTS.items():
        path = work / f"cut-{name.lstrip('+')}.onnx"
        onnx.utils.extract_model(str(model_path), str(path), inputs, outputs)
        paths[name] = path
    paths["topk"] = model_path
    return paths


def node_counts(paths: dict[str, Path]) -> dict[str, int]:
    return {name: len(onnx.load(str(p)).graph.node) for name, p in paths.items()}


def run(args, work: Path) -> dict:
    artifact = args.artifact.resolve()
    if artifact == bench_graph.REPO / "artifacts" / "fashion-default":
        bench_graph.ensure_fashion(artifact)
    images = find_split(REPO / "data" / "fashion-mnist")
    subject = bench_graph.build_subject(
        "fashion-resnet18", artifact, images[1] or images[0], work, sessions=False
    )
    paths = {
        "black-box": subject.paths["black-box"],
        **cut_graphs(subject.paths["fused-topk"], work),
        "allscores": subject.paths["fused-allscores"],
        "all": subject.paths["fused-all"],
    }
    for extra in args.extra:  # e.g. the same artifact exported by an earlier commit
        name, _, path = extra.partition("=")
        paths[name] = Path(path)
    if args.graphs:
        unknown = set(args.graphs) - set(paths)
        if unknown:
            raise SystemExit(f"unknown --graphs {sorted(unknown)}; known: {list(paths)}")
        paths = {v: p for v, p in paths.items() if v == "black-box" or v in args.graphs}
    result = {
        "artifact": str(artifact),
        "default": subject.default.removeprefix("fused-"),
        "nodes": node_counts(paths),
        "threads": {},
    }
    np.save(work / "input.npy", bench_graph.batch_of(subject.pool, 1))
    for threads in args.threads:
        print(
            f"{threads} thread(s), {args.ort_pool} pool: {args.reps} processes × "
            f"(≥ {args.repeats} rounds, ≥ {args.seconds:g} s) …",
            flush=True,
        )
        reps = [rep_in_process(paths, work, threads, args, rep) for rep in range(args.reps)]
        result["threads"][str(threads)] = summarise_reps(reps)
    return result


def rep_in_process(paths: dict[str, Path], work: Path, threads: int, args, rep: int) -> dict:
    """One repetition in a fresh process (a ratio moved by ~3% between processes: where the
    sessions' memory lands is fixed for a process's life, so its repetitions share it)."""
    spec = {
        "paths": {v: str(p) for v, p in paths.items()},
        "input": str(work / "input.npy"),
        "threads": threads,
        "ort_pool": args.ort_pool,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "rep": rep,
    }
    return bench_graph.in_child(Path(__file__), "--rep-spec", spec, work)


def timed_rep(spec: dict) -> dict[str, list[float]]:
    """The child's work: sessions created in an order rotated per repetition, timed rounds."""
    if spec["ort_pool"] == "shared":
        _machine.set_shared_thread_pool(spec["threads"])
    threads = None if spec["ort_pool"] == "shared" else spec["threads"]
    names = list(spec["paths"])
    names = names[spec["rep"] % len(names) :] + names[: spec["rep"] % len(names)]
    sessions = {v: _machine.session(spec["paths"][v], "cpu", threads=threads)[0] for v in names}
    x = np.load(spec["input"])
    fns = {v: bench_graph.ort_fn(sessions[v], x) for v in spec["paths"]}
    return bench_graph.interleaved(fns, spec["repeats"], spec["seconds"], max_rounds=20000)


def summarise_reps(reps: list[dict[str, list[float]]]) -> dict:
    """Per graph: median µs and ratios over all repetitions' rounds, paired ratio per rep."""
    out = {}
    for v in reps[0]:
        ts = [t for rep in reps for t in rep[v]]
        base = [t for rep in reps for t in rep["black-box"]]
        out[v] = {
            "median_us": statistics.median(ts) * 1e3,
            "ratio_vs_black_box": statistics.median(ts) / statistics.median(base),
            "paired_ratio_vs_black_box": statistics.median(
                t / b for t, b in zip(ts, base, strict=True)
            ),
            "paired_ratio_per_rep": [
                statistics.median(t / b for t, b in zip(r[v], r["black-box"], strict=True))
                for r in reps
            ],
            "rounds": len(ts),
        }
    return out


def report(result: dict) -> None:
    print(
        "\n| graph | nodes | "
        + " | ".join(
            f"{t} thread(s): µs, ratio (paired; per rep min–max)" for t in result["threads"]
        )
        + " |"
    )
    print("|---|---:|" + "---:|" * len(result["threads"]))
    for v, n in result["nodes"].items():
        cells = [
            f"{r[v]['median_us']:,.0f}, {r[v]['ratio_vs_black_box']:.3f} "
            f"({r[v]['paired_ratio_vs_black_box']:.3f}; "
            f"{min(r[v]['paired_ratio_per_rep']):.3f}–{max(r[v]['paired_ratio_per_rep']):.3f})"
            for r in result["threads"].values()
        ]
        print(f"| {v} | {n} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--artifact",
        type=Path,
        default=REPO / "artifacts" / "fashion-default",
        help="a Fashion-MNIST artifact (default: the README's, built if missing)",
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--ort-pool",
        choices=["own", "shared"],
        default="shared",
        help="shared: a process's sessions run on one thread pool, so no session's spinning "
        "workers take the cores another's run needs (the service: one session per process); "
        "own: a pool per session",
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="repetitions per thread count, each in a fresh process"
    )
    ap.add_argument(
        "--graphs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only these beside the black box (e.g. all, topk)",
    )
    ap.add_argument("--rep-spec", type=Path, help=argparse.SUPPRESS)  # a repetition's child
    ap.add_argument("--repeats", type=int, default=200, help="minimum rounds per repetition")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per repetition")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another graph with the same input to time beside them (repeatable)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the black-box export and the cut graphs here",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_head.json")
    args = ap.parse_args(argv)
    if args.rep_spec:
        spec = json.loads(args.rep_spec.read_text())
        Path(spec["out"]).write_text(json.dumps(timed_rep(spec)))
        return 0
    info = bench_graph.machine_info()
    result = bench_graph.run_in_workdir(args.workdir, "bench_head.", lambda work: run(args, work))
    result["machine"] = {"start": info, "end": bench_graph.machine_info()}
    result["settings"] = {
        "batch": 1,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "reps": args.reps,
        "ort_pool": args.ort_pool,
        "order": "shuffled per round (seed 0), one untimed call before each",
    }
    report(result)
    _machine.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
