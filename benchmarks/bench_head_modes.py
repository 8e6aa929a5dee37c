"""Which explanation head is cheaper, by class count: the data behind ``--head auto``.

Head graphs for random prototypes, exported by the real exporter, on a stand-in backbone of
one 1×1 convolution + ReLU (16 → D channels): the head then reads a convolution's output,
as in a CNN — onnxruntime keeps such a grid in its blocked NCHWc layout, which a head's own
1×1 convolution consumes without a reorder (a bare grid input would bias the comparison):

    black-box   mean pooling + the linear head (what the black box itself runs)
    topk        the default for many classes: logits, TopK, k classes' terms and maps
    all         every class: one 1×1 convolution (C·p filters), its spatial means, a, bias

each timed beside the others, interleaved in a shuffled order (``bench_graph.interleaved``),
for a grid of (D, C) at batch 1 and 32 on one onnxruntime thread. What the explanation
costs is a head's time minus the black box's.

    .venv/bin/python benchmarks/bench_head_modes.py            # ~4 min
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _machine
import bench_graph
import numpy as np
import torch
from _machine import RESULTS
from torch import nn

from protonmf.converter.export import export_module, export_onnx
from protonmf.converter.models import HeadSpec
from protonmf.converter.protomodel import ProtoModel
from protonmf.graph import create_session

P, K, GRID = 3, 5, (7, 7)


IN_CHANNELS = 16


class StandInBackbone(nn.Module):
    """features = ReLU(1×1 conv of the input): cheap, and a convolution's output like a CNN's."""

    def __init__(self, D: int):
        super().__init__()
        self.conv = nn.Conv2d(IN_CHANNELS, D, 1)

    def forward_features(self, x):
        return torch.relu(self.conv(x))


class BlackBox(nn.Module):
    def __init__(self, backbone, weight, bias):
        super().__init__()
        self.backbone = backbone
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.linear.weight.data, self.linear.bias.data = weight, bias

    def forward(self, x):
        return self.linear(self.backbone.forward_features(x).mean((2, 3)))


def head_graphs(D: int, C: int, work: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(C * 10_000 + D)
    prototypes = torch.rand(C, P, D, generator=g)
    coefficients = torch.rand(C, P, generator=g)
    weight, bias = (coefficients[..., None] * prototypes).sum(1), torch.randn(C, generator=g)
    head = HeadSpec(kind="avg_linear", layout="nchw", weight=weight, bias=bias)
    torch.manual_seed(D)
    backbone, shape = StandInBackbone(D).eval(), (IN_CHANNELS, *GRID)
    paths = {
        "black-box": export_module(
            BlackBox(backbone, weight, bias), shape, work / f"bb_{D}_{C}.onnx", ["logits"]
        )
    }
    for mode in ("topk", "all"):
        model = ProtoModel(backbone, head, prototypes, coefficients, maps=mode, k=K, scores=mode)
        paths[mode] = export_onnx(model, shape, work / f"{mode}_{D}_{C}.onnx")
    return paths


def time_heads(paths: dict[str, Path], batch: int, seconds: float) -> dict:
    x = np.random.default_rng(0).random((batch, IN_CHANNELS, *GRID), dtype=np.float32)
    sessions = {name: create_session(p, "cpu", threads=1)[0] for name, p in paths.items()}
    fns = {name: bench_graph.ort_fn(s, x) for name, s in sessions.items()}
    times = bench_graph.interleaved(fns, rounds=50, seconds=seconds)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}  # µs
    return {
        "median_us": med,
        "rounds": len(times["black-box"]),
        "explanation_us": {m: med[m] - med["black-box"] for m in ("topk", "all")},
        "cheaper": min(("topk", "all"), key=med.get),
    }


def run(args, work: Path) -> dict:
    rows = []
    for D in args.dims:
        for C in args.classes:
            paths = head_graphs(D, C, work)
            for batch in args.batches:
                r = time_heads(paths, batch, args.seconds)
                rows.append({"D": D, "C": C, "p": P, "k": K, "batch": batch, **r})
                m = r["median_us"]
                print(
                    f"D={D:5d} C={C:5d} b={batch:3d}: black-box {m['black-box']:8.1f} µs, "
                    f"topk {m['topk']:8.1f}, all {m['all']:8.1f} → {r['cheaper']}",
                    flush=True,
                )
    return {"settings": {"p": P, "k": K, "grid": GRID, "threads": 1}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512, 1280])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per (D, C, batch)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_head_modes.json")
    args = ap.parse_args(argv)
    info = bench_graph.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_head_modes.") as work:
        result = run(args, Path(work))
    result["machine"] = {"start": info, "end": bench_graph.machine_info()}
    _machine.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
