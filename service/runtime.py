"""Run an artifact's ONNX graph with onnxruntime: no torch, provider checked, I/O named.

onnxruntime-gpu lists CUDA as *available* even on machines without a GPU and silently
falls back to CPU when CUDA fails, so the provider actually in use is read back from
``session.get_providers()`` and a request for CUDA that did not take is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protonmf.artifact import (
    MODEL_FILE,
    ArtifactError,
    Preprocessing,
    load_manifest,
    load_tensors,
    preprocess,
)

__all__ = [
    "Explainer",
    "ProviderError",
    "create_session",
    "cuda_options",
]


class ProviderError(RuntimeError):
    """The requested execution provider could not be used."""


CUDNN_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def cuda_options(tf32: bool = False, search: str = "HEURISTIC") -> dict[str, str]:
    """CUDA provider options (PROTONMF_CUDA_TF32, PROTONMF_CUDNN_SEARCH in the service).

    TF32 stays off unless asked for: onnxruntime enables it by default on Ampere and later,
    which rounds conv/matmul inputs to 10 mantissa bits and breaks the fp32 graph's
    exactness contract (logits equal to the black box's).

    cuDNN's convolution algorithm search is HEURISTIC by default: onnxruntime's default,
    EXHAUSTIVE, benchmarks every algorithm for each new input shape (a new batch size) —
    measured on an H100, batches took ~700 ms instead of ~6 ms under load.
    """
    search = search.upper()
    if search not in CUDNN_SEARCH:
        raise ValueError(f"cuDNN search must be one of {CUDNN_SEARCH}, got {search!r}")
    return {"use_tf32": "1" if tf32 else "0", "cudnn_conv_algo_search": search}


def create_session(model_path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                   spinning: bool = True, cuda: dict | None = None):  # fmt: skip
    """An InferenceSession on ``device`` ("cpu", "cuda" or "auto"), full graph optimisation.

    ``spinning=False``: idle intra-op threads sleep instead of busy-waiting for the next
    kernel, leaving the CPU to work beside the graph (the service's decoding and HTTP).
    ``cuda``: ``cuda_options`` keyword arguments (tf32, search).
    Returns (session, provider_in_use).
    """
    import onnxruntime as ort

    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    want_cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = [("CUDAExecutionProvider", cuda_options(**(cuda or {}))), "CPUExecutionProvider"] if want_cuda else [
        "CPUExecutionProvider"
    ]
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    in_use = session.get_providers()[0]
    if device == "cuda" and in_use != "CUDAExecutionProvider":
        raise ProviderError(
            f"CUDA was requested but onnxruntime runs on {in_use} "
            f"(available: {ort.get_available_providers()}); is there a GPU and CUDA runtime?"
        )
    return session, in_use


def check_graph(artifact_dir, manifest: dict, session) -> None:
    """The graph's input and outputs are the manifest's: names, and every fixed dimension
    (classes, p, k, grid, image size and channels). An edited manifest would otherwise
    load and answer with the wrong shapes or crash on the first request."""

    def fixed(shape) -> list:  # "N" / "batch" / None: symbolic
        return [d if isinstance(d, int) else None for d in shape]

    graph = manifest.get("graph") or {}
    inp = session.get_inputs()[0]
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    want_in = [None, prep.channels, prep.height, prep.width]
    if fixed(inp.shape) != want_in:
        raise ArtifactError(f"{artifact_dir}: the graph's input is {inp.shape}, the manifest's "
                            f"preprocessing implies [N, {prep.channels}, {prep.height}, "
                            f"{prep.width}]")  # fmt: skip
    got = {o.name: fixed(o.shape) for o in session.get_outputs()}
    want = {name: fixed(shape) for name, shape in graph.get("outputs", {}).items()}
    if list(got) != list(want):
        raise ArtifactError(f"{artifact_dir}: graph outputs {list(got)} != manifest {list(want)}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ArtifactError(f"{artifact_dir}: graph output {name!r} has shape {got[name]}, "
                                f"the manifest says {shape}")  # fmt: skip
    C, p = len(manifest["classes"]), manifest["p"]
    if "logits" in want and want["logits"][1:] != [C]:
        raise ArtifactError(f"{artifact_dir}: {C} classes in the manifest, the graph has "
                            f"{want['logits'][1:]} logits")  # fmt: skip
    per_proto = [s for n, s in want.items() if n in ("scores", "topk_scores")]
    if per_proto and per_proto[0][-1] != p:
        raise ArtifactError(f"{artifact_dir}: p = {p} in the manifest, the graph has "
                            f"{per_proto[0][-1]} prototypes per class")  # fmt: skip


@dataclass
class Explainer:
    """An artifact loaded for inference: manifest, prototype tensors and ONNX session."""

    manifest: dict
    tensors: dict
    session: object
    provider: str
    variant: str = "fp32"

    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, device: str = "cpu", threads=None,
             variant: str = "fp32", spinning: bool = True, cuda: dict | None = None):  # fmt: skip
        """``variant``: "fp32" (model.onnx, exact) or one listed in the manifest's variants."""
        artifact_dir = Path(artifact_dir)
        manifest = load_manifest(artifact_dir)
        if MODEL_FILE not in manifest["files"]:
            raise ArtifactError(f"{artifact_dir} has no {MODEL_FILE}: re-run `protonmf convert`")
        graph = MODEL_FILE
        if variant != "fp32":
            known = manifest.get("variants", {})
            if variant not in known:
                raise ArtifactError(f"{artifact_dir} has no {variant!r} graph (has: fp32"
                                    f"{''.join(', ' + k for k in known)}); see `protonmf variants`")
            graph = known[variant]["file"]
        tensors = load_tensors(artifact_dir, manifest)
        session, provider = create_session(artifact_dir / graph, device, threads, spinning, cuda)
        check_graph(artifact_dir, manifest, session)
        return cls(manifest, tensors, session, provider, variant)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def preprocess(self, images) -> np.ndarray:
        """PIL images → (N, c, h, w) float32 batch, as the manifest says."""
        spec = self.preprocessing
        return np.stack([preprocess(im, spec) for im in images])

    @property
    def output_shapes(self) -> dict[str, list]:
        """The outputs ``run`` returns, with their shapes ("N" first): the graph's, and
        ``bias`` (N, C) for an all-scores graph whose bias does not depend on the image
        (format 3 leaves that constant out of the graph: protomodel._image_bias)."""
        shapes = dict(self.manifest["graph"]["outputs"])
        if "scores" in shapes and "bias" not in shapes:
            shapes["bias"] = ["N", len(self.classes)]
        return shapes

    def run(self, batch: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
        """Run the graph on a preprocessed batch; outputs by name (``output_shapes``).

        ``outputs``: the names wanted (default: all). onnxruntime copies only those out of
        the device; the heavy ones (per-prototype maps) stay there when not asked for."""
        graph_outputs = self.manifest["graph"]["outputs"]
        names = list(graph_outputs) if outputs is None else [n for n in graph_outputs
                                                             if n in outputs]  # fmt: skip
        feed = {self.manifest["graph"]["input"]["name"]: np.ascontiguousarray(batch, np.float32)}
        out = dict(zip(names, self.session.run(names, feed), strict=True))
        if "scores" in out and "bias" not in out and "bias" not in graph_outputs:
            out["bias"] = np.broadcast_to(self.tensors["bias"], (len(batch), len(self.classes)))
        return out
