"""The artifact loaded for serving: its graph, what a request may ask of it (checked before
any work), and the graph's run on one merged batch.

The engine (pipeline.py) calls ``prepare`` per image in its decode threads, ``infer`` once
per merged batch (batching.py) and ``per_image`` back into images; explanations.py builds
the answers from those outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from protonmf.artifact import normalize
from protonmf.artifact.exemplars import Exemplars, load_exemplars
from protonmf.graph import GraphSession
from protonmf.service.decode.images import Limits
from protonmf.service.decode.pool import decode_crop
from protonmf.service.engine.options import MAP_KINDS, ExplainOptions
from protonmf.service.ops.errors import PayloadTooLarge, Unprocessable
from protonmf.service.ops.metrics import METRICS, stage

__all__ = ["MAP_OUTPUTS", "Model"]

# the graph's per-prototype maps: by far its largest outputs, fetched only when drawn
MAP_OUTPUTS = frozenset({"maps", "topk_maps", "presence", "topk_presence"})


class Model:
    """An artifact ready to serve: graph session, limits, preprocessing, request checks."""

    def __init__(
        self, graph: GraphSession, limits: Limits | None = None, exemplars: Exemplars | None = None
    ):
        self.graph = graph
        self.exemplars = exemplars
        # PROTONMF_JPEG_DECODER=nvimgcodec: JPEG pixels from the GPU (decode/gpu.py)
        self.jpeg_decoder = None
        self.limits = limits or Limits()
        self.manifest = graph.manifest  # the dict, as written (model_info shows parts of it)
        m = self.info = graph.info  # typed (validated once, by GraphSession)
        self.classes: list[str] = m.classes
        self.descriptions: list[str] | None = m.class_descriptions
        self.spec = graph.preprocessing
        self.p: int = m.p
        self.grid = tuple(m.feature_grid)
        self.graph_k: int = m.graph.k or 0
        self.scores_mode: str = m.graph.scores
        self.maps_mode: str = m.graph.maps
        # how many of the top classes have similarity maps in the graph's outputs
        self.map_classes = {"all": len(self.classes), "topk": self.graph_k}.get(self.maps_mode, 0)
        self.tensors = graph.tensors
        self.coefficients = graph.tensors["coefficients"]
        self.has_pooled = "pooled" in graph.output_shapes
        self.has_presence = m.graph.presence and bool(
            {"presence", "topk_presence"} & set(graph.output_shapes)
        )
        self.folds: list[str] = m.folds
        self.norm_eps = m.layer_norm_eps
        self._index = {name: i for i, name in enumerate(self.classes)}
        self._shapes = {name: shape[1:] for name, shape in graph.output_shapes.items()}
        self.crop_shape = (self.spec.height, self.spec.width) + (
            () if self.spec.color_mode == "L" else (3,)
        )

    @classmethod
    def load(cls, artifact: str | os.PathLike, limits: Limits | None = None, **graph) -> Model:
        """``graph``: ``GraphSession.load``'s options (device, threads, variant, spinning,
        cuda, io_binding, cuda_graphs, buckets)."""
        graph = GraphSession.load(Path(artifact), **graph)
        # exemplars are read once here (thumbnails and maps: ~1 MB for Fashion's 10 classes)
        return cls(graph, limits, load_exemplars(artifact, graph.manifest))

    # --- per image, before batching; one merged batch ------------------------------------

    def prepare(self, data: bytes) -> np.ndarray:
        """Untrusted bytes → uint8 crop the model reads. Raises InvalidInput and subclasses.
        The decode processes (decode/pool.py) run the same ``decode_crop``."""
        with stage("decode"):
            return decode_crop(data, self.limits, self.spec, self.jpeg_decoder)

    def warm_up(self, max_batch: int, sizes: list[int] | None = None) -> list[int]:
        """Run the graph on blank crops before the service says ready; returns the sizes run.

        ``sizes``: the batch buckets when batches are padded to them (every size a batch
        can have). Else on CPU the largest batch and a single image (allocation, planning);
        on CUDA every size from max_batch down to 1: the CUDA provider prepares cuDNN
        convolutions per input shape (~5 ms per conv layer even with the heuristic search)
        — measured on an H100, a batch of a size not seen before took 140–380 ms against
        ~6 ms once seen. With CUDA graphs (``sizes`` are then the buckets) each size runs
        ``graph.warm_up_runs`` times, so its graph is captured before ready.
        """
        cuda = self.graph.provider == "CUDAExecutionProvider"
        sizes = sizes or (self.graph.graphs.sizes if self.graph.graphs else None)
        if sizes:
            sizes = sorted(set(sizes), reverse=True)
        else:
            sizes = list(range(max_batch, 0, -1)) if cuda else sorted({max_batch, 1}, reverse=True)
        for n in sizes:
            for _ in range(self.graph.warm_up_runs):
                self.graph.run(normalize(np.zeros((n, *self.crop_shape), np.uint8), self.spec))
        return sizes

    # --- one merged batch ---------------------------------------------------------------

    def infer(self, crops: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
        """uint8 crops (N, ...) → graph outputs by name (``outputs``: those only), one
        onnxruntime run."""
        with stage("infer"):
            METRICS.batch_size.observe(len(crops))
            return self.graph.run(normalize(crops, self.spec), outputs)

    def outputs_for(self, maps: str | None = None) -> frozenset[str]:
        """The graph outputs an answer needs: every output but the maps, plus the maps of
        ``maps`` (a map kind) when the answer draws or lists them."""
        names = set(self._shapes)
        wanted = names - MAP_OUTPUTS
        if maps == "presence":
            wanted |= names & {"presence", "topk_presence"}
        elif maps is not None:
            wanted |= names & {"maps", "topk_maps"}
        return frozenset(wanted)

    @staticmethod
    def per_image(outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One merged batch's outputs → each image's (views, no copies)."""
        n = len(outputs["logits"])
        return [{name: value[i] for name, value in outputs.items()} for i in range(n)]

    # --- what a request may ask -----------------------------------------------------------

    def check_request(self, n_images: int, options: ExplainOptions | None = None) -> None:
        if n_images < 1:
            raise Unprocessable("the request has no images", "no_images")
        if n_images > self.limits.max_images:
            raise PayloadTooLarge(
                f"{n_images} images in one request; the limit is {self.limits.max_images}",
                "too_many_images",
            )
        if options is None:
            return
        if not 1 <= options.top_k <= len(self.classes):
            raise Unprocessable(
                f"top_k must be in 1..{len(self.classes)}, got {options.top_k}",
                "top_k_out_of_range",
            )
        if options.map_kind not in MAP_KINDS:
            raise Unprocessable(
                f"map_kind must be one of {list(MAP_KINDS)}, got {options.map_kind!r}",
                "unknown_map_kind",
            )
        if options.heatmaps:
            self.check_maps(options.top_k, options.map_kind)
        if not 0 <= options.box_percentile <= 100:
            raise Unprocessable(f"box_percentile must be in 0..100, got {options.box_percentile}")
        if len(options.interventions) > self.limits.max_interventions:
            raise Unprocessable(
                f"{len(options.interventions)} interventions; the limit is "
                f"{self.limits.max_interventions}",
                "too_many_interventions",
            )
        self.resolve(options.interventions)

    def check_maps(self, top_k: int, kind: str = "similarity") -> None:
        """Unprocessable unless the graph has maps (of ``kind``) for the ``top_k`` best classes."""
        if self.map_classes == 0:
            raise Unprocessable(
                "this artifact's graph has no similarity maps (converted with "
                "--maps none); ask with heatmaps=false",
                "no_maps",
            )
        if top_k > self.map_classes:
            raise Unprocessable(
                f"heatmaps are computed for the top {self.map_classes} classes; ask for "
                f"top_k <= {self.map_classes} or heatmaps=false",
                "top_k_exceeds_graph",
            )
        if kind == "presence" and not self.has_presence:
            raise Unprocessable(
                "this artifact's graph has no presence maps (export it with --presence)",
                "no_presence_maps",
            )

    def class_index(self, name: str | int, context: str = "") -> int:
        """A class name, index or decimal index string → index; Unprocessable if unknown."""
        c = name
        if isinstance(c, str) and c in self._index:
            c = self._index[c]
        elif isinstance(c, str) and c.isascii() and c.isdigit() and len(c) <= 9:
            # ASCII digits only: str.isdigit alone takes "²" and "①" (int() refuses them)
            # and "٣" (int() reads 3); nine digits keep int() far from its 4,300-digit limit
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(self.classes):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "…"
            raise Unprocessable(f"unknown class {shown}{context}", "unknown_class")
        return c

    def check_prototype(self, c: int, prototype: int) -> None:
        if not 0 <= prototype < self.p:
            raise Unprocessable(
                f"class {self.classes[c]!r} has prototypes 0..{self.p - 1}, got {prototype}",
                "unknown_prototype",
            )

    def resolve(self, interventions) -> list[tuple[int, int]]:
        """(class name or index, prototype) pairs → index pairs; Unprocessable if unknown."""
        pairs = []
        for iv in interventions:
            c = self.class_index(iv.class_name, " in intervention")
            self.check_prototype(c, iv.prototype)
            pairs.append((c, iv.prototype))
        return pairs
