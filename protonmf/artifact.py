"""The artifact contract shared by the converter (offline) and the service (online).

An artifact is a directory::

    manifest.json            what everything is: classes, p, preprocessing, graph I/O,
                             backbone identity, diagnostics, checksums of the files below
    model.onnx               the fused explainer graph (logits, scores, contributions, maps)
    prototypes.safetensors   augmented prototypes, NMF prototypes, coefficients, bias, residuals

This module needs numpy, safetensors and Pillow only: never torch. Both halves import it,
so a change of layout is a change of ``FORMAT_VERSION``. Version 2 added the graph's
``scores`` mode (``"topk"``: scores for the predicted classes + pooled features); version 1
artifacts (all-class scores, no ``graph.scores``) are still read, as ``scores="all"``.
Version 3: an all-scores graph emits ``bias`` only where it depends on the image (LayerNorm
heads); otherwise it is the ``bias`` tensor below (``service.runtime.Explainer.run`` adds
it back). Versions 1 and 2 read unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TENSORS_FILE",
    "ArtifactError",
    "Preprocessing",
    "load_manifest",
    "load_tensors",
    "normalize",
    "preprocess",
    "resize_crop",
    "sha256_file",
    "write_artifact",
]

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TENSORS_FILE = "prototypes.safetensors"

# Tensors every artifact carries, with their shapes in terms of C (classes), p, D.
REQUIRED_TENSORS = {
    "prototypes": ("C", "p", "D"),  # augmented prototypes b' (Eq. 8): sum_i a_i b'_i == V
    "nmf_prototypes": ("C", "p", "D"),  # B from NMF (Eq. 2)
    "coefficients": ("C", "p"),  # a (Eq. 4)
    "residuals": ("C", "D"),  # R = V - a B (Eq. 5)
    "class_vectors": ("C", "D"),  # V: the head's weights the prototypes rebuild
    "bias": ("C",),  # the head's bias, kept as its own term
}


class ArtifactError(Exception):
    """The artifact is missing, corrupt, or of another format version."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the graph's input tensor (N, channels, height, width).

    Mirrors timm's eval transform: resize the shorter side to ``resize``, centre-crop
    to ``height`` x ``width``, scale to [0, 1], then ``(x - mean) / std`` per channel.
    """

    height: int
    width: int
    resize: int
    color_mode: str = "RGB"  # "RGB" (3 channels) or "L" (1 channel)
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}  # PIL enum values


def resize_crop(image, spec: Preprocessing) -> np.ndarray:
    """PIL image -> uint8 array (height, width) for "L" or (height, width, 3) for "RGB".

    The geometric half of preprocessing: colour conversion, shorter side to
    ``spec.resize``, centre crop. Kept apart from ``normalize`` so a server can move
    compact uint8 crops around and normalise whole batches at once.
    """
    from PIL import Image

    if spec.interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {spec.interpolation!r}")
    image = image.convert(spec.color_mode)
    w, h = image.size
    scale = spec.resize / min(w, h)
    new_size = (max(spec.width, round(w * scale)), max(spec.height, round(h * scale)))
    if new_size != (w, h):
        image = image.resize(new_size, Image.Resampling(_RESAMPLE[spec.interpolation]))
    w, h = image.size
    left, top = (w - spec.width) // 2, (h - spec.height) // 2
    image = image.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(image, dtype=np.uint8)


def normalize(crops: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 crops (N, h, w) or (N, h, w, 3) -> float32 (N, channels, h, w), normalised.

    (x / 255 − mean) / std in float32, in place on one contiguous buffer: the same operations
    in the same order as the plain expression (bit-identical), without its temporaries and
    strided passes — 7× less time at 32 × 224² (it was most of a GPU batch's host time).
    """
    src = crops[:, None] if crops.ndim == 3 else crops.transpose(0, 3, 1, 2)  # (N, c, h, w)
    x = np.empty(src.shape, np.float32)
    np.copyto(x, src, casting="unsafe")
    x /= np.float32(255.0)
    x -= np.asarray(spec.mean, np.float32)[:, None, None]
    x /= np.asarray(spec.std, np.float32)[:, None, None]
    return x


def preprocess(image, spec: Preprocessing) -> np.ndarray:
    """PIL image -> float32 array of shape (channels, height, width), normalised."""
    return normalize(resize_crop(image, spec)[None], spec)[0]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    tensors: dict[str, np.ndarray],
    onnx_path: str | os.PathLike | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write an artifact atomically: build it in a sibling temp dir, then swap it in.

    A reader never sees a half-written artifact; an existing one is replaced whole.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).resolve()
    missing = set(REQUIRED_TENSORS) - set(tensors)
    if missing:
        raise ArtifactError(f"missing tensors: {sorted(missing)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / TENSORS_FILE)
        files = [TENSORS_FILE]
        if onnx_path is not None:
            shutil.copyfile(onnx_path, tmp / MODEL_FILE)
            files.append(MODEL_FILE)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            files.append(name)
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        # mkdtemp makes a private dir; an artifact is meant to be read by other users
        # (a serving container's non-root user, say).
        tmp.chmod(0o755)
        for name in [*files, MANIFEST_FILE]:
            (tmp / name).chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_manifest(artifact_dir: str | os.PathLike, verify_checksums: bool = True) -> dict:
    """Read and validate ``manifest.json``; refuse another format version or a bad checksum."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} is not a ProtoNMF artifact: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{artifact_dir}: artifact format version {version!r}, this protonmf reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}; re-run `protonmf convert` "
            "with this version"
        )
    if isinstance(manifest.get("graph"), dict):  # version 1 graphs: all-class scores
        manifest["graph"].setdefault("scores", "all")
    files = manifest.get("files", {})
    if TENSORS_FILE not in files:
        raise ArtifactError(f"{path} lists no {TENSORS_FILE}")
    if verify_checksums:
        for name, expected in files.items():
            f = artifact_dir / name
            if not f.is_file():
                raise ArtifactError(f"{artifact_dir}: {name} is listed in the manifest but missing")
            actual = sha256_file(f)
            if actual != expected:
                raise ArtifactError(
                    f"{artifact_dir}: checksum mismatch for {name} "
                    f"(manifest {expected[:12]}…, file {actual[:12]}…): the artifact is corrupt "
                    "or was edited after conversion"
                )
    return manifest


def load_tensors(artifact_dir: str | os.PathLike, manifest: dict | None = None) -> dict:
    """Load the prototype tensors as numpy arrays and check their shapes against the manifest."""
    from safetensors.numpy import load_file

    artifact_dir = Path(artifact_dir)
    manifest = manifest or load_manifest(artifact_dir)
    tensors = load_file(str(artifact_dir / TENSORS_FILE))
    dims = {
        "C": len(manifest["classes"]),
        "p": manifest["p"],
        "D": manifest["feature_dim"],
    }
    for name, shape in REQUIRED_TENSORS.items():
        if name not in tensors:
            raise ArtifactError(f"{artifact_dir}: tensor {name!r} missing from {TENSORS_FILE}")
        want = tuple(dims[s] for s in shape)
        if tensors[name].shape != want:
            raise ArtifactError(
                f"{artifact_dir}: tensor {name!r} has shape {tensors[name].shape}, "
                f"manifest implies {want}"
            )
    return tensors
