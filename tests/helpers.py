"""Plain helpers shared by test modules (no fixtures, no hooks: those are in conftest.py).
Servers and processes: served.py; headless Chromium: browser.py; the hostile corpus:
hostile_corpus.py. Test modules never import each other: what two of them share is here.

Nothing here imports torch, timm or the converter at import time (conftest imports this
module, and the unit tier runs where only the serving extra is installed)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MODEL = REPO / "models" / "fashion-resnet"
FASHION_DATA = REPO / "data" / "fashion-mnist"
MONITORING = REPO / "deploy" / "monitoring"
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# Not the bare kind: conftest skips every test with a "gpu" keyword where CUDA is missing.
KIND_IDS = ["cpu-kind", "gpu-kind"]
# Oldest and newest minor a cluster is likely to run; both ship in kubernetes-validate.
K8S_VERSIONS = ("1.30.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def run_cli(*args, capsys=None):
    """Run ``protonmf`` in-process; returns (exit code, stdout)."""
    from protonmf.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr().out if capsys else ""
    return code, out


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def run_images(core, blobs: list[bytes]) -> list[dict]:
    """Decode, one graph run, per-image outputs: the engine's path without its batcher.
    ``core``: an Engine or its Model."""
    core = getattr(core, "model", core)
    import numpy as np

    return core.per_image(core.infer(np.stack([core.prepare(b) for b in blobs])))


def proto_model_from_artifact(artifact: Path, maps="none", scores="topk"):
    """(backbone, prototype model, preprocessing, manifest): the prototype model rebuilt
    from the artifact's saved tensors + the original model (torch: the convert extra)."""
    from protonmf.artifact import Preprocessing, load_tensors
    from protonmf.converter.reexport import prototype_model

    m = manifest_of(artifact)
    proto = prototype_model(m, load_tensors(artifact, m), maps, scores)
    return proto.backbone, proto, Preprocessing.from_dict(m["preprocessing"]), m


# --- images ----------------------------------------------------------------------------


def imagenet_photo_files() -> list[Path]:
    """foolbox's 20 bundled ImageNet photos (``protonmf.sample_data``). The calling test
    skips where foolbox is missing (a serving-only install; scripts/bootstrap.sh installs
    it), except in CI, where it must be there."""
    from protonmf import sample_data

    try:
        return sample_data.imagenet_photo_files()
    except ModuleNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def sample_images() -> list[bytes]:
    """32 Fashion test PNGs: the first 8 of bag, coat, sneaker and trouser."""
    files = []
    for cls in ("bag", "coat", "sneaker", "trouser"):
        files += sorted((FASHION_DATA / "test" / cls).glob("*.png"))[:8]
    return [f.read_bytes() for f in files]


def png_bytes(image, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **kw)
    return out.getvalue()


def jpeg_bytes(image, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, **kw)
    return out.getvalue()


def half_jpeg() -> bytes:
    """The first half of a 64×64 grey JPEG: a truncated file."""
    from PIL import Image

    blob = jpeg_bytes(Image.new("RGB", (64, 64), "gray"))
    return blob[: len(blob) // 2]


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header declares 10^10 pixels."""
    from PIL import Image

    data = png_bytes(Image.new("L", (8, 8)))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


def animated(fmt: str) -> bytes:
    """Two frames (red, blue) as an animated ``fmt`` ("GIF", "PNG")."""
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:])
    return out.getvalue()


# --- metrics -----------------------------------------------------------------------------


def histogram_count(text: str, name: str, le: str | None = None) -> float:
    """Sum of a metric's samples over all label sets (and workers), optionally one bucket."""
    total = 0.0
    for line in text.splitlines():
        metric = re.split(r"[{ ]", line, maxsplit=1)[0]
        if metric == name and (le is None or f'le="{le}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- external tools (deploy tier) ------------------------------------------------------


def tool(name: str) -> str:
    """A tool from .venv/bin (preferred: pinned by the install script) or PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if not found:
        pytest.fail(f"{name} not found: run scripts/install_deploy_tools.sh")
    return found


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured as text, 300 s at most."""
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs
    )


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, path)


def strict_schema(model) -> dict:
    """JSON schema of a cloudcoil (pydantic) model, with unknown fields forbidden like
    `kubectl apply --validate=strict` does for CRDs with a structural schema."""
    schema = model.model_json_schema(by_alias=True)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_errors(validators, obj) -> list[str]:
    """What the ``crd_validators`` fixture's validator of ``obj``'s kind finds wrong."""
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validators[obj["kind"]].iter_errors(obj)
    ]


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> dict[str, list[str]]:
    """Panel title -> its PromQL, Grafana variables replaced by what they expand to."""
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$namespace": ".*", "$instance": ".*"}
    out = {}
    for panel in dashboard()["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        for var, value in subst.items():
            exprs = [e.replace(var, value) for e in exprs]
        if exprs:
            out[panel["title"]] = exprs
    return out


def assert_same_body(rest, rpc, path: str = "", same_types: bool = False) -> None:
    """Two answer bodies (REST's and gRPC's read back) equal; heatmap values up to float32,
    the precision gRPC sends them in. ``same_types``: also the same Python types."""
    if isinstance(rest, dict):
        assert rest.keys() == rpc.keys(), path
        for k in rest:
            assert_same_body(rest[k], rpc[k], f"{path}.{k}", same_types)
    elif isinstance(rest, list):
        assert len(rest) == len(rpc), path
        for i, (a, b) in enumerate(zip(rest, rpc, strict=True)):
            assert_same_body(a, b, f"{path}[{i}]", same_types)
    elif isinstance(rest, float) and ".values" in path:
        assert rpc == pytest.approx(rest, rel=1e-6, abs=1e-6), path
    else:
        assert rest == rpc and (not same_types or type(rest) is type(rpc)), path


def hostile_corpus():
    """The module tests/hostile_corpus.py (``import hostile_corpus`` does the same)."""
    import hostile_corpus

    return hostile_corpus


def stub_core(spec, limits=None):
    """A service Model without a graph, Fashion's manifest layout: enough for ``prepare``
    (decoding, limits) and the checks that need no graph."""
    from types import SimpleNamespace

    import numpy as np

    from protonmf.artifact import FORMAT_VERSION
    from protonmf.artifact.manifest import Manifest
    from protonmf.service.engine.model import Model

    classes = [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "boot",
    ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {},
        "classes": classes,
        "p": 3,
        "feature_grid": [7, 7],
        "graph": {"maps": "all", "scores": "all"},
        "diagnostics": {"per_class": [{"fold": "sum"} for _ in classes]},
    }
    explainer = SimpleNamespace(
        manifest=manifest,
        info=Manifest.of(manifest),
        preprocessing=spec,
        output_shapes={},
        provider="CPUExecutionProvider",
        tensors={"coefficients": np.ones((10, 3), np.float32)},
    )
    return Model(explainer, limits)


def memory_exporter():
    """An in-memory span exporter on this process's tracer provider (set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
