import json
import os
from pathlib import Path

import pytest

from protonmf.sample_data import imagenet_photo_folder, lite0_checkpoint

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parents[1]
FASHION_MODEL = REPO / "models" / "fashion-resnet"
FASHION_DATA = REPO / "data" / "fashion-mnist"


# Fixtures that convert a model: a test using one is slow whatever its own marks say, so
# `-m "not slow"` stays the fast tier without every test having to remember it.
CONVERTING_FIXTURES = {"fashion_artifact", "fashion_topk_artifact", "lite0_artifact"}


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if CONVERTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in items:
            if item.get_closest_marker("gpu"):  # not item.keywords: a param id "gpu" matches too
                item.add_marker(skip)


def run_cli(*args, capsys=None):
    """Run ``protonmf`` in-process; returns (exit code, stdout)."""
    from protonmf.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr().out if capsys else ""
    return code, out


@pytest.fixture(scope="session")
def imagenet_photos(tmp_path_factory) -> Path:
    """foolbox's 20 bundled ImageNet photos as an ImageFolder (folders = class indices)."""
    root = imagenet_photo_folder(tmp_path_factory.mktemp("imagenet_photos"))
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
def fashion_topk_artifact(fashion_artifact, tmp_path_factory) -> Path:
    """The Fashion artifact with the top-k head (the 1,000-class default; Fashion's 10
    classes get the all-class head by default), written by `protonmf export`."""
    from protonmf.cli import main

    out = tmp_path_factory.mktemp("fashion-topk") / "artifact"
    args = ["export", fashion_artifact, "--maps", "topk", "--scores", "topk", "--out", out]
    assert main([str(a) for a in args]) == 0
    return out


@pytest.fixture(scope="session")
def lite0_artifact(tmp_path_factory, imagenet_photos) -> Path:
    out = tmp_path_factory.mktemp("lite0") / "artifact"
    return _convert(out, "--model", "tf_efficientnet_lite0", "--checkpoint", lite0_checkpoint(),
                    "--data", imagenet_photos, "-p", 3)  # fmt: skip


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def run_images(core, blobs: list[bytes]) -> list[dict]:
    """Decode, one graph run, per-image outputs: the data plane's path without its batcher."""
    import numpy as np

    return core.split(core.infer(np.stack([core.prepare(b) for b in blobs])))
