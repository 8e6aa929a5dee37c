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
Version 4: every graph emits ``pooled`` (the residual split of any class needs it), an
optional ``presence`` graph output (Eq. 9's E', ``graph.presence``) with its
``presence_filters`` tensor, and an optional ``exemplars.safetensors``
(``protonmf/exemplars.py``). Older versions read as artifacts without these.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "INTERPOLATIONS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TENSORS_FILE",
    "ArtifactError",
    "Preprocessing",
    "load_manifest",
    "load_tensors",
    "kept_files",
    "remove_stale",
    "scratch",
    "normalize",
    "preprocess",
    "resize_crop",
    "sha256_file",
    "write_artifact",
]

FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
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
# Tensors some artifacts carry, checked when present.
OPTIONAL_TENSORS = {
    "fold_weights": ("C", "p"),  # w: b'_i = b_i + w_i R (Eq. 8 or the guard's split)
    "presence_filters": ("C", "p", "D"),  # rows of pinv(B'_c): Eq. 9's E' = A · filtersᵀ
}


class ArtifactError(Exception):
    """The artifact is missing, corrupt, or of another format version."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the graph's input tensor (N, channels, height, width).

    Reproduces timm's eval transform (``timm.data.create_transform`` of the model's resolved
    data config) pixel for pixel on PIL images: convert to ``color_mode``, resize, centre-crop
    to ``height`` x ``width``, scale to [0, 1], then ``(x - mean) / std`` per channel.

    ``crop_mode`` (added; default ``"center"``, the only mode older manifests knew) picks
    the resize, as timm's ``crop_mode`` does:

    - ``"center"``: aspect kept. Without ``resize_hw`` the shorter side becomes ``resize`` and
      the longer ``int(resize * long / short)`` (torchvision ``Resize(int)``). With
      ``resize_hw`` = (h, w) the image is scaled by ``min(H / h, W / w)``, each side rounded
      (timm ``ResizeKeepRatio``); timm does this when a non-square input's two resize targets
      differ.
    - ``"squash"``: to exactly ``resize_hw`` (or ``resize`` x ``resize``), aspect not kept.
    - ``"border"``: aspect kept, the longer side fits (``max`` instead of ``min``); the crop
      pads with ``round(255 * mean)``.

    The crop is torchvision's ``CenterCrop``: offset ``int(round((side - crop) / 2))``; an
    image smaller than the crop is padded (zeros; the mean colour in ``"border"`` mode).
    ``resize`` is always a shorter side that is enough for the resize to only shrink (JPEG
    draft decoding relies on it): the target itself for square centre resizes, otherwise
    ``max(resize_hw)``. ``resize_hw`` (added; default None) is written only where set.
    Older artifacts with a non-square crop (no ``resize_hw``) keep their conversion's
    resize: shorter side to ``resize``, then each side at least the crop's.
    """

    height: int
    width: int
    resize: int
    color_mode: str = "RGB"  # "RGB" (3 channels) or "L" (1 channel)
    interpolation: str = "bilinear"  # a key of INTERPOLATIONS
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_mode: str = "center"  # "center" | "squash" | "border"
    resize_hw: tuple[int, int] | None = None  # (h, w) resize target where not square

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # Defaults left out: a square centre crop stays readable by older services.
        if d["crop_mode"] == "center":
            del d["crop_mode"]
        if d["resize_hw"] is None:
            del d["resize_hw"]
        else:
            d["resize_hw"] = list(d["resize_hw"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        if d.get("resize_hw") is not None:
            d["resize_hw"] = tuple(d["resize_hw"])
        return cls(**d)


# PIL enum values; the names are timm's, the numbers torchvision's pil_modes_mapping.
# timm interpolation names → PIL resampling filters (the converter checks against it)
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_CROP_MODES = ("center", "squash", "border")


def _resized_size(w: int, h: int, spec: Preprocessing) -> tuple[int, int]:
    """(width, height) after timm's resize step; same arithmetic, so the same pixels."""
    th, tw = spec.resize_hw or (spec.resize, spec.resize)
    if spec.crop_mode == "squash":  # torchvision Resize((h, w))
        return tw, th
    if spec.crop_mode == "center" and spec.resize_hw is None:  # torchvision Resize(int)
        short, long = (w, h) if w <= h else (h, w)
        long = int(spec.resize * long / short)
        new_w, new_h = (spec.resize, long) if w <= h else (long, spec.resize)
        if spec.height != spec.width:  # only older artifacts: each side clamped to the crop
            new_w, new_h = max(spec.width, new_w), max(spec.height, new_h)  # as converted
        return new_w, new_h
    # timm ResizeKeepRatio: longest=0 ("center") or 1 ("border"), Python's round
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if spec.crop_mode == "border" else min(ratio_h, ratio_w)
    return round(w / ratio), round(h / ratio)


def _crop_offset(side: int, crop: int) -> int:
    """torchvision CenterCrop: pad a short side by (crop - side) // 2 first, else round."""
    if crop > side:
        return -((crop - side) // 2)
    return int(round((side - crop) / 2.0))


def resize_crop(image, spec: Preprocessing) -> np.ndarray:
    """PIL image -> uint8 array (height, width) for "L" or (height, width, 3) for "RGB".

    The geometric half of preprocessing: colour conversion, resize, centre crop, as
    ``Preprocessing`` describes (timm's eval transform, exactly). Kept apart from
    ``normalize`` so a server can move compact uint8 crops around and normalise whole
    batches at once.
    """
    from PIL import Image

    if spec.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {spec.interpolation!r}")
    if spec.crop_mode not in _CROP_MODES:
        raise ValueError(f"unknown crop_mode {spec.crop_mode!r}; known: {', '.join(_CROP_MODES)}")
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    new_size = _resized_size(*image.size, spec)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling(INTERPOLATIONS[spec.interpolation]))
    w, h = image.size
    left, top = _crop_offset(w, spec.width), _crop_offset(h, spec.height)
    if spec.width <= w and spec.height <= h:  # inside the image: the usual case
        image = image.crop((left, top, left + spec.width, top + spec.height))
    else:  # smaller than the crop: pad, as torchvision's CenterCrop / timm's CenterCropOrPad
        fill = [round(255 * m) for m in spec.mean] if spec.crop_mode == "border" else [0]
        fill = fill[0] if spec.color_mode == "L" else tuple(fill * (3 // len(fill)))
        canvas = Image.new(spec.color_mode, (spec.width, spec.height), fill)
        canvas.paste(image, (-left, -top))
        image = canvas
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of ``out_dir`` left beside it: scratch folders of
    processes that are gone, and the previous artifact kept during a swap that finished.
    (Process ids are this machine's: do not share an output folder between machines.)"""
    out_dir = Path(out_dir).resolve()
    owned = re.compile(rf"^\.{re.escape(out_dir.name)}\.[a-z]+-(\d+)-")
    removed = []
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        match = owned.match(path.name)
        stale = (match is not None and not _alive(int(match.group(1)))) or (
            path.name == f".{out_dir.name}.old" and out_dir.exists())  # fmt: skip
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def scratch_dir(out_dir: str | os.PathLike, purpose: str) -> Path:
    """A new private folder beside ``out_dir`` (``.NAME.PURPOSE-PID-XXXX``), after removing
    those that killed runs left (``remove_stale``). Beside, not in /tmp: a rename into place
    stays on one file system, and a re-run finds and cleans what a ``kill -9`` left."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir)
    prefix = f".{out_dir.name}.{purpose}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))


@contextlib.contextmanager
def scratch(out_dir: str | os.PathLike, purpose: str):
    """``scratch_dir`` as a context manager: removed on exit, whatever happens."""
    path = scratch_dir(out_dir, purpose)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
    tmp = scratch_dir(out_dir, "write")
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
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    artifact_dir = Path(artifact_dir)
    manifest = manifest or load_manifest(artifact_dir)
    try:
        tensors = load_file(str(artifact_dir / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{artifact_dir}: {TENSORS_FILE} is unreadable: {e}") from e
    try:
        dims = {"C": len(manifest["classes"]), "p": int(manifest["p"]),
                "D": int(manifest["feature_dim"])}  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{artifact_dir}: manifest lacks a valid classes/p/feature_dim: "
                            f"{e!r}") from e  # fmt: skip
    for name, shape in {**REQUIRED_TENSORS, **OPTIONAL_TENSORS}.items():
        if name not in tensors:
            if name in OPTIONAL_TENSORS:
                continue
            raise ArtifactError(f"{artifact_dir}: tensor {name!r} missing from {TENSORS_FILE}")
        want = tuple(dims[s] for s in shape)
        if tensors[name].shape != want:
            raise ArtifactError(
                f"{artifact_dir}: tensor {name!r} has shape {tensors[name].shape}, "
                f"manifest implies {want}"
            )
    return tensors


def kept_files(artifact_dir: str | os.PathLike, manifest: dict) -> dict[str, Path]:
    """Files an artifact carries beside its graph and tensors (exemplars, variants), by
    name: what a rewrite of the graph or tensors passes on as ``extra_files``."""
    core = {MANIFEST_FILE, MODEL_FILE, TENSORS_FILE}
    return {n: Path(artifact_dir) / n for n in manifest.get("files", {}) if n not in core}
