"""Latency of the fused explainer graph vs the plain black-box model, and vs Grad-CAM.

One process; CPU by default, 2 threads for both torch and onnxruntime (``--device cuda``:
onnxruntime's CUDA provider, TF32 off, and eager torch on the GPU). The onnxruntime
sessions share one thread pool (``--ort-pool shared``): with a pool per session, each
session's worker keeps spinning after its run on the cores the next graph needs (at batch
1 on Fashion, the black box's own nodes read 0.93–1.04× the black box: ``bench_head.py``).
Every timed call is preceded by one untimed call of the same variant (idle gaps inflate
onnxruntime latency on these machines), every variant runs once per round in an order
shuffled each round, rounds go on for ``--seconds`` (at least ``--repeats``), and each
figure is a median over rounds; ratios are against a baseline measured in the same rounds.
Eager torch is timed in a second pass against the black box alone (its spinning threads
slowed the graphs).

Part 1, per model (Fashion-MNIST default artifact, tf_efficientnet_lite0 with real
weights, timm resnet34 with random weights), at batch 1 and batch 32:

    fused-topk       scores="topk", maps="topk" (the default for many classes)
    fused-allscores  scores="all" (every class's contributions), maps="topk"
    fused-all        scores="all", maps="all" (the default for C ≤ 2k classes: Fashion)
    black-box        the timm model itself exported to ONNX (logits only)   ← baseline
    eager            the timm model in PyTorch (eval, no_grad)

One fused graph is the artifact's own model.onnx (``--maps/--scores auto``: ``default`` in
the result), the other two the same prototypes exported in those modes.

Part 2, Grad-CAM on tf_efficientnet_lite0, batch of 8 ImageNet photos, top-5 classes:

    gradcam-lib          pytorch-grad-cam as documented: 1 no_grad forward for the top-5,
                         then 5 GradCAM calls (one per rank, each on the whole batch)
    gradcam-eager        hand-written: forward_features with grad on, forward_head,
                         5 autograd.grad calls w.r.t. the feature map
    gradcam-eager-nobb   the same with the backbone under no_grad (only the head is
                         differentiated: all Grad-CAM needs)
    fused-topk           our graph on the same batch                     ← baseline

Run from the repository root:

    .venv/bin/python benchmarks/bench_graph.py            # full run (quiet machine!)
    .venv/bin/python benchmarks/bench_graph.py --quick    # smoke test, skips resnet34
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _machine
import numpy as np
import torch
from _machine import REPO, RESULTS

from protonmf.artifact import (
    FORMAT_VERSION,
    MODEL_FILE,
    Preprocessing,
    load_manifest,
    load_tensors,
    preprocess,
)
from protonmf.converter.convert import ConvertConfig, convert
from protonmf.converter.export import export_module, export_onnx
from protonmf.converter.models import analyse_head, recorded_model
from protonmf.converter.protomodel import ProtoModel
from protonmf.data import find_split, load_image_folder
from protonmf.sample_data import imagenet_photo_folder, lite0_checkpoint

THREADS = 2
DEVICE = "cpu"  # --device: "cuda" runs the ORT graphs on the CUDA provider, eager on the GPU
BATCHES = (1, 32)
GRADCAM_BATCH = 8
TOP_K = 5
BASELINE = "black-box"
VARIANTS = ("fused-topk", "fused-allscores", "fused-all", "black-box", "eager")
FUSED = ("fused-topk", "fused-allscores", "fused-all")
MODES = {
    "fused-topk": ("topk", "topk"),
    "fused-allscores": ("all", "topk"),
    "fused-all": ("all", "all"),
}  # variant → (scores, maps)
log = logging.getLogger("bench_graph")


# ----------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, seconds: float = 0.0, max_rounds: int = 2000
) -> dict[str, list[float]]:
    """Per variant, timings in ms; every variant once per round, warm-up before each.

    The order is shuffled every round (seeded): a variant that always ran right after
    another would inherit its after-effects (torch's and onnxruntime's worker threads
    still spinning on these 2 cores, caches). At least ``rounds`` rounds, then more until
    ``seconds`` have passed (at most ``max_rounds``): a 1-ms model gets thousands of
    samples, a 1-s one the minimum."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    end = time.perf_counter() + seconds
    done = 0
    while done < rounds or (time.perf_counter() < end and done < max_rounds):
        done += 1
        shuffle(order)
        for name in order:
            fn = fns[name]
            fn()  # untimed warm-up right before the timed call
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summarise(times: dict[str, list[float]], baseline: str, batch: int) -> list[dict]:
    """Median, min, ms/img, ratio of medians and median of per-round ratios vs baseline."""
    base = times[baseline]
    base_median = statistics.median(base)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "batch": batch,
                "median_ms": median,
                "min_ms": min(ts),
                "ms_per_image": median / batch,
                "ratio_vs_baseline": median / base_median,
                "paired_ratio_vs_baseline": statistics.median(
                    t / b for t, b in zip(ts, base, strict=True)
                ),
                "baseline": baseline,
                "samples_ms": ts,
            }
        )
    return rows


# ----------------------------------------------------------------------------- inputs


def image_pool(folder: Path, manifest: dict, n: int = 32) -> np.ndarray:
    """Up to ``n`` images spread over the folder's classes → (n, c, h, w) float32."""
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    samples = load_image_folder(folder, manifest["classes"])
    step = max(1, len(samples) // n)
    return np.stack([preprocess(s.open(), prep) for s in samples[::step][:n]])


def batch_of(pool: np.ndarray, size: int) -> np.ndarray:
    """(size, c, h, w): the pool's images, repeated cyclically if it has fewer."""
    return np.ascontiguousarray(pool[np.arange(size) % len(pool)])


# ----------------------------------------------------------------------------- artifacts


def is_current(artifact: Path) -> bool:
    """An artifact this code writes (an older format's graph would be timed as ours)."""
    manifest = artifact / "manifest.json"
    return (
        manifest.is_file()
        and json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
    )


def ensure_fashion(path: Path) -> Path:
    """The default Fashion-MNIST artifact; built with `protonmf convert` defaults if missing."""
    if not is_current(path):
        print(f"building {path} (protonmf convert defaults) …", flush=True)
        convert(
            ConvertConfig(
                model=str(REPO / "models" / "fashion-resnet"),
                data=str(REPO / "data" / "fashion-mnist"),
                out=str(path),
                progress=False,
            )
        )
    return path


def ensure_converted(out: Path, model: str, checkpoint: Path, data: Path) -> Path:
    """Convert ``model`` (+ checkpoint) on ``data`` into ``out`` unless already there."""
    if not is_current(out):
        print(f"converting {model} → {out} …", flush=True)
        t0 = time.perf_counter()
        convert(
            ConvertConfig(
                model=model,
                checkpoint=str(checkpoint),
                data=str(data),
                out=str(out),
                p=3,
                progress=False,
            )
        )
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def random_resnet34_checkpoint(path: Path) -> Path:
    """timm resnet34 with seeded random weights, saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    if not path.is_file():
        torch.manual_seed(0)
        model = timm.create_model("resnet34", pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ----------------------------------------------------------------------------- graphs


def export_blackbox(model: torch.nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """The timm model itself → ONNX (logits only), exported exactly like the artifact."""
    return export_module(model, input_shape, path, ["logits"])


def export_variant(
    model, manifest: dict, tensors: dict, path: Path, scores: str, maps: str
) -> Path:
    """The artifact's prototypes on the same backbone, exported in these modes."""
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    input_shape = (prep.channels, prep.height, prep.width)
    head = analyse_head(model, torch.randn(2, *input_shape))  # probe (2, c, h, w)
    proto = ProtoModel(
        model,
        head,
        torch.from_numpy(tensors["prototypes"]),
        torch.from_numpy(tensors["coefficients"]),
        maps=maps,
        k=manifest["graph"].get("k") or TOP_K,
        scores=scores,
    )
    return export_onnx(proto, input_shape, path)


@dataclass
class Subject:
    """One model under test: its timm module, sessions for each graph, an image pool."""

    name: str
    manifest: dict
    tensors: dict
    model: torch.nn.Module
    sessions: dict  # variant → onnxruntime.InferenceSession
    pool: np.ndarray  # (n, c, h, w)
    paths: dict  # variant → ONNX file
    default: str  # the variant that is the artifact's own graph


def _exported(path: Path, export: Callable[[Path], Path]) -> Path:
    """``path`` if an earlier run with the same --workdir left it there, else ``export(path)``."""
    return path if path.is_file() else export(path)


def build_subject(
    name: str,
    artifact: Path,
    images: Path,
    work: Path,
    prepare_only: bool = False,
    sessions: bool = True,
) -> Subject | None:
    """Export what is missing; ``sessions=False``: no onnxruntime sessions (the caller makes
    its own, e.g. with other thread settings)."""
    manifest = load_manifest(artifact)
    tensors = load_tensors(artifact, manifest)
    model = recorded_model(manifest)
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    input_shape = (prep.channels, prep.height, prep.width)
    print(f"[{name}] black-box and other-mode graphs (exported unless in --workdir) …", flush=True)
    tag = manifest["files"][MODEL_FILE][:12]  # a re-converted artifact gets fresh exports
    graph = manifest["graph"]
    default = next(v for v, m in MODES.items() if m == (graph["scores"], graph["maps"]))
    paths = {
        v: artifact / MODEL_FILE
        if v == default
        else _exported(
            work / f"{name}-{tag}-{v}.onnx",
            lambda p, m=MODES[v]: export_variant(model, manifest, tensors, p, *m),
        )
        for v in FUSED
    }
    paths["black-box"] = _exported(
        work / f"{name}-{tag}-blackbox.onnx", lambda p: export_blackbox(model, input_shape, p)
    )
    if prepare_only:
        return None
    made = (
        {v: _machine.session(p, DEVICE, threads=THREADS)[0] for v, p in paths.items()}
        if sessions
        else {}
    )
    return Subject(
        name, manifest, tensors, model, made, image_pool(images, manifest), paths, default
    )


def ort_fn(session, x: np.ndarray) -> Callable[[], list]:
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def eager_fn(model: torch.nn.Module, x: np.ndarray) -> Callable[[], torch.Tensor]:
    """model(x) as a user calls it; on CUDA the host→device copy and the logits' copy back
    are timed too, as they are in onnxruntime's session.run."""
    if DEVICE == "cpu":
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                return model(xt)  # (N, C)

        return run
    gpu = on_device(model)

    def run_gpu():
        with torch.no_grad():
            return gpu(torch.from_numpy(x).to(DEVICE)).cpu()  # (N, C); .cpu() synchronises

    return run_gpu


_ON_DEVICE: dict[int, torch.nn.Module] = {}


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` on DEVICE, made once per model (the CPU model stays the reference)."""
    if id(model) not in _ON_DEVICE:
        _ON_DEVICE[id(model)] = copy.deepcopy(model).to(DEVICE).eval()
    return _ON_DEVICE[id(model)]


def variant_fns(subject: Subject, x: np.ndarray) -> dict[str, Callable[[], object]]:
    fns = {v: ort_fn(subject.sessions[v], x) for v in (*FUSED, "black-box")}
    fns["eager"] = eager_fn(subject.model, x)
    return {v: fns[v] for v in VARIANTS}


# ----------------------------------------------------------------------------- part 1


def logits_check(subject: Subject) -> dict:
    """Max |Δ logits| of each variant vs eager torch on 4 images (are we timing the same model?)."""
    x = batch_of(subject.pool, 4)  # (4, c, h, w)
    fns = variant_fns(subject, x)
    fns.pop("eager")
    with torch.no_grad():
        want = subject.model(torch.from_numpy(x)).numpy()  # (4, C): fp32 CPU reference
    scale = float(np.abs(want).max())
    return {v: float(np.abs(fn()[0] - want).max()) / scale for v, fn in fns.items()}


def output_bytes_per_image(subject: Subject) -> dict:
    """Bytes of all outputs per image, and of the map output alone, for each ONNX graph."""
    x = batch_of(subject.pool, 4)
    out = {}
    for variant, session in subject.sessions.items():
        values = session.run(None, {session.get_inputs()[0].name: x})
        names = [o.name for o in session.get_outputs()]
        maps = sum(
            v.nbytes for n, v in zip(names, values, strict=True) if n in ("maps", "topk_maps")
        )
        out[variant] = {"total": sum(v.nbytes for v in values) // 4, "maps": maps // 4}
    return out


def bench_subject(subject: Subject, repeats: dict[int, int], seconds: float) -> dict:
    torch.set_num_threads(THREADS)
    result = {
        "model": subject.name,
        "architecture": subject.manifest["backbone"].get("architecture"),
        "classes": len(subject.manifest["classes"]),
        "p": subject.manifest["p"],
        "feature_dim": subject.manifest["feature_dim"],
        "feature_grid": subject.manifest["feature_grid"],
        "input_shape": subject.manifest["graph"]["input"]["shape"],
        "default": subject.default,
        "max_rel_logit_diff_vs_eager": logits_check(subject),
        "output_bytes_per_image": output_bytes_per_image(subject),
        "timings": [],
    }
    for batch in BATCHES:
        print(
            f"[{subject.name}] batch {batch}: ≥ {repeats[batch]} interleaved rounds, "
            f"≥ {seconds:g} s …",
            flush=True,
        )
        x = batch_of(subject.pool, batch)
        fns = variant_fns(subject, x)
        # eager torch in its own pass against the black box: torch's worker threads keep
        # spinning after a call and slow whatever onnxruntime graph runs next on 2 cores
        # (in a one-off check the black box at batch 1 on Fashion: 0.8 → 1.3 ms with eager)
        times = interleaved({v: f for v, f in fns.items() if v != "eager"}, repeats[batch], seconds)
        eager = interleaved({v: fns[v] for v in (BASELINE, "eager")}, repeats[batch], seconds / 2)
        result["timings"] += summarise(times, BASELINE, batch)
        eager_rows = [r for r in summarise(eager, BASELINE, batch) if r["variant"] == "eager"]
        result["timings"] += [dict(r, own_pass=True) for r in eager_rows]
        if DEVICE == "cpu":  # onnxruntime's per-node profile is CPU kernel time
            fused = (subject.default, *(v for v in FUSED if v != subject.default))
            result.setdefault("kernel_profile", {})[str(batch)] = kernel_profile_in_child(
                subject.paths, x, max(3, repeats[batch] // 3), seconds / 2, fused
            )
    return result


def kernel_profile_in_child(
    paths: dict, x: np.ndarray, rounds: int, seconds: float, fused: tuple[str, ...]
) -> dict:
    """``kernel_profile`` in a fresh process: its sessions need one thread each, which
    onnxruntime refuses in a process whose sessions share a pool (and on a shared pool of 2
    threads the profiler's per-node times are not the nodes' work: a trial run, not kept,
    put 16 µs on a Reshape of 30 floats)."""
    with tempfile.TemporaryDirectory(prefix="bench_graph_profile.") as tmp:
        np.save(Path(tmp) / "x.npy", x)
        spec = {
            "paths": {v: str(p) for v, p in paths.items()},
            "x": str(Path(tmp) / "x.npy"),
            "rounds": rounds,
            "seconds": seconds,
            "fused": list(fused),
        }
        return in_child(Path(__file__), "--kernel-profile-spec", spec, Path(tmp))


def in_child(script: Path, flag: str, spec: dict, work: Path) -> dict:
    """``python script flag SPEC``, a fresh process that writes its result to spec["out"]
    (set here, in ``work``) as JSON; that result."""
    spec = dict(spec, out=str(work / f"{script.stem}-child-out.json"))
    spec_file = work / f"{script.stem}-child-spec.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(script), flag, str(spec_file)], check=True)
    return json.loads(Path(spec["out"]).read_text())


def _profiled(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1  # one thread: kernel times add up to the run's work
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bench_graph_profile")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _kernel_us(session) -> tuple[dict[str, float], dict[str, str], int]:
    """Summed kernel time per node (µs), each node's op type and the number of runs, from
    ORT's profiler; the first run (a warm-up: allocations, first-touch) is left out."""
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "model_run")
    after_warmup = runs[0][1]
    per_node, ops = {}, {}
    for e in events:
        if e["ts"] < after_warmup:
            continue
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            per_node[node] = per_node.get(node, 0.0) + e["dur"]
            ops[node] = e["args"]["op_name"]
    path.unlink()
    return per_node, ops, len(runs) - 1


def kernel_profile(
    paths: dict, x: np.ndarray, rounds: int, seconds: float = 0.0, fused: tuple[str, ...] = FUSED
) -> dict:
    """Each fused graph's structural cost over the black box, free of wall-clock noise.

    The graphs run interleaved with onnxruntime's profiler on one thread. Nodes a fused
    graph shares with the black box (the backbone: same node names, same kernels) are
    shared; the head is what only one graph has. overhead = (fused head − black-box head)
    / black-box total, i.e. the latency ratio fused/black-box minus 1 if the shared nodes
    ran equally fast. ``structural_ratio`` is ``fused[0]``'s (the artifact's own graph).
    """
    variants = ("black-box", *fused)
    sessions = {v: _profiled(paths[v]) for v in variants}
    end, done = time.perf_counter() + seconds, -1  # round -1: the warm-up, left out
    while done < rounds or (time.perf_counter() < end and done < 2000):
        done += 1
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: x})
    profiles = {v: _kernel_us(sessions[v]) for v in variants}
    if any(n != done for _, _, n in profiles.values()):  # the warm-up filter lost a run
        raise RuntimeError(f"profiles hold {[n for _, _, n in profiles.values()]} runs, not {done}")
    rounds = done
    bb, _, _ = profiles["black-box"]
    bb_total = sum(bb.values()) / rounds
    result = {"rounds": rounds, "black_box_total_us": bb_total, "variants": {}}
    for v in fused:
        fu, fu_ops, _ = profiles[v]
        shared = bb.keys() & fu.keys()
        heads = {
            "black-box": sum(t for k, t in bb.items() if k not in shared) / rounds,
            v: sum(t for k, t in fu.items() if k not in shared) / rounds,
        }
        by_op: dict[str, float] = {}
        for k, t in fu.items():
            if k not in shared:
                by_op[fu_ops[k]] = by_op.get(fu_ops[k], 0.0) + t / rounds
        result["variants"][v] = {
            "head_us": heads,
            "head_by_op_us": dict(sorted(by_op.items(), key=lambda t: -t[1])),
            "shared_nodes": len(shared),
            "shared_over_black_box": sum(fu[k] for k in shared) / sum(bb[k] for k in shared),
            "structural_ratio": 1 + (heads[v] - heads["black-box"]) / bb_total,
        }
    result["structural_ratio"] = result["variants"][fused[0]]["structural_ratio"]
    return result


# ----------------------------------------------------------------------------- part 2


def gradcam_library(cam, model, x: torch.Tensor, k: int) -> np.ndarray:
    """pytorch-grad-cam as documented; one call per rank → (N, k, H_in, W_in)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.no_grad():
        top = model(x).topk(k, dim=1).indices  # (N, k)
    maps = [
        cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in top[:, r]])
        for r in range(k)
    ]  # k × (N, H_in, W_in)
    return np.stack(maps, 1)


def _cam_from_feats(model, feats: torch.Tensor, k: int) -> torch.Tensor:
    """Grad-CAM from a feature map that requires grad: (N, D, H, W) → (N, k, H, W)."""
    logits = model.forward_head(feats)  # (N, C)
    top = logits.topk(k, dim=1).indices  # (N, k)
    picked = logits.gather(1, top)  # (N, k)
    grads = [
        torch.autograd.grad(picked[:, r].sum(), feats, retain_graph=r < k - 1)[0] for r in range(k)
    ]  # k × (N, D, H, W)
    weights = torch.stack(grads, 1).mean((-2, -1))  # (N, k, D)
    return torch.relu(torch.einsum("nkd,ndhw->nkhw", weights, feats.detach()))


def gradcam_eager(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """One forward keeping the autograd graph, 5 grads w.r.t. the feature map."""
    with torch.enable_grad():
        feats = model.forward_features(x)  # (N, D, H, W), part of the autograd graph
        return _cam_from_feats(model, feats, k)


def gradcam_eager_nobb(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """Same maps; the backbone runs under no_grad, only the head is differentiated."""
    with torch.no_grad():
        feats = model.forward_features(x)  # (N, D, H, W)
    with torch.enable_grad():
        return _cam_from_feats(model, feats.requires_grad_(True), k)


def gradcam_consistency(subject: Subject, x: np.ndarray) -> dict:
    """Hand-written Grad-CAM vs relu(Σ_i a_ci · map_ci)/HW from the fused graph (equal for an
    average-pool → linear head), and torch's top-5 classes vs the graph's."""
    out = dict(
        zip(
            [o.name for o in subject.sessions["fused-topk"].get_outputs()],
            ort_fn(subject.sessions["fused-topk"], x)(),
            strict=True,
        )
    )
    coeff = subject.tensors["coefficients"][out["topk_classes"]]  # (N, k, p)
    h, w = out["topk_maps"].shape[-2:]
    fused_cam = np.maximum(np.einsum("nkp,nkphw->nkhw", coeff, out["topk_maps"]), 0) / (h * w)
    xt = torch.from_numpy(x)
    cam = gradcam_eager_nobb(subject.model, xt, TOP_K).numpy()  # (N, k, H, W)
    with torch.no_grad():
        top = subject.model(xt).topk(TOP_K, dim=1).indices.numpy()  # (N, k)
    return {
        "topk_classes_agree": bool(np.array_equal(top, out["topk_classes"])),
        "max_rel_diff_eager_vs_fused_maps": float(
            np.abs(cam - fused_cam).max() / np.abs(cam).max()
        ),
        "head_kind": subject.manifest["head"]["kind"],
    }


def bench_gradcam(subject: Subject, rounds: int) -> dict:
    from pytorch_grad_cam import GradCAM

    torch.set_num_threads(THREADS)
    x = batch_of(subject.pool, GRADCAM_BATCH)  # (8, 3, 224, 224)
    model = on_device(subject.model) if DEVICE != "cpu" else subject.model
    cam_model = copy.deepcopy(model)  # GradCAM's hooks stay on this copy only
    layer = cam_model.bn2  # conv_head → BN → act: its output is forward_features' map
    cam = GradCAM(model=cam_model, target_layers=[layer])

    def host(fn):  # input copied to the device and maps back to the host, as users would
        return lambda: np.asarray(fn(model, torch.from_numpy(x).to(DEVICE), TOP_K).cpu())

    fns = {
        "gradcam-lib": lambda: gradcam_library(cam, model, torch.from_numpy(x).to(DEVICE), TOP_K),
        "gradcam-eager": host(gradcam_eager),
        "gradcam-eager-nobb": host(gradcam_eager_nobb),
        "fused-topk": ort_fn(subject.sessions["fused-topk"], x),
    }
    print(f"[gradcam] batch {GRADCAM_BATCH}: {rounds} interleaved rounds …", flush=True)
    times = interleaved(fns, rounds)
    return {
        "model": subject.name,
        "batch": GRADCAM_BATCH,
        "k": TOP_K,
        "target_layer": f"bn2 ({type(layer).__name__}: conv_head output after BN + activation)",
        "check": gradcam_consistency(subject, x),
        "timings": summarise(times, "fused-topk", GRADCAM_BATCH),
    }


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    return _machine.machine_info(
        torch=torch.__version__,
        torch_threads=THREADS,
        ort_intra_op_threads=THREADS,
        device=DEVICE,
        ort_shared_pool=_machine.shared_pool_threads() is not None,
    )


def machine_line(info: dict, when: str) -> str:
    line = (
        f"machine ({when}): processor={info['processor']!r} ({info['cpu_model']}), "
        f"cpus={info['cpu_count']}, gpu={info['gpu']}, device={info['device']}, "
        f"onnxruntime {info['onnxruntime']}, torch {info['torch']}, "
        f"threads: torch {info['torch_threads']}, ORT intra-op {info['ort_intra_op_threads']}\n"
        f"  {info['top'][0]}"
    )
    if when == "start" and info["load_1min"] >= 1:  # at the end, the load is this run's own
        line += (
            f"\n  WARNING: 1-min load average {info['load_1min']:.2f} on {info['cpu_count']} "
            "CPUs before the benchmark: other work is running; timings (torch eager "
            "especially) are unreliable. Busiest:\n    " + "\n    ".join(info["busiest_processes"])
        )
    return line


def markdown_table(rows: list[dict], model_of: Callable[[dict], str]) -> str:
    lines = [
        "| model | batch | variant | median ms | ms/img | ratio vs baseline | paired ratio | baseline |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {model_of(r)} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | "
            f"{r['ms_per_image']:.2f} | {r['ratio_vs_baseline']:.3f} | "
            f"{r['paired_ratio_vs_baseline']:.3f} | {r['baseline']} |"
        )
    return "\n".join(lines)


def print_model_report(results: list[dict]) -> None:
    rows = [dict(r, model=m["model"]) for m in results for r in m["timings"]]
    where = "CPU" if DEVICE == "cpu" else "CUDA provider, TF32 off; eager torch on the GPU"
    print(f"\n## Graph latency (onnxruntime {where}, ORT_ENABLE_ALL; baseline = black-box ORT)\n")
    print(markdown_table(rows, lambda r: r["model"]))
    print()
    for m in results:
        for r in m["timings"]:
            if r["variant"] == m["default"]:
                ok = "met" if r["ratio_vs_baseline"] <= 1.03 else "NOT met"
                line = (
                    f"{m['model']} batch {r['batch']}: {r['variant']} (default)/black-box = "
                    f"{r['ratio_vs_baseline']:.3f} (paired {r['paired_ratio_vs_baseline']:.3f}, "
                    f"{len(r['samples_ms'])} rounds); "
                    f"target ≤ 1.03 {ok}"
                )
                kp = m.get("kernel_profile", {}).get(str(r["batch"]))
                for v, kv in (kp or {}).get("variants", {}).items():
                    top = ", ".join(
                        f"{op} {us:.0f}" for op, us in list(kv["head_by_op_us"].items())[:3]
                    )
                    line += (
                        f"\n  kernel profile {v}: structural ratio {kv['structural_ratio']:.3f} "
                        f"(head {kv['head_us'][v]:.0f} µs vs {kv['head_us']['black-box']:.0f} µs "
                        f"of {kp['black_box_total_us']:.0f} µs; {top})"
                    )
                print(line)
        b = m["output_bytes_per_image"]
        print(
            f"{m['model']} output bytes/image: topk {b['fused-topk']['total']:,} "
            f"(maps {b['fused-topk']['maps']:,}), all scores {b['fused-allscores']['total']:,}, "
            f"all {b['fused-all']['total']:,} "
            f"(maps {b['fused-all']['maps']:,}), black-box {b['black-box']['total']:,}; "
            f"max rel |Δlogit| vs eager: "
            + ", ".join(f"{k} {v:.1e}" for k, v in m["max_rel_logit_diff_vs_eager"].items())
        )


def print_gradcam_report(g: dict) -> None:
    print(
        f"\n## Grad-CAM top-{g['k']} vs fused graph ({g['model']}, batch {g['batch']}; "
        "baseline = fused-topk ORT)\n"
    )
    print(markdown_table(g["timings"], lambda r: g["model"]))
    by = {r["variant"]: r for r in g["timings"]}
    print(
        f"\n(a) library / (c) fused = {by['gradcam-lib']['ratio_vs_baseline']:.1f}×; "
        f"(b) eager / (c) = {by['gradcam-eager']['ratio_vs_baseline']:.2f}×; "
        f"(b') eager, backbone no_grad / (c) = {by['gradcam-eager-nobb']['ratio_vs_baseline']:.2f}×"
    )
    print(
        f"library target layer: {g['target_layer']}; library maps are upsampled to the input "
        "size and min-max scaled (as documented); eager maps and fused maps stay on the "
        "feature grid. Fused gives maps for all p prototypes of the top-5 plus scores/"
        "contributions."
    )
    print(
        f"check: eager Grad-CAM vs relu(Σ a·maps)/HW from the fused graph, max rel diff "
        f"{g['check']['max_rel_diff_eager_vs_fused_maps']:.1e} ({g['check']['head_kind']} head); "
        f"torch and graph top-5 classes agree: {g['check']['topk_classes_agree']}"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--fashion-artifact",
        type=Path,
        default=REPO / "artifacts" / "fashion-default",
        help="default Fashion-MNIST artifact (built with convert defaults if missing)",
    )
    ap.add_argument("--repeats", type=int, default=30, help="minimum interleaved rounds at batch 1")
    ap.add_argument(
        "--repeats-large", type=int, default=10, help="minimum interleaved rounds at batch 32"
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="per model and batch size, keep adding rounds until this much time "
        "has passed (at most 2,000); the kernel profile gets half as much",
    )
    ap.add_argument(
        "--gradcam-repeats",
        type=int,
        default=5,
        help="interleaved Grad-CAM rounds (the library call is ~100-300x a forward)",
    )
    ap.add_argument(
        "--ort-pool",
        choices=["shared", "own"],
        default="shared",
        help="shared: all onnxruntime sessions on one pool of 2 threads, so no session's "
        "spinning workers take the cores the next one's run needs; own: a pool per session",
    )
    ap.add_argument("--kernel-profile-spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke test: 3/2/1 rounds, skip resnet34")
    ap.add_argument("--skip-resnet34", action="store_true")
    ap.add_argument("--skip-gradcam", action="store_true", help="skip part 2 (Grad-CAM)")
    ap.add_argument(
        "--prepare-only",
        action="store_true",
        help="convert and export into --workdir, time nothing (a later run reuses them)",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: onnxruntime's CUDA provider (TF32 off) and eager torch on the GPU",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep conversions and exported graphs here (reused on the next run); "
        "default: a temporary directory, removed at the end",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_graph.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.repeats_large, args.gradcam_repeats, args.seconds = 3, 2, 1, 0.0
        args.skip_resnet34 = True
    return args


def subjects(args, work: Path) -> list[tuple[str, Path, Path]]:
    """(name, artifact, image folder) for each model, converting what is missing."""
    photos = imagenet_photo_folder(work / "imagenet_photos")
    fashion = ensure_fashion(args.fashion_artifact.resolve())
    fashion_images = find_split(REPO / "data" / "fashion-mnist")
    out = [("fashion-resnet18", fashion, fashion_images[1] or fashion_images[0])]
    lite0 = ensure_converted(work / "lite0", "tf_efficientnet_lite0", lite0_checkpoint(), photos)
    out.append(("tf_efficientnet_lite0", lite0, photos))
    if not args.skip_resnet34:
        ckpt = random_resnet34_checkpoint(work / "resnet34-random.safetensors")
        out.append(
            (
                "resnet34-random",
                ensure_converted(work / "resnet34", "resnet34", ckpt, photos),
                photos,
            )
        )
    return out


def run(args, work: Path) -> dict:
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(THREADS)
    if args.ort_pool == "shared":  # before the first session: the pool comes with ORT's env
        _machine.set_shared_thread_pool(THREADS)
    info = machine_info()
    print(machine_line(info, "start"), flush=True)
    if args.prepare_only:
        for name, artifact, images in subjects(args, work):
            build_subject(name, artifact, images, work, prepare_only=True)
        return {"prepared": str(work)}
    repeats = {1: args.repeats, 32: args.repeats_large}
    results, lite0 = [], None
    for name, artifact, images in subjects(args, work):
        subject = build_subject(name, artifact, images, work)
        results.append(bench_subject(subject, repeats, args.seconds))
        lite0 = subject if name == "tf_efficientnet_lite0" else lite0
    gradcam = None if args.skip_gradcam else bench_gradcam(lite0, args.gradcam_repeats)
    end = machine_info()
    print_model_report(results)
    if gradcam:
        print_gradcam_report(gradcam)
    print("\n" + machine_line(end, "end"))
    return {
        "machine": {"start": info, "end": end},
        "settings": {
            "repeats_batch1": args.repeats,
            "repeats_batch32": args.repeats_large,
            "seconds_per_batch_size": args.seconds,
            "gradcam_repeats": args.gradcam_repeats,
            "quick": args.quick,
            "device": args.device,
            "cuda_tf32": False if args.device == "cuda" else None,
            "ort_pool": args.ort_pool,
            "warmup": "one untimed call right before each timed call",
            "order": "every variant once per round, order shuffled per round (seed 0); "
            "eager in a second pass with the black box only",
        },
        "models": results,
        "gradcam": gradcam,
    }


def run_in_workdir(workdir: Path | None, prefix: str, fn: Callable[[Path], dict]) -> dict:
    """``fn(workdir)``, kept for the next run; or ``fn`` on a temporary directory, removed after."""
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
        return fn(workdir.resolve())
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return fn(Path(tmp))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.kernel_profile_spec:  # the child of kernel_profile_in_child
        spec = json.loads(args.kernel_profile_spec.read_text())
        profile = kernel_profile(
            spec["paths"], np.load(spec["x"]), spec["rounds"], spec["seconds"], tuple(spec["fused"])
        )
        Path(spec["out"]).write_text(json.dumps(profile))
        return 0
    report = run_in_workdir(args.workdir, "bench_graph.", lambda work: run(args, work))
    if args.prepare_only:
        print(f"\nprepared {report['prepared']}")
        return 0
    _machine.write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
