"""``protonmf export``: an artifact's graph written again in other head modes, without NMF.

The prototypes, coefficients and bias are the artifact's; the backbone is reloaded from
what the manifest records (and refused if its weights changed). The int8/fp16 variants
were derived from the old graph, so they are dropped: re-run ``protonmf variants``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

from protonmf.artifact import (
    kept_files,
    load_manifest,
    load_tensors,
    scratch,
    write_artifact,
)
from protonmf.artifact.manifest import Manifest
from protonmf.converter.exemplars import presence_filters
from protonmf.converter.export import export_onnx, graph_spec
from protonmf.converter.models import analyse_head, recorded_model
from protonmf.converter.protomodel import ProtoModel

__all__ = ["prototype_model", "reexport"]


def prototype_model(
    manifest: dict,
    tensors: dict,
    maps="auto",
    scores="auto",
    k: int | None = None,
    presence: bool = False,
) -> ProtoModel:
    """The artifact's prototype model on its original backbone, in the given head modes
    (k: the artifact's when None; presence: with Eq. 9's presence maps)."""
    info = Manifest.of(manifest)
    model = recorded_model(manifest)
    prep = info.preprocessing
    head = analyse_head(model, torch.randn(2, prep.channels, prep.height, prep.width))
    k = k or (info.graph and info.graph.k) or info.conversion.get("k") or 5
    return ProtoModel(
        model,
        head,
        torch.from_numpy(tensors["prototypes"]),
        torch.from_numpy(tensors["coefficients"]),
        maps=maps,
        k=k,
        scores=scores,
        presence_filters=tensors["presence_filters"] if presence else None,
    ).eval()


def reexport(
    artifact, out=None, maps="auto", scores="auto", k: int | None = None, presence: bool = False
) -> Path:
    """Write ``artifact`` (or a copy at ``out``) with its graph exported in these modes.
    An artifact of an older format is written as the current one (``pooled`` in every graph,
    presence filters computed from its prototypes); its exemplars, if any, are kept."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    tensors = load_tensors(artifact, manifest)
    if "presence_filters" not in tensors:  # before format 4
        tensors["presence_filters"] = presence_filters(tensors["prototypes"]).astype("float32")
    proto = prototype_model(manifest, tensors, maps, scores, k, presence)
    prep = Manifest.of(manifest).preprocessing
    input_shape = (prep.channels, prep.height, prep.width)
    manifest = dict(manifest)
    variants = manifest.pop("variants", None) or {}
    manifest["conversion"] = {
        **manifest["conversion"],
        "maps": maps,
        "scores": scores,
        "k": proto.k,
        "presence": presence,
        "reexported": _now(),
    }
    dropped = {v["file"] for v in variants.values()}
    extra = {n: f for n, f in kept_files(artifact, manifest).items() if n not in dropped}
    with scratch(out or artifact, "export") as tmp:
        onnx_path = export_onnx(proto, input_shape, Path(tmp) / "model.onnx")
        manifest["graph"] = graph_spec(proto, input_shape, tuple(manifest["feature_grid"]))
        return write_artifact(out or artifact, manifest, tensors, onnx_path, extra_files=extra)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
