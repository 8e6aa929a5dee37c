"""Fixtures and hooks. Plain helpers are in helpers.py (servers: served.py, Chromium:
browser.py); the names below imported from helpers stay importable from here.

Tiers (docs/testing.md): every collected test gets exactly one of TIERS, assigned here:
a tier mark on the test itself (``@pytest.mark.e2e``) wins; otherwise its module's entry
in MODULE_TIERS, else "unit"; a test whose fixtures (directly or through other fixtures)
include a converted artifact is never "unit" (it becomes "service").

Nothing here imports torch, timm or the converter at import time: the unit tier collects
and runs where only the serving extra is installed (``pip install .[serve]`` + pytest;
tests/test_tiers.py keeps it so). The conversion fixtures import the converter when they
run; unit tests that need torch, timm, scikit-learn or cvxpy skip themselves without them
(``pytest.importorskip``)."""

import os
from pathlib import Path

import pytest
from helpers import FASHION_DATA, FASHION_MODEL, REPO, manifest_of, run_cli, run_images  # noqa: F401

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

TIERS = ("unit", "service", "e2e", "deploy")

# Fixtures that convert a model: a test using one, directly or through another fixture
# (item.fixturenames is the closure), is at least "service".
ARTIFACT_FIXTURES = {"fashion_artifact", "fashion_topk_artifact", "lite0_artifact"}

# Modules whose tests are not "unit" by default. Others default to "unit"; their tests that
# convert models themselves, run the CLI end to end or drive the browser carry
# @pytest.mark.e2e, and their artifact-fixture tests are lifted to "service".
MODULE_TIERS = {
    "test_exemplars": "e2e",  # its module fixture converts a model
    "test_service_http": "service",  # every test talks to a served artifact
    "test_deploy": "deploy",
    "test_prometheus_integration": "deploy",
}
TIER_COUNTS = pytest.StashKey[dict]()


def tier_of(item) -> str:
    marked = {m.name for m in item.iter_markers() if m.name in TIERS}
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one tier mark {sorted(marked)}")
    if marked:
        tier = marked.pop()
        if tier == "unit" and ARTIFACT_FIXTURES & set(item.fixturenames):
            raise pytest.UsageError(f"{item.nodeid}: marked unit but uses a converted artifact")
        return tier
    tier = MODULE_TIERS.get(Path(str(item.fspath)).stem, "unit")
    if tier == "unit" and ARTIFACT_FIXTURES & set(getattr(item, "fixturenames", ())):
        tier = "service"
    return tier


def cuda_available() -> bool:
    """torch's answer where torch is installed; without torch (the serving extra only),
    whether onnxruntime has its CUDA provider and the machine an NVIDIA device."""
    try:
        import torch
    except ImportError:
        pass
    else:
        return torch.cuda.is_available()
    try:
        import onnxruntime
    except ImportError:
        return False
    return (
        "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        and Path("/dev/nvidia0").exists()
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))
    wrong = [i.nodeid for i in items if sum(1 for t in TIERS if i.get_closest_marker(t)) != 1]
    if wrong:
        raise pytest.UsageError(f"tests without exactly one tier of {TIERS}: {wrong[:10]}")
    config.stash[TIER_COUNTS] = {t: sum(1 for i in items if i.get_closest_marker(t)) for t in TIERS}
    # not item.keywords: a param id "gpu" matches too
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not cuda_available():  # torch is imported only when a gpu test is collected
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in gpu:
            item.add_marker(skip)


def pytest_report_collectionfinish(config, start_path, items):
    counts = config.stash.get(TIER_COUNTS, None)
    if counts:
        return "tiers (before -m): " + ", ".join(f"{t} {n}" for t, n in counts.items())


@pytest.fixture(scope="session")
def imagenet_photos(tmp_path_factory) -> Path:
    """foolbox's 20 bundled ImageNet photos as an ImageFolder (folders = class indices)."""
    from helpers import imagenet_photo_files  # skips without foolbox (outside CI)

    from protonmf.sample_data import imagenet_photo_folder

    imagenet_photo_files()
    root = imagenet_photo_folder(tmp_path_factory.mktemp("imagenet_photos"))
    assert len(list(root.glob("*/*.jpg"))) == 20
    return root


def needs_converter() -> None:
    """Skip where torch (the convert extra) is missing: a serving-only install. In CI it
    must be there (scripts/bootstrap.sh installs it), so there the import error fails."""
    if not os.environ.get("CI"):
        pytest.importorskip("torch", reason="converting a model needs the convert extra")


def _convert(out, *args):
    """`protonmf convert` in-process (the converter, and torch, are imported here)."""
    needs_converter()
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
    from protonmf.sample_data import lite0_checkpoint

    out = tmp_path_factory.mktemp("lite0") / "artifact"
    return _convert(
        out,
        "--model",
        "tf_efficientnet_lite0",
        "--checkpoint",
        lite0_checkpoint(),
        "--data",
        imagenet_photos,
        "-p",
        3,
    )


# --- the service engine over the Fashion artifacts (module scoped: tests may change them) --


@pytest.fixture(scope="module")
def core_all(fashion_artifact):
    """An engine (not started) over Fashion's default graph: every class's scores,
    contributions and maps (C ≤ 2k)."""
    from protonmf.service.engine.pipeline import Engine

    return Engine.from_artifact(fashion_artifact)


@pytest.fixture(scope="module")
def core_topk(fashion_topk_artifact):
    """An engine (not started) over the top-k graph: maps and terms of the k best classes,
    the rest from the pooled features."""
    from protonmf.service.engine.pipeline import Engine

    return Engine.from_artifact(fashion_topk_artifact)


@pytest.fixture
def make_engine(fashion_artifact):
    """``make_engine(env=None)``: a new engine (not started) over a new model of Fashion's
    default graph, its settings ``Settings.from_env(env or {})``."""
    from protonmf.service.engine.pipeline import Engine
    from protonmf.service.ops.settings import Settings

    def make(env: dict | None = None):
        return Engine.from_artifact(fashion_artifact, Settings.from_env(env or {}))

    return make


# --- deploy tier --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    """kind → a JSON-schema validator of the Prometheus Operator's CRD (unknown fields
    forbidden); ``helpers.crd_errors`` applies one."""
    import jsonschema
    from cloudcoil.models.prometheus_operator import v1
    from helpers import CRD_KINDS, strict_schema

    return {
        kind: jsonschema.Draft202012Validator(strict_schema(getattr(v1, kind)))
        for kind in CRD_KINDS
    }
