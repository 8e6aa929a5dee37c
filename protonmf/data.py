"""Labelled image sources for conversion: an ImageFolder tree or Fashion-MNIST IDX files.

Both yield ``Sample(image, label)`` in a deterministic order (classes in model order,
files sorted by name) with an optional cap on images per class.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "find_split",
    "load_image_folder",
    "load_samples",
    "load_idx",
    "read_idx",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    """One labelled image: ``source`` is a file path or an in-memory array."""

    source: Path | np.ndarray
    label: int
    name: str | None = None  # for in-memory images: "<file>#<row>" (exemplars name their source)

    def open(self) -> Image.Image:
        if isinstance(self.source, np.ndarray):
            return Image.fromarray(self.source)
        with Image.open(self.source) as im:
            im.load()
            return im


def _class_index(folder_names: Sequence[str], class_names: Sequence[str]) -> dict[str, int]:
    """Map folder names to the model's class indices.

    By name when every folder is one of the model's labels; otherwise, when folders are
    integer indices (``0042``), by that number; otherwise refuse rather than guess.
    """
    by_name = {name: i for i, name in enumerate(class_names)}
    if all(f in by_name for f in folder_names):
        return {f: by_name[f] for f in folder_names}
    if all(f.isdigit() and int(f) < len(class_names) for f in folder_names):
        return {f: int(f) for f in folder_names}
    unknown = [f for f in folder_names if f not in by_name][:5]
    raise ValueError(
        f"class folders {unknown} match neither the model's class names "
        f"(e.g. {list(class_names)[:3]}) nor integer class indices"
    )


def load_image_folder(
    root: str | Path, class_names: Sequence[str], max_per_class: int | None = None
) -> list[Sample]:
    """Scan ``root/<class>/<image>`` into samples, sorted by class index then file name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    index = _class_index(folders, class_names)
    samples = []
    for folder in sorted(folders, key=lambda f: index[f]):
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples += [Sample(p, index[folder]) for p in files[:max_per_class]]
    if not samples:
        raise ValueError(f"no images with extensions {sorted(IMAGE_EXTENSIONS)} under {root}")
    return samples


def _idx_images(root: Path, prefix: str) -> Path | None:
    for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte"):
        if (root / name).is_file():
            return root / name
    return None


def find_split(root: str | Path) -> tuple[Path, Path | None]:
    """Where to take conversion and held-out images from.

    ``root`` with ``train/`` and ``val/`` or ``test/`` inside -> (train, held-out) folders;
    a Fashion-MNIST/MNIST IDX folder -> (train images file, t10k images file);
    anything else -> (root, None).
    """
    root = Path(root)
    if root.is_dir() and _idx_images(root, "train"):
        return _idx_images(root, "train"), _idx_images(root, "t10k")
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None


def load_samples(
    path: str | Path, class_names: Sequence[str], max_per_class: int | None = None
) -> list[Sample]:
    """An ImageFolder, or an IDX images file (its labels file beside it)."""
    path = Path(path)
    if path.is_file() and "-images-idx3-ubyte" in path.name:
        labels = path.with_name(path.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
        if not labels.is_file():
            raise FileNotFoundError(f"{path} has no labels file {labels.name} beside it")
        return load_idx(path, labels, max_per_class)
    return load_image_folder(path, class_names, max_per_class)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) such as Fashion-MNIST's into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_idx(
    images: str | Path, labels: str | Path, max_per_class: int | None = None
) -> list[Sample]:
    """Samples from a pair of IDX files (first ``max_per_class`` of each class)."""
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    samples = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)[:max_per_class]
        samples += [Sample(x[i], int(c), f"{Path(images).name}#{i}") for i in idx]
    return samples
