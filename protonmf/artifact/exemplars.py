"""Exemplars: the training images where each prototype is most present, with its maps.

An artifact of format version 4 may carry ``exemplars.safetensors`` (listed and hashed in
the manifest's ``files``, described by ``manifest["exemplars"]``). For every class c,
prototype i and kind, up to m training images, best first, one entry per source image:

    thumbnails      uint8 (U, h, w) or (U, h, w, 3): the model's input crops, each stored once
    {kind}.index    int32 (C, p, m) into thumbnails, -1 for an empty slot
    {kind}.score    float32 (C, p, m): peak presence, the largest value of the map
    {kind}.maps     float32 (C, p, m, H, W): the prototype's presence map on that image
    metadata        "sources": JSON list of U names (path relative to the data root, or
                    "<file>#<row>" for IDX files)

Kinds: ``augmented`` ranks by Eq. 9's E' (least-squares presence of the served prototypes
b'), ``nmf`` by the NMF factor E of the prototypes b (Eq. 2). Needs numpy and safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protonmf.artifact.manifest import Manifest
from protonmf.artifact.store import ArtifactError

__all__ = ["EXEMPLARS_FILE", "KINDS", "Exemplars", "load_exemplars", "save_exemplars"]

EXEMPLARS_FILE = "exemplars.safetensors"
KINDS = ("augmented", "nmf")


@dataclass
class Exemplars:
    thumbnails: np.ndarray
    sources: list[str]
    index: dict[str, np.ndarray]
    score: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.index)

    @property
    def m(self) -> int:
        return int(next(iter(self.index.values())).shape[2])

    def entries(self, c: int, i: int, kind: str = "augmented") -> list[dict]:
        """Prototype i of class c: its exemplars, best first."""
        self._check_kind(kind)
        return [
            {"image": int(u), "source": self.sources[u], "presence": float(s)}
            for u, s in zip(self.index[kind][c, i], self.score[kind][c, i], strict=True)
            if u >= 0
        ]

    def strip(self, c: int, i: int, kind: str = "augmented") -> tuple[np.ndarray, np.ndarray]:
        """(thumbnails (n, h, w[, 3]) uint8, maps (n, H, W)) of prototype i's exemplars."""
        self._check_kind(kind)
        keep = self.index[kind][c, i] >= 0
        return self.thumbnails[self.index[kind][c, i][keep]], self.maps[kind][c, i][keep]

    def _check_kind(self, kind: str) -> None:
        if kind not in self.index:
            raise KeyError(f"no exemplars of kind {kind!r}; this artifact has {list(self.kinds)}")


def save_exemplars(path: str | os.PathLike, ex: Exemplars) -> None:
    from safetensors.numpy import save_file

    tensors = {"thumbnails": np.ascontiguousarray(ex.thumbnails, np.uint8)}
    for kind in ex.kinds:
        tensors[f"{kind}.index"] = np.ascontiguousarray(ex.index[kind], np.int32)
        tensors[f"{kind}.score"] = np.ascontiguousarray(ex.score[kind], np.float32)
        tensors[f"{kind}.maps"] = np.ascontiguousarray(ex.maps[kind], np.float32)
    save_file(tensors, str(path), metadata={"sources": json.dumps(ex.sources)})


def load_exemplars(artifact_dir: str | os.PathLike, manifest: dict | Manifest) -> Exemplars | None:
    """The artifact's exemplars checked against its manifest, or None if it has none
    (older formats, or converted with ``--exemplars 0``). The file's checksum is checked by
    ``load_manifest``."""
    from safetensors import safe_open

    info = Manifest.of(manifest).exemplars
    if not info:
        return None
    path = Path(artifact_dir) / info.get("file", EXEMPLARS_FILE)
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: {path.name} is described in the manifest but missing")
    try:
        with safe_open(str(path), framework="numpy") as f:
            sources = json.loads((f.metadata() or {}).get("sources", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable exemplars file: {e}") from e
    ex = Exemplars(
        thumbnails=tensors.pop("thumbnails", np.zeros((0,), np.uint8)),
        sources=sources if isinstance(sources, list) else [],
        index={k: tensors[f"{k}.index"] for k in KINDS if f"{k}.index" in tensors},
        score={k: tensors[f"{k}.score"] for k in KINDS if f"{k}.score" in tensors},
        maps={k: tensors[f"{k}.maps"] for k in KINDS if f"{k}.maps" in tensors},
    )
    _check(ex, manifest, path)
    return ex


def _check(ex: Exemplars, manifest: dict, path: Path) -> None:
    info = Manifest.of(manifest)
    C, p = len(info.classes), info.p
    H, W = info.feature_grid
    m = info.exemplars.get("m")
    pre = info.preprocessing
    crop = (pre.height, pre.width) + (() if pre.color_mode == "L" else (3,))
    problems = []
    if not ex.index:
        problems.append("no exemplar kinds")
    if ex.thumbnails.ndim < 1 or ex.thumbnails.shape[1:] != crop or ex.thumbnails.dtype != np.uint8:
        problems.append(
            f"thumbnails {ex.thumbnails.shape} {ex.thumbnails.dtype}, expected (U, *{crop}) uint8"
        )
    if len(ex.sources) != len(ex.thumbnails):
        problems.append(f"{len(ex.sources)} source names for {len(ex.thumbnails)} thumbnails")
    for kind in ex.index:
        want = {"index": (C, p, m), "score": (C, p, m), "maps": (C, p, m, H, W)}
        for name, table in (("index", ex.index), ("score", ex.score), ("maps", ex.maps)):
            got = table.get(kind)
            if got is None or got.shape != want[name]:
                problems.append(
                    f"{kind}.{name} has shape {None if got is None else got.shape}, "
                    f"manifest implies {want[name]}"
                )
        idx = ex.index[kind]
        if idx.size and (idx.max() >= len(ex.thumbnails) or idx.min() < -1):
            problems.append(f"{kind}.index points outside the {len(ex.thumbnails)} thumbnails")
    if problems:
        raise ArtifactError(f"{path}: " + "; ".join(problems))
