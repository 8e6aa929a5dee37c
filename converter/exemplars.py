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

from protonmf.artifact import Preprocessing, resize_crop
from protonmf.artifact.exemplars import Exemplars
from protonmf.data import Sample

__all__ = ["assemble", "presence_filters", "rank_class", "top_images"]


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
def rank_class(features: torch.Tensor, nmf_E: np.ndarray, filters: np.ndarray, m: int) -> dict:
    """One class: raw features (n, H, W, D), NMF's E (n, H, W, p), its presence filters
    (p, D) → {kind: (image positions (p, m), peak presences (p, m), maps (p, m, H, W))}.
    Only this is kept of a class's features once they are freed (streamed conversion)."""
    A = features.clamp_min(0)  # Eq. 9's A: the matrix NMF factorised (float32: no 2× copy)
    presence = {
        "augmented": (A @ torch.from_numpy(np.asarray(filters, np.float32)).T).numpy(),
        "nmf": nmf_E,
    }
    ranked = {}
    for kind, E in presence.items():
        idx, peak = top_images(E, m)
        maps = np.zeros((E.shape[-1], m, *E.shape[1:3]), np.float32)
        for i in range(E.shape[-1]):
            keep = idx[i] >= 0
            maps[i, keep] = E[idx[i][keep], :, :, i]
        ranked[kind] = (idx, peak, maps)
    return ranked


def assemble(
    ranked: dict, class_samples: dict, prep: Preprocessing, shape: tuple[int, ...], root: Path
) -> Exemplars:
    """{class: rank_class(...)} → Exemplars for all C classes (shape = (C, p, m, H, W));
    thumbnails re-decoded for the chosen images only, each image stored once."""
    C, p, m, H, W = shape
    index = {k: np.full((C, p, m), -1, np.int64) for k in ("augmented", "nmf")}
    score = {k: np.full((C, p, m), np.nan, np.float32) for k in index}
    maps = {k: np.zeros((C, p, m, H, W), np.float32) for k in index}
    for c, kinds in ranked.items():
        for kind, (idx, peak, class_maps) in kinds.items():
            index[kind][c], score[kind][c], maps[kind][c] = idx, peak, class_maps
    chosen = sorted(
        {(c, int(j)) for kind in index for c in ranked for j in index[kind][c].ravel() if j >= 0}
    )
    slot = {key: u for u, key in enumerate(chosen)}
    for kind in index:
        for c in ranked:
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
