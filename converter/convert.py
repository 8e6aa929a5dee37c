"""The conversion pipeline: timm model + labelled images → ProtoNMF artifact directory.

    load model → analyse head → extract features per class → NMF (batched over classes)
    → head fit (Eq. 4–5) → fold residual (Eq. 8, guarded) → exemplars (Eq. 2's E, Eq. 9's E')
    → torch exactness check → ONNX export → ONNX exactness check (onnxruntime, the graph
    the service runs) → artifact (written atomically)
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import protonmf
from protonmf.artifact import Preprocessing, preprocess, scratch, write_artifact
from protonmf.data import Sample, find_split, load_samples
from protonmf.exemplars import EXEMPLARS_FILE, KINDS, save_exemplars

from .exemplars import presence_filters, select_exemplars
from .export import export_onnx, graph_spec
from .head import fit_coefficients, fold_residual
from .models import (
    HeadSpec,
    ModelSource,
    analyse_head,
    features_nhwc,
    load_model,
    preprocessing_from_timm,
)
from .nmf import nmf
from .protomodel import ProtoModel

__all__ = ["ConvertConfig", "NotExactError", "class_names_of", "convert", "extract_features",
           "logits_of", "onnx_exactness"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """Everything ``protonmf convert`` takes (CLI flags map one to one)."""

    model: str
    data: str
    out: str
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    heldout: str | None = None
    max_per_class: int | None = None
    p: int = 3
    solver: str = "mu"
    init: str = "random"
    tol: float = 1e-4
    max_iter: int = 200
    seed: int = 0
    nonneg: bool = False
    min_sum_ratio: float = 0.5
    device: str = "auto"
    batch_size: int = 64
    maps: str = "auto"
    scores: str = "auto"
    k: int = 5
    exemplars: int = 8  # per prototype and kind; 0: none
    presence: bool = False  # Eq. 9 presence maps as a graph output
    rtol: float = 1e-5  # the ONNX graph's largest relative logit difference allowed
    progress: bool = True


class NotExactError(RuntimeError):
    """The exported graph's logits differ from the black box's beyond the tolerance."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def class_names_of(model) -> tuple[list[str], list[str] | None]:
    """The model's class names (and descriptions), from its pretrained_cfg or ImageNet info."""
    cfg = model.pretrained_cfg
    n = model.num_classes
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i), str(i))) for i in range(n)]
    descriptions = None
    if not names and n in (1000, 11821, 12000, 21841, 21843, 22000):
        from timm.data import ImageNetInfo

        info = ImageNetInfo(f"imagenet-{n // 1000}k" if n != 1000 else "imagenet-1k")
        names = info.label_names()
        descriptions = [info.index_to_description(i) for i in range(n)]
    names = list(names) if names else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"model has {n} classes but {len(names)} label names")
    return names, descriptions


def _batches(samples: list[Sample], prep: Preprocessing, batch_size: int):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        x = np.stack([preprocess(s.open(), prep) for s in chunk])
        yield torch.from_numpy(x), [s.label for s in chunk]


@torch.no_grad()
def extract_features(model, head: HeadSpec, samples, prep, batch_size, device, progress=True):
    """Raw feature grids per class: {class: tensor (n_images, H, W, D)} (float32, CPU)."""
    per_class: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=len(samples), desc="features", unit="img", disable=not progress)
    for x, labels in _batches(samples, prep, batch_size):
        grid = features_nhwc(model, model.forward_features(x.to(device)), head.layout).float()
        for g, y in zip(grid.cpu(), labels, strict=True):
            per_class.setdefault(y, []).append(g)
        bar.update(len(labels))
    bar.close()
    return {c: torch.stack(v) for c, v in per_class.items()}


@torch.no_grad()
def logits_of(module, samples, prep, batch_size=64, device="cpu", progress=False):
    """Outputs of ``module`` on samples: the first output if it returns a tuple."""
    outs = []
    for x, _ in tqdm(list(_batches(samples, prep, batch_size)), disable=not progress):
        y = module(x.to(device))
        outs.append((y[0] if isinstance(y, tuple) else y).float().cpu())
    return torch.cat(outs)


def _run_nmf(features, classes, p, cfg, device, progress, keep_E=False):
    """NMF for every class with images, in chunks that fit memory. Returns dict per class
    (with keep_E, its factor E as (n, H, W, p) float32: the NMF presence maps)."""
    D = next(iter(features.values())).shape[-1]
    order = sorted(features)
    rows = {c: features[c].shape[0] * features[c].shape[1] * features[c].shape[2] for c in order}
    budget = 2e8 if device.type == "cuda" else 5e7  # floats per padded chunk
    results = {}
    iters = tqdm(total=None, desc=f"NMF ({cfg.solver}, p={p})", unit="it", disable=not progress)
    i = 0
    while i < len(order):
        chunk = [order[i]]
        while i + len(chunk) < len(order):
            nxt = order[i + len(chunk)]
            if (len(chunk) + 1) * max(rows[c] for c in chunk + [nxt]) * D > budget:
                break
            chunk.append(nxt)
        n_max = max(rows[c] for c in chunk)
        A = torch.zeros(len(chunk), n_max, D, device=device)
        for j, c in enumerate(chunk):
            A[j, : rows[c]] = features[c].reshape(-1, D).clamp_min(0)  # clip before NMF only
        n_rows = torch.tensor([rows[c] for c in chunk], device=device)
        res = nmf(A, p, n_rows=n_rows, solver=cfg.solver, init=cfg.init, tol=cfg.tol,
                  max_iter=cfg.max_iter, seed=cfg.seed + i, progress=iters)  # fmt: skip
        for j, c in enumerate(chunk):
            results[c] = dict(
                B=res.B[j].double().cpu().numpy(),
                iterations=int(res.n_iter[j]),
                feature_rel_error=float(res.rel_error[j]),
            )
            if keep_E:
                shape = (*features[c].shape[:3], p)
                results[c]["E"] = res.E[j, : rows[c]].float().cpu().numpy().reshape(shape)
        i += len(chunk)
    iters.close()
    return results


def convert(cfg: ConvertConfig) -> Path:
    """Run the whole conversion; returns the artifact directory."""
    if cfg.p < 1:
        raise ValueError(f"p must be >= 1, got {cfg.p}")
    if cfg.exemplars < 0:
        raise ValueError(f"--exemplars must be >= 0, got {cfg.exemplars}")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    source = ModelSource(cfg.model, cfg.checkpoint, cfg.model_kwargs or None)
    model = load_model(source).to(device)
    prep = preprocessing_from_timm(model)
    classes, descriptions = class_names_of(model)
    probe = torch.randn(2, prep.channels, prep.height, prep.width, device=device)
    head = analyse_head(model, probe)
    log.info("head: %s (layout %s)", head.kind, head.layout)
    if cfg.p > head.weight.shape[1]:
        raise ValueError(
            f"-p {cfg.p} exceeds the feature dimension D = {head.weight.shape[1]}: at most D "
            "prototypes per class can be linearly independent (and C·p·D floats are stored)"
        )

    train_dir, split_heldout = find_split(cfg.data)
    heldout_dir = Path(cfg.heldout) if cfg.heldout else split_heldout
    samples = load_samples(train_dir, classes, cfg.max_per_class)
    features = extract_features(model, head, samples, prep, cfg.batch_size, device, cfg.progress)
    grid_hw = tuple(next(iter(features.values())).shape[1:3])
    nmf_out = _run_nmf(features, classes, cfg.p, cfg, device, cfg.progress,
                       keep_E=cfg.exemplars > 0)  # fmt: skip

    V = head.class_vectors.cpu().numpy()  # (C, D) float64
    C, D = V.shape
    B = np.zeros((C, cfg.p, D))
    for c, r in nmf_out.items():
        B[c] = r["B"]
    a, R = fit_coefficients(V, B, nonneg=cfg.nonneg)
    fold = fold_residual(a, B, R, min_sum_ratio=cfg.min_sum_ratio)
    rebuilt = np.einsum("cp,cpd->cd", fold.coefficients, fold.prototypes)
    rebuild_err = np.linalg.norm(rebuilt - V, axis=1) / np.maximum(np.linalg.norm(V, axis=1), 1e-300)

    per_class = []
    for c in range(C):
        r = nmf_out.get(c)
        per_class.append({
            "class": classes[c],
            "n_images": int(features[c].shape[0]) if c in features else 0,
            "explained": r is not None,
            "nmf_iterations": r["iterations"] if r else 0,
            "feature_rel_error": r["feature_rel_error"] if r else None,
            "head_rel_error": float(np.linalg.norm(R[c]) / max(np.linalg.norm(V[c]), 1e-300)),
            "sum_a_ratio": float(fold.sum_ratio[c]),
            "fold": "no_images" if r is None else fold.method[c],
            "rebuild_rel_error": float(rebuild_err[c]),
        })  # fmt: skip
    # Classes without images (or whose prototypes explain nothing of V) keep V whole as
    # prototype 0 with a = (1, 0, …): logits stay exact, the class is flagged unexplained.
    for c in range(C):
        if c not in nmf_out:
            fold.prototypes[c] = 0.0
            fold.prototypes[c, 0] = V[c]
            fold.coefficients[c] = 0.0
            fold.coefficients[c, 0] = 1.0

    filters = presence_filters(fold.prototypes)
    exemplars = None
    if cfg.exemplars > 0:
        class_samples = {c: [s for s in samples if s.label == c] for c in features}
        E = {c: r.pop("E") for c, r in nmf_out.items()}
        exemplars = select_exemplars(features, E, filters, class_samples, prep, cfg.exemplars,
                                     Path(train_dir), cfg.progress)  # fmt: skip
    proto = ProtoModel(model, head, fold.prototypes, fold.coefficients, maps=cfg.maps, k=cfg.k,
                       scores=cfg.scores, presence_filters=filters if cfg.presence else None)  # fmt: skip
    proto = proto.eval().to(device)
    check_samples = (load_samples(heldout_dir, classes, cfg.max_per_class) if heldout_dir
                     else samples[:256])  # fmt: skip
    want = logits_of(model, check_samples, prep, cfg.batch_size, device).double().numpy()
    got = logits_of(proto, check_samples, prep, cfg.batch_size, device).double().numpy()
    exact = exactness(want, got)
    log.info("torch exactness: %s", exact)

    tensors = {
        "prototypes": fold.prototypes.astype(np.float32),
        "nmf_prototypes": B.astype(np.float32),
        "coefficients": fold.coefficients.astype(np.float32),
        "residuals": R.astype(np.float32),
        "class_vectors": V.astype(np.float32),
        "bias": head.effective_bias.cpu().numpy().astype(np.float32),
        "fold_weights": fold.weights.astype(np.float32),
        "presence_filters": filters.astype(np.float32),
    }
    input_shape = (prep.channels, prep.height, prep.width)
    explained = sum(1 for d in per_class if d["explained"])
    manifest = {
        "protonmf_version": protonmf.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes,
        "class_descriptions": descriptions,
        "p": cfg.p,
        "feature_dim": D,
        "feature_grid": list(grid_hw),
        "head": {"kind": head.kind, "layout": head.layout, "norm_eps": head.norm_eps},
        "backbone": {"architecture": model.pretrained_cfg.get("architecture"), **source.to_dict()},
        "preprocessing": prep.to_dict(),
        "conversion": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")},
            "data": str(Path(train_dir).resolve()),
            "heldout": str(heldout_dir.resolve()) if heldout_dir else None,
            "device": device.type,
            "n_images": len(samples),
        },
        "diagnostics": {
            "classes_explained": explained,
            "classes_total": C,
            "max_rebuild_rel_error": float(rebuild_err.max()),
            "guarded_classes": [d["class"] for d in per_class if d["fold"] == "min_norm"],
            "torch_exactness": exact,
            "per_class": per_class,
        },
    }
    if exemplars is not None:
        manifest["exemplars"] = {"file": EXEMPLARS_FILE, "m": cfg.exemplars, "kinds": list(KINDS),
                                 "ranking": "peak", "images": len(exemplars.thumbnails)}  # fmt: skip
    proto = proto.cpu()
    with scratch(cfg.out, "export") as tmp:
        onnx_path = export_onnx(proto, input_shape, Path(tmp) / "model.onnx")
        manifest["graph"] = graph_spec(proto, input_shape, grid_hw)
        onnx_exact = onnx_exactness(onnx_path, want, check_samples, prep, cfg.batch_size)
        manifest["diagnostics"]["onnx_exactness"] = {**onnx_exact, "rtol": cfg.rtol}
        log.info("onnx exactness: %s", onnx_exact)
        extra = {}
        if exemplars is not None:
            save_exemplars(Path(tmp) / EXEMPLARS_FILE, exemplars)
            extra[EXEMPLARS_FILE] = Path(tmp) / EXEMPLARS_FILE
        out = write_artifact(cfg.out, manifest, tensors, onnx_path, extra_files=extra)
    if onnx_exact["top1_agreement"] < 1.0 or onnx_exact["max_rel_logit_diff"] > cfg.rtol:
        raise NotExactError(
            f"{out}: the ONNX graph is not exact on {onnx_exact['n_images']} images "
            f"(max rel logit diff {onnx_exact['max_rel_logit_diff']:.3g} > rtol {cfg.rtol:g} "
            f"or top-1 agreement {onnx_exact['top1_agreement']:.2%}); the artifact is written "
            "for inspection, do not serve it as exact (see `protonmf verify`)"
        )
    return out


def onnx_exactness(onnx_path, want: np.ndarray, samples, prep, batch_size) -> dict:
    """The exported graph, run by onnxruntime on the CPU as the service runs it, vs the
    black box's logits ``want`` on the same images: what ``protonmf verify`` reports."""
    from service.runtime import create_session

    session, provider = create_session(onnx_path, "cpu")
    got = np.concatenate([session.run(["logits"], {"image": x.numpy()})[0]
                          for x, _ in _batches(samples, prep, batch_size)])  # fmt: skip
    return {**exactness(want, got.astype(np.float64)), "provider": provider}


def exactness(want: np.ndarray, got: np.ndarray) -> dict:
    """max_rel_logit_diff = max over images of max_c |Δ| / max_c |logit| (per image)."""
    scale = np.maximum(np.abs(want).max(1), 1e-12)
    rel = np.abs(got - want).max(1) / scale
    return {
        "max_rel_logit_diff": float(rel.max()),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "n_images": int(len(want)),
    }
