"""``protonmf export``: an artifact's graph written again in other head modes, without NMF.

The prototypes, coefficients and bias are the artifact's; the backbone is reloaded from
what the manifest records (and refused if its weights changed). The int8/fp16 variants
were derived from the old graph, so they are dropped: re-run ``protonmf variants``.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import torch

from protonmf.artifact import Preprocessing, load_manifest, load_tensors, write_artifact

from .export import export_onnx, graph_spec
from .models import analyse_head, recorded_model
from .protomodel import ProtoModel

__all__ = ["prototype_model", "reexport"]


def prototype_model(manifest: dict, tensors: dict, maps="auto", scores="auto",
                    k: int | None = None) -> ProtoModel:  # fmt: skip
    """The artifact's prototype model on its original backbone, in the given head modes
    (k: the artifact's when None)."""
    model = recorded_model(manifest)
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    head = analyse_head(model, torch.randn(2, prep.channels, prep.height, prep.width))
    k = k or manifest["graph"].get("k") or manifest["conversion"].get("k") or 5
    return ProtoModel(model, head, torch.from_numpy(tensors["prototypes"]),
                      torch.from_numpy(tensors["coefficients"]), maps=maps, k=k,
                      scores=scores).eval()  # fmt: skip


def reexport(artifact, out=None, maps="auto", scores="auto", k: int | None = None) -> Path:
    """Write ``artifact`` (or a copy at ``out``) with its graph exported in these modes."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    tensors = load_tensors(artifact, manifest)
    proto = prototype_model(manifest, tensors, maps, scores, k)
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    input_shape = (prep.channels, prep.height, prep.width)
    manifest = dict(manifest)
    manifest.pop("variants", None)
    manifest["conversion"] = {**manifest["conversion"], "maps": maps, "scores": scores,
                              "k": proto.k, "reexported": _now()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(proto, input_shape, Path(tmp) / "model.onnx")
        manifest["graph"] = graph_spec(proto, input_shape, tuple(manifest["feature_grid"]))
        return write_artifact(out or artifact, manifest, tensors, onnx_path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
