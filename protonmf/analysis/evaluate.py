"""``protonmf evaluate``: accuracy and explanation quality of an artifact's graph on labelled
images — numpy and onnxruntime only (no torch: the serving image has none).

Besides top-1/top-5 and the exactness residual, on the held-out images:

- ``ablation`` (the paper's Table 3): top-1 of the black-box head V, the augmented head
  Σ a b' (the graph's logits), the NMF-only head a·B and the residual-only head R.
- ``explained_share``: per class, how much of V the NMF prototypes rebuild.
- ``residual_share``: how much of the predicted class's logit (and of its margin to the
  runner-up) the residual carries, image by image.
- ``intervention`` (App. A.4): the oracle that switches off a prototype of the predicted
  class on every wrong prediction, beside the baselines that put it in proportion.
- ``faithfulness``: deletion / insertion AUC of the prototype maps, the class activation
  map and a random order, under two replacement baselines.

Keys that need the graph's ``pooled`` output (old all-class graphs have none) or its maps
are present as ``{"unavailable": reason}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from protonmf import explain
from protonmf.artifact import normalize, resize_crop
from protonmf.artifact.manifest import Manifest
from protonmf.data import load_samples
from protonmf.graph import GraphSession

__all__ = [
    "ablation_heads",
    "ablation_logits",
    "auc",
    "deletion_insertion",
    "evaluate",
    "evenly_spread",
    "explained_share",
    "explanation_residual",
    "format_report",
    "head_logits",
    "heldout_samples",
    "intervention",
    "parse_p_list",
    "residual_share",
]

NO_RESIDUAL_SPLIT = explain.ALL_RESIDUAL_FOLDS  # folds whose whole logit is "residual"
FAITH_IMAGES = 128  # default images for the faithfulness curves (108 graph runs per image)
FAITH_SEED = 0


def explanation_residual(out: dict) -> np.ndarray:
    """Per image: max over the classes the graph explains of |logit − (Σ contributions +
    bias)|, over max |logit| (all classes, or the top-k with ``scores="topk"``)."""
    if "contributions" in out:
        logits, contributions, bias = out["logits"], out["contributions"], out["bias"]
    else:
        logits = np.take_along_axis(out["logits"], out["topk_classes"], 1)  # (N, k)
        contributions, bias = out["topk_contributions"], out["topk_bias"]
    gap = np.abs(logits - contributions.sum(-1) - bias).max(1)
    return gap / np.maximum(np.abs(out["logits"]).max(1), 1e-12)


# --- which images ---------------------------------------------------------------------------


def evenly_spread(n: int, m: int | None) -> np.ndarray:
    """``m`` indices spread evenly over range(n) (all of them when m is None or ≥ n).

    Samples come sorted by class: a prefix would hold the first classes only."""
    if m is None or m >= n:
        return np.arange(n)
    if m < 1:
        raise ValueError(f"the number of images must be >= 1, got {m}")
    return np.unique(np.linspace(0, n - 1, m).round().astype(int))


def heldout_samples(manifest: dict, data=None, max_images: int | None = None):
    """The labelled images to evaluate on: ``data`` or the artifact's held-out images, an
    evenly spread ``max_images`` of them. Returns (samples, data path)."""
    info = Manifest.of(manifest)
    conv = info.conversion
    data = data or conv.get("heldout") or conv.get("data")
    if not data or not Path(data).exists():
        raise FileNotFoundError(f"no labelled images at {data}; pass --data DIR")
    samples = load_samples(data, info.classes)
    return [samples[i] for i in evenly_spread(len(samples), max_images)], data


def parse_p_list(text: str) -> list[int]:
    """ "1,3,5,10" → [1, 3, 5, 10]; ValueError on anything but positive integers."""
    try:
        ps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--sweep-p takes comma-separated integers, got {text!r}") from None
    if not ps or min(ps) < 1:
        raise ValueError(f"--sweep-p needs prototype counts >= 1, got {text!r}")
    return ps


# --- heads from the pooled features (Table 3) ------------------------------------------------


def head_logits(W: np.ndarray, pooled: np.ndarray, bias: np.ndarray, norm_eps=None) -> np.ndarray:
    """Logits of the linear head W (C, D) on pooled features (N, D), float64.

    ``norm_eps`` not None: a LayerNorm head, logit = W·(f − μ)/σ + bias, the black box's
    affine with V replaced by W (the artifact's ``bias`` already holds LayerNorm's shift)."""
    f = np.asarray(pooled, np.float64)
    W = np.asarray(W, np.float64)
    raw = f @ W.T  # (N, C)
    if norm_eps is not None:
        mu = f.mean(1, keepdims=True)  # (N, 1)
        inv_sigma = 1.0 / np.sqrt(((f - mu) ** 2).mean(1, keepdims=True) + norm_eps)
        raw = (raw - mu * W.sum(1)) * inv_sigma
    return raw + np.asarray(bias, np.float64)


def ablation_heads(tensors: dict, folds: list[str]) -> dict[str, np.ndarray]:
    """The four heads (C, D): ``protonmf.explain.heads``."""
    return explain.heads(tensors, folds)


def ablation_logits(manifest: dict, tensors: dict, pooled: np.ndarray) -> dict[str, np.ndarray]:
    """Each ablation head's logits (N, C) on pooled features; nmf_only + residual_only − bias
    = augmented (the graph's logits up to float rounding)."""
    heads = explain.heads(tensors, explain.folds(manifest))
    eps = explain.layer_norm_eps(manifest)
    return {name: head_logits(W, pooled, tensors["bias"], eps) for name, W in heads.items()}


def explained_share(manifest: dict, tensors: dict) -> dict:
    """Per class: energy 1 − ‖R‖²/‖V‖² and norm ratio ‖aB‖/‖V‖ (``protonmf.explain``; null
    where V = 0), and their means over the classes where they are defined."""
    energy, ratio = explain.explained_share(tensors, explain.folds(manifest))
    per_class = {
        name: {"energy": _number(e), "norm_ratio": _number(r)}
        for name, e, r in zip(Manifest.of(manifest).classes, energy, ratio, strict=True)
    }
    return {
        "per_class": per_class,
        "mean_energy": _nan_stat(np.nanmean, energy),
        "mean_norm_ratio": _nan_stat(np.nanmean, ratio),
    }


def residual_shares_per_image(
    manifest, tensors, logits, pooled, pred
) -> tuple[np.ndarray, np.ndarray]:
    """Per image (N,), the predicted class's residual share of its logit without bias and of
    its margin over the runner-up (``protonmf.explain.residual_shares``; NaN where undefined):
    the service's ``residual_share`` for every image at once."""
    f = np.asarray(pooled, np.float64)
    n = np.arange(len(f))
    logits = np.asarray(logits, np.float64)
    runner = np.argsort(-logits, 1, kind="stable")[:, :2]
    other = np.where(runner[:, 0] == pred, runner[:, 1], runner[:, 0])
    eps = explain.layer_norm_eps(manifest)
    bias = np.broadcast_to(tensors["bias"].astype(np.float64), logits.shape).copy()
    if eps is not None:  # the LayerNorm head's −μ/σ·ΣV term is bias, as in the service's terms
        bias -= (f.mean(1) * explain.inv_sigma(f, eps))[:, None] * tensors["class_vectors"].astype(
            np.float64
        ).sum(1)
    r = explain.residual_logits(tensors, explain.folds(manifest), f, eps)  # (N, C)
    return explain.residual_shares(
        logits[n, pred], bias[n, pred], r[n, pred], logits[n, other], r[n, other]
    )


def residual_share(manifest, tensors, logits, pooled, pred) -> dict:
    """Statistics of ``residual_shares_per_image``; images where a denominator is 0 are left
    out of them."""
    logit_share, margin_share = residual_shares_per_image(manifest, tensors, logits, pooled, pred)
    return {
        "logit_mean": _nan_stat(np.nanmean, logit_share),
        "margin_mean": _nan_stat(np.nanmean, margin_share),
        "logit_median": _nan_stat(np.nanmedian, logit_share),
        "margin_median": _nan_stat(np.nanmedian, margin_share),
        "n_images": int(len(pooled)),
    }


def _number(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _nan_stat(fn, x: np.ndarray):
    return float(fn(x)) if np.isfinite(x).any() else None


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def ablation(manifest, tensors, graph_logits, pooled, labels) -> dict:
    heads = ablation_logits(manifest, tensors, pooled)
    black_box = heads["black_box"].argmax(1)
    return {
        "black_box": float((black_box == labels).mean()),
        "augmented": _top1(graph_logits, labels),
        "nmf_only": _top1(heads["nmf_only"], labels),
        "residual_only": _top1(heads["residual_only"], labels),
        "augmented_agrees_with_black_box": float((graph_logits.argmax(1) == black_box).mean()),
        "n_images": int(len(labels)),
    }


# --- test-time intervention (App. A.4) ------------------------------------------------------


def _switch_off(logits, pred, contributions, chosen) -> np.ndarray:
    """Predictions after removing prototype ``chosen`` (N,) of the predicted class."""
    n = np.arange(len(logits))
    out = np.array(logits, np.float64)
    out[n, pred] -= contributions[n, chosen]
    return out.argmax(1)


def intervention(logits, pred, contributions, coefficients, labels) -> dict:
    """The App. A.4 oracle and its baselines, on one set of images.

    logits (N, C); pred (N,) the predicted class; contributions (N, p) the predicted class's
    per-prototype contributions; coefficients (C, p) a; labels (N,).

    - ``oracle_fixes``: wrong predictions that become right when the predicted class's most
      important prototype on that image (largest contribution) is switched off;
    - ``heaviest_fixes``: the same with the class's heaviest prototype (largest a: the
      paper's max(C_opt^c)); ``true_runner_up_among_heaviest_fixes``: of those, how many had
      the true class as runner-up (lowering one logit can only promote the runner-up, so
      every fix is one; ``top2_accuracy`` bounds ``oracle_top1``);
    - ``blind_top1`` / ``blind_heaviest_top1``: the same switch-offs on every image, without
      the oracle's knowing which predictions are wrong.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    wrong = pred != labels
    order = np.argsort(-logits, 1, kind="stable")
    runner_up = np.where(order[:, 0] == pred, order[:, 1], order[:, 0])
    largest = _switch_off(logits, pred, contributions, contributions.argmax(1)) == labels
    heaviest = _switch_off(logits, pred, contributions, coefficients[pred].argmax(1)) == labels
    correct = int((~wrong).sum())
    oracle_fixes = int((wrong & largest).sum())
    heaviest_fixes = int((wrong & heaviest).sum())
    return {
        "errors": int(wrong.sum()),
        "oracle_fixes": oracle_fixes,
        "heaviest_fixes": heaviest_fixes,
        "true_runner_up_among_heaviest_fixes": int(
            (wrong & heaviest & (runner_up == labels)).sum()
        ),
        "top1": correct / n,
        "oracle_top1": (correct + oracle_fixes) / n,
        "heaviest_top1": (correct + heaviest_fixes) / n,
        "blind_top1": float(largest.mean()),
        "blind_heaviest_top1": float(heaviest.mean()),
        "top2_accuracy": float((order[:, :2] == labels[:, None]).any(1).mean()),
    }


# --- faithfulness: deletion and insertion ---------------------------------------------------


def auc(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoid-rule area under curves ``values`` (..., T) sampled at ``fractions`` (T,)."""
    dx = np.diff(fractions)
    return ((values[..., 1:] + values[..., :-1]) * 0.5 * dx).sum(-1)


def _pixel_cells(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(h, w) index of the feature-grid cell each input pixel lies in (blocks of h/H × w/W)."""
    (H, W), (h, w) = grid, size
    rows = np.arange(h) * H // h
    cols = np.arange(w) * W // w
    return rows[:, None] * W + cols[None, :]


def deletion_insertion(
    crops,
    saliency,
    baseline,
    probs_fn,
    classes,
    steps: int,
    batch_size: int = 256,
    p_original=None,
    p_baseline=None,
):
    """Deletion and insertion curves of saliency orders, (N, steps + 1) each.

    crops (N, h, w[, 3]) pixel values; saliency (N, H, W) on the feature grid, cell (i, j)
    covering the crop's pixel block i·h/H… × j·w/W…; baseline (h, w[, 3]) the replacement
    image; probs_fn(images (M, h, w[, 3]) float32) → (M, C) probabilities; classes (N,) the
    class whose probability is followed. At fraction t = j/steps the round(t·H·W) most
    salient cells are replaced by the baseline (deletion) or are all that is kept of the
    image over the baseline (insertion). The end points are the original image and the
    baseline: pass their probabilities (N,) to skip those runs.
    """
    crops = np.asarray(crops, np.float32)
    baseline = np.asarray(baseline, np.float32)
    N, (H, W) = len(crops), saliency.shape[1:]
    cells = _pixel_cells((H, W), crops.shape[1:3])
    counts = np.round(np.arange(steps + 1) / steps * H * W).astype(int)  # cells replaced
    order = np.argsort(-saliency.reshape(N, -1), 1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(H * W)[None], 1)  # rank of each cell
    inner = range(1, steps) if p_original is not None else range(steps + 1)
    deletion = np.zeros((N, steps + 1))
    insertion = np.zeros((N, steps + 1))
    per_image = 2 * len(inner)
    group = max(1, batch_size // per_image)
    for start in range(0, N, group):
        idx = np.arange(start, min(N, start + group))
        images = []
        for i in idx:
            hit = rank[i][cells]  # (h, w): the rank of each pixel's cell
            for j in inner:
                gone = hit < counts[j]
                if crops.ndim == 4:
                    gone = gone[..., None]
                images.append(np.where(gone, baseline, crops[i]))  # deletion
                images.append(np.where(gone, crops[i], baseline))  # insertion
        probs = probs_fn(np.stack(images))  # (len(idx) · per_image, C)
        probs = probs.reshape(len(idx), len(inner), 2, -1)
        picked = np.take_along_axis(probs, np.asarray(classes)[idx, None, None, None], 3)[..., 0]
        deletion[idx[:, None], list(inner)] = picked[:, :, 0]
        insertion[idx[:, None], list(inner)] = picked[:, :, 1]
    if p_original is not None:
        deletion[:, 0] = insertion[:, -1] = p_original
        deletion[:, -1] = insertion[:, 0] = p_baseline
    return deletion, insertion


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _saliencies(maps, contributions, coefficients, rng) -> dict[str, np.ndarray]:
    """maps (N, p, H, W) similarity maps S_i of the predicted class; contributions (N, p);
    coefficients (N, p) its a. → prototype (a_i·S_i of the top contributor), cam (Σ a_i S_i),
    random (seeded)."""
    n = np.arange(len(maps))
    top = contributions.argmax(1)
    weighted = coefficients[:, :, None, None] * maps  # (N, p, H, W)
    return {
        "prototype": weighted[n, top],
        "cam": weighted.sum(1),
        "random": rng.random(maps[:, 0].shape),
    }


def faithfulness(
    explainer,
    crops,
    maps,
    contributions,
    pred,
    p_original,
    mean_image,
    steps: int,
    batch_size: int,
    progress: bool,
) -> dict:
    """Deletion/insertion AUC (mean over images) per baseline and saliency, through the graph."""
    if steps < 2:
        raise ValueError(f"--faith-steps must be >= 2, got {steps}")
    spec = explainer.preprocessing
    name = explainer.info.graph.input.name

    run_batch = max(batch_size, 128)  # thousands of runs: larger batches run faster

    def probs_fn(images):
        out = [
            explainer.session.run(["logits"], {name: normalize(images[i : i + run_batch], spec)})[0]
            for i in range(0, len(images), run_batch)
        ]
        return _softmax(np.concatenate(out))

    coefficients = explainer.tensors["coefficients"][pred]
    saliency = _saliencies(maps, contributions, coefficients, np.random.default_rng(FAITH_SEED))
    baselines = {"mean": mean_image, "zero": np.zeros_like(mean_image)}
    fractions = np.arange(steps + 1) / steps
    result = {"steps": steps, "n_images": int(len(crops)), "baselines": {}}
    bar = tqdm(
        total=len(baselines) * len(saliency) * len(crops),
        desc="faithfulness",
        unit="img",
        disable=not progress,
    )
    for base_name, base in baselines.items():
        p_base = probs_fn(base[None].astype(np.float32))[0, pred]
        result["baselines"][base_name] = {}
        for sal_name, sal in saliency.items():
            args = (base, probs_fn, pred, steps, run_batch, p_original, p_base, bar)
            dele, ins = _curves(crops, sal, *args)
            result["baselines"][base_name][sal_name] = {
                "deletion_auc": float(auc(fractions, dele).mean()),
                "insertion_auc": float(auc(fractions, ins).mean()),
                # mean probability at t = 0, 1/steps, …, 1 (for plots)
                "deletion_curve": np.round(dele.mean(0), 5).tolist(),
                "insertion_curve": np.round(ins.mean(0), 5).tolist(),
            }
    bar.close()
    return result


def _curves(crops, sal, base, probs_fn, pred, steps, run_batch, p_original, p_base, bar):
    """Deletion and insertion curves (N, steps + 1) of one saliency against one baseline,
    in chunks of 64 images (progress, and memory for big crops)."""
    dele, ins = [], []
    for s in range(0, len(crops), 64):
        sl = slice(s, s + 64)
        d, i = deletion_insertion(
            crops[sl],
            sal[sl],
            base,
            probs_fn,
            pred[sl],
            steps,
            run_batch,
            p_original[sl],
            p_base[sl],
        )
        dele.append(d)
        ins.append(i)
        bar.update(len(crops[sl]))
    return np.concatenate(dele), np.concatenate(ins)


# --- the whole evaluation -------------------------------------------------------------------


def _predicted_terms(out: dict):
    """Per image of a batch: the predicted class, its contributions (N, p) and its maps
    (N, p, H, W) or None. A top-k graph's own top-1 (topk_classes[:, 0]) is the prediction:
    its maps and terms are there even when logits tie."""
    if "topk_classes" in out:
        pred = out["topk_classes"][:, 0].astype(np.int64)
    else:
        pred = out["logits"].argmax(1)
    n = np.arange(len(pred))
    if "contributions" in out:
        contributions = out["contributions"][n, pred]
    else:
        contributions = out["topk_contributions"][:, 0]
    maps = None
    if "maps" in out:
        maps = out["maps"][n, pred]
    elif "topk_maps" in out:
        ranks = (out["topk_classes"] == pred[:, None]).argmax(1)  # top-1 is in every top-k
        maps = out["topk_maps"][n, ranks]
    return pred, contributions, maps


def _unavailable(reason: str) -> dict:
    return {"unavailable": reason}


def evaluate(
    artifact,
    data=None,
    device="cpu",
    batch_size=32,
    progress=True,
    max_images: int | None = None,
    faith_steps: int = 10,
    faith_images: int | None = FAITH_IMAGES,
    faithfulness_on: bool = True,
) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy, the worst exactness residual, and the
    explanation measures in this module's docstring.

    The exactness residual is |logit − (Σ contributions + bias)| / max|logit| per image:
    how far the explanation is from adding up to the prediction. ``max_images``: an evenly
    spread subset of the images; ``faith_images``: of those, how many the faithfulness
    curves run on (evenly spread; None: all).
    """
    t0 = time.perf_counter()
    explainer = GraphSession.load(artifact, device=device)
    samples, data = heldout_samples(explainer.manifest, data, max_images)
    faith_idx = sorted(set(evenly_spread(len(samples), faith_images).tolist()))
    run = _run_images(explainer, samples, set(faith_idx), batch_size, progress)
    t_main = time.perf_counter() - t0
    report = _accuracy(explainer, run, data)
    report.update(_explanation_figures(explainer, run))
    t1 = time.perf_counter()
    if not faithfulness_on:
        report["faithfulness"] = _unavailable("skipped (--no-faithfulness)")
    elif run["faith_maps"] is None:
        report["faithfulness"] = _unavailable("the graph has no similarity maps (--maps none)")
    else:
        report["faithfulness"] = _faithfulness(
            explainer, run, faith_idx, faith_steps, batch_size, progress
        )
    report["seconds"] = {
        "graph": round(t_main, 2),
        "faithfulness": round(time.perf_counter() - t1, 2),
    }
    return report


def _run_images(explainer, samples, faith_idx: set, batch_size: int, progress: bool) -> dict:
    """One pass of the graph over ``samples``: what every figure needs, concatenated."""
    spec = explainer.preprocessing
    keep = {k: [] for k in ("logits", "residual", "pooled", "pred", "contributions")}
    faith = {"crops": [], "maps": []}
    pixel_sum = 0.0
    for i in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress):
        crops = np.stack([resize_crop(s.open(), spec) for s in samples[i : i + batch_size]])
        pixel_sum = pixel_sum + crops.sum(0, dtype=np.float64)
        out = explainer.run(normalize(crops, spec))
        pred, contributions, maps = _predicted_terms(out)
        terms = {
            "logits": out["logits"],
            "residual": explanation_residual(out),
            "pooled": out.get("pooled"),
            "pred": pred,
            "contributions": contributions,
        }
        for key, value in terms.items():
            keep[key].append(value)
        rows = [j for j in range(len(crops)) if i + j in faith_idx]
        faith["crops"].append(crops[rows])
        faith["maps"].append(None if maps is None else maps[rows])
    run = {k: np.concatenate(v) for k, v in keep.items() if k != "pooled"}
    run["pooled"] = None if keep["pooled"][0] is None else np.concatenate(keep["pooled"])
    run["labels"] = np.array([s.label for s in samples])
    run["mean_image"] = (pixel_sum / len(samples)).astype(np.float32)
    run["faith_crops"] = np.concatenate(faith["crops"])
    run["faith_maps"] = None if faith["maps"][0] is None else np.concatenate(faith["maps"])
    return run


def _accuracy(explainer, run: dict, data) -> dict:
    logits, labels = run["logits"], run["labels"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    per_class = {
        explainer.classes[c]: float((logits[labels == c].argmax(1) == c).mean())
        for c in np.unique(labels)
    }
    return {
        "top1_accuracy": float((logits.argmax(1) == labels).mean()),
        "top5_accuracy": float((top5 == labels[:, None]).any(1).mean()),
        "n_images": int(len(labels)),
        "max_explanation_residual": float(run["residual"].max()),
        "per_class_top1": per_class,
        "provider": explainer.provider,
        "data": str(Path(data).resolve()),
    }


def _explanation_figures(explainer, run: dict) -> dict:
    """Ablation, residual and explained shares, intervention (module docstring)."""
    manifest, tensors = explainer.manifest, explainer.tensors
    logits, pooled, pred, labels = run["logits"], run["pooled"], run["pred"], run["labels"]
    figures = {}
    if pooled is None:
        no_pooled = _unavailable(
            "the graph has no 'pooled' output (an all-class graph before format 4): "
            "re-export the artifact with `protonmf export`"
        )
        figures["ablation"] = figures["residual_share"] = no_pooled
    else:
        figures["ablation"] = ablation(manifest, tensors, logits, pooled, labels)
        figures["residual_share"] = residual_share(manifest, tensors, logits, pooled, pred)
    figures["explained_share"] = explained_share(manifest, tensors)
    figures["intervention"] = intervention(
        logits, pred, run["contributions"], tensors["coefficients"], labels
    )
    return figures


def _faithfulness(explainer, run, rows, steps, batch_size, progress) -> dict:
    logits, pred = run["logits"], run["pred"]
    p_original = _softmax(logits[rows])[np.arange(len(rows)), pred[rows]]
    return faithfulness(
        explainer,
        run["faith_crops"],
        run["faith_maps"],
        run["contributions"][rows],
        pred[rows],
        p_original,
        run["mean_image"],
        steps,
        batch_size,
        progress,
    )


def format_report(report: dict) -> str:
    """The report as indented ``key  value`` lines (per-class tables left to --json)."""
    lines = []

    def walk(d: dict, depth: int):
        for k, v in d.items():
            if k in ("per_class", "per_class_top1"):
                continue
            pad = "  " * depth
            if isinstance(v, dict):
                lines.append(f"{pad}{k}")
                walk(v, depth + 1)
            elif isinstance(v, list) and all(isinstance(row, dict) for row in v):  # the sweep
                lines.append(f"{pad}{k}")
                for row in v:
                    lines.append(pad + "  " + "  ".join(f"{a}={_fmt(b)}" for a, b in row.items()))
            elif isinstance(v, list):  # a curve
                lines.append(f"{pad}{k:<28}  {' '.join(f'{x:.3f}' for x in v)}")
            else:
                lines.append(f"{pad}{k:<28}  {_fmt(v)}")

    walk(report, 0)
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
