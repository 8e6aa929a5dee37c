"""Pick each prototype's exemplars: the conversion images where it is most present.

Presence, per image and position, as the paper visualises prototypes:
- ``nmf``: the NMF factor E of the prototypes b (Eq. 2), from the factorisation itself;
- ``augmented``: Eq. 9's E' = argmin ||A − E' B'||² of the served prototypes b', solved per
  position by the pseudo-inverse (``presence_filters``): E' = A · pinv(B').

An image's score is its peak presence (the largest value of its map), so one image is one
entry; the m best images per prototype are kept, with their maps and thumbnails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from protonmf.artifact import Preprocessing, resize_crop
from protonmf.data import Sample
from protonmf.exemplars import Exemplars

__all__ = ["presence_filters", "select_exemplars", "top_images"]


def presence_filters(prototypes: np.ndarray) -> np.ndarray:
    """b' (C, p, D) → (C, p, D): row i of class c is column i of pinv(B'_c), so
    E'_i(h, w) = A(h, w) · filters_ci is the least-squares presence of Eq. 9."""
    return np.stack([np.linalg.pinv(np.asarray(b, np.float64)).T for b in prototypes])


def top_images(presence: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """presence (n, H, W, p) of one class → (indices (p, m), peaks (p, m)), best first;
    -1 / NaN pad when the class has fewer than m images."""
    n, p = presence.shape[0], presence.shape[-1]
    peaks = presence.reshape(n, -1, p).max(1)  # (n, p)
    order = np.argsort(-peaks, axis=0, kind="stable")[:m].T  # (p, ≤m)
    idx = np.full((p, m), -1, np.int64)
    score = np.full((p, m), np.nan, np.float32)
    idx[:, : order.shape[1]] = order
    score[:, : order.shape[1]] = np.take_along_axis(peaks.T, order, 1)
    return idx, score


def _source_name(sample: Sample, root: Path) -> str:
    if sample.name:
        return sample.name
    try:
        return str(Path(sample.source).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(sample.source)


@torch.no_grad()
def select_exemplars(features: dict, nmf_E: dict, filters: np.ndarray, class_samples: dict,
                     prep: Preprocessing, m: int, root: Path, progress: bool = True) -> Exemplars:  # fmt: skip
    """features {c: (n, H, W, D) raw}, nmf_E {c: (n, H, W, p)}, filters (C, p, D),
    class_samples {c: the n samples in feature order} → Exemplars (thumbnails re-decoded
    for the chosen images only)."""
    C, p, _ = filters.shape
    H, W = next(iter(features.values())).shape[1:3]
    index = {k: np.full((C, p, m), -1, np.int64) for k in ("augmented", "nmf")}
    score = {k: np.full((C, p, m), np.nan, np.float32) for k in index}
    maps = {k: np.zeros((C, p, m, H, W), np.float32) for k in index}
    for c in tqdm(sorted(features), desc="exemplars", unit="class", disable=not progress):
        A = features[c].clamp_min(0).double()  # Eq. 9's A: the matrix NMF factorised
        presence = {
            "augmented": (A @ torch.from_numpy(filters[c]).T).float().numpy(),  # (n, H, W, p)
            "nmf": nmf_E[c],
        }
        for kind, E in presence.items():
            idx, peak = top_images(E, m)
            index[kind][c], score[kind][c] = idx, peak
            for i in range(p):
                keep = idx[i] >= 0
                maps[kind][c, i, keep] = E[idx[i][keep], :, :, i]
    # Per-class positions → one thumbnail per distinct image.
    chosen = sorted({(c, int(j)) for kind in index for c in features
                     for j in index[kind][c].ravel() if j >= 0})  # fmt: skip
    slot = {key: u for u, key in enumerate(chosen)}
    for kind in index:
        for c in features:
            index[kind][c] = np.vectorize(lambda j, c=c: slot.get((c, int(j)), -1))(index[kind][c])
    thumbs = [resize_crop(class_samples[c][j].open(), prep) for c, j in chosen]
    crop = (prep.height, prep.width) + (() if prep.color_mode == "L" else (3,))
    return Exemplars(
        thumbnails=np.stack(thumbs) if thumbs else np.zeros((0, *crop), np.uint8),
        sources=[_source_name(class_samples[c][j], root) for c, j in chosen],
        index={k: v.astype(np.int32) for k, v in index.items()},
        score=score,
        maps=maps,
    )
