"""``protonmf evaluate --sweep-p``: the paper's Fig. 5 and Table 3 over the number of
prototypes p, with the converter's own steps (needs torch).

Features are extracted once — the artifact's training images for NMF, the held-out images
for accuracy (pooled) — with the model the manifest records; then for each p: NMF with the
artifact's settings, the head fit (Eq. 4–5) and fold (Eq. 8), and per p

- ``feature_rel_error``: mean over classes of ||A − E B|| / ||A|| (A clipped at 0, as NMF sees it)
- ``head_rel_error``: mean over classes of ||R|| / ||V||
- ``nmf_only_top1`` / ``residual_only_top1`` / ``augmented_top1``: top-1 on the held-out
  images of the heads a·B, R and Σ a b' (= V: the black box's top-1).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from protonmf.analysis.evaluate import head_logits, heldout_samples
from protonmf.artifact import load_manifest
from protonmf.artifact.manifest import Manifest
from protonmf.converter.convert import ConvertConfig, _device, _run_nmf, extract_features
from protonmf.converter.head import fit_coefficients, fold_residual
from protonmf.converter.models import analyse_head, recorded_model
from protonmf.data import load_samples

__all__ = ["sweep"]

log = logging.getLogger(__name__)


def _config(manifest: dict, device: str) -> ConvertConfig:
    """The NMF/head settings the artifact was converted with (defaults for older records)."""
    info = Manifest.of(manifest)
    conv = info.conversion
    names = {f.name for f in dataclasses.fields(ConvertConfig)} - {"model", "data", "out", "device"}
    known = {k: v for k, v in conv.items() if k in names}
    return ConvertConfig(
        model=info.backbone["model"], data=conv["data"], out="", device=device, **known
    )


def _pooled(features: dict) -> tuple[np.ndarray, np.ndarray]:
    """{class: (n, H, W, D)} → pooled features (N, D) float64 and labels (N,)."""
    order = sorted(features)
    pooled = np.concatenate([features[c].double().mean((1, 2)).numpy() for c in order])
    labels = np.concatenate([np.full(features[c].shape[0], c) for c in order])
    return pooled, labels


def sweep(
    artifact,
    ps,
    data=None,
    max_images=None,
    device="cpu",
    batch_size=None,
    progress=True,
    max_per_class=None,
) -> list[dict]:
    """One row per p in ``ps`` (see the module docstring). ``data``/``max_images``: the
    held-out images, chosen as ``protonmf evaluate`` chooses them; ``max_per_class``: fewer
    training images per class than the conversion used (default: the same images)."""
    manifest = load_manifest(artifact)
    cfg = _config(manifest, device)
    if max_per_class:
        cfg.max_per_class = min(max_per_class, cfg.max_per_class or max_per_class)
    dev = _device(device)
    batch_size = batch_size or cfg.batch_size
    info = Manifest.of(manifest)
    classes = info.classes
    model = recorded_model(manifest).to(dev)
    prep = info.preprocessing
    torch.manual_seed(cfg.seed)
    probe = torch.randn(2, prep.channels, prep.height, prep.width, device=dev)
    head = analyse_head(model, probe)
    train = load_samples(cfg.data, classes, cfg.max_per_class)
    heldout, _ = heldout_samples(manifest, data, max_images)
    features = extract_features(model, head, train, prep, batch_size, dev, progress)
    pooled, labels = _pooled(
        extract_features(model, head, heldout, prep, batch_size, dev, progress)
    )
    V = head.class_vectors.cpu().numpy()  # (C, D) float64
    bias = head.effective_bias.cpu().numpy()
    norm_eps = head.norm_eps if head.kind == "avg_norm_linear" else None
    v_norm = np.maximum(np.linalg.norm(V, axis=1), 1e-300)
    rows = []
    for p in ps:
        nmf_out = _run_nmf(features, classes, p, cfg, dev, progress)
        B = np.zeros((len(V), p, V.shape[1]))
        for c, r in nmf_out.items():
            B[c] = r["B"]
        a, R = fit_coefficients(V, B, nonneg=cfg.nonneg)
        fold = fold_residual(a, B, R, min_sum_ratio=cfg.min_sum_ratio)
        heads = {
            "nmf_only": np.einsum("cp,cpd->cd", a, B),
            "residual_only": R,
            "augmented": np.einsum("cp,cpd->cd", fold.coefficients, fold.prototypes),
        }
        explained = sorted(nmf_out)  # classes with images: the ones NMF ran on
        row = {
            "p": p,
            "feature_rel_error": float(
                np.mean([nmf_out[c]["feature_rel_error"] for c in explained])
            ),
            "head_rel_error": float(
                np.mean(np.linalg.norm(R[explained], axis=1) / v_norm[explained])
            ),
        }
        for name, W in heads.items():
            top1 = head_logits(W, pooled, bias, norm_eps).argmax(1) == labels
            row[f"{name}_top1"] = float(top1.mean())
        log.info("sweep: %s", row)
        rows.append(row)
    return rows
