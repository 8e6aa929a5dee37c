"""``protonmf evaluate``: accuracy of the artifact's graph on labelled images (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from protonmf.data import load_samples

from .runtime import Explainer

__all__ = ["evaluate", "explanation_residual"]


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


def evaluate(artifact, data=None, device="cpu", batch_size=32, progress=True) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy and the worst exactness residual.

    The exactness residual is |logit − (Σ contributions + bias)| / max|logit| per image:
    how far the explanation is from adding up to the prediction.
    """
    explainer = Explainer.load(artifact, device=device)
    conv = explainer.manifest["conversion"]
    data = data or conv.get("heldout") or conv.get("data")
    if not data or not Path(data).exists():
        raise FileNotFoundError(f"no labelled images at {data}; pass --data DIR")
    samples = load_samples(data, explainer.classes)
    labels = np.array([s.label for s in samples])
    logits, residual = [], []
    for i in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress):
        batch = explainer.preprocess([s.open() for s in samples[i : i + batch_size]])
        out = explainer.run(batch)
        logits.append(out["logits"])
        residual.append(explanation_residual(out))
    logits = np.concatenate(logits)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    per_class = {}
    for c in np.unique(labels):
        mask = labels == c
        per_class[explainer.classes[c]] = float((logits[mask].argmax(1) == c).mean())
    return {
        "top1_accuracy": float((logits.argmax(1) == labels).mean()),
        "top5_accuracy": float((top5 == labels[:, None]).any(1).mean()),
        "n_images": int(len(labels)),
        "max_explanation_residual": float(np.concatenate(residual).max()),
        "per_class_top1": per_class,
        "provider": explainer.provider,
        "data": str(Path(data).resolve()),
    }
