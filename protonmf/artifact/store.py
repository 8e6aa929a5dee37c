"""Reading and writing an artifact directory: manifest, checksums, tensors, atomic writes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TENSORS_FILE",
    "ArtifactError",
    "load_manifest",
    "load_tensors",
    "kept_files",
    "remove_stale",
    "scratch",
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
            path.name == f".{out_dir.name}.old" and out_dir.exists()
        )
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
    from protonmf.artifact.manifest import Manifest, ValidationError, problem

    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        raise ArtifactError(f"{path}: {problem(e)}") from None
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
        dims = {
            "C": len(manifest["classes"]),
            "p": int(manifest["p"]),
            "D": int(manifest["feature_dim"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"{artifact_dir}: manifest lacks a valid classes/p/feature_dim: {e!r}"
        ) from e
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
