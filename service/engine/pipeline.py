"""The engine: decode → micro-batch → explain, transport-free, one per worker.

REST (service.py), gRPC (grpc/) and the Open Inference Protocol (oip/) are adapters over
one ``Engine``: they read their transport's request, call the engine and write its answer
(a JSON-able dict, PNG bytes, or graph outputs) in their transport's form. Every transport's
images go through the same three steps — ``decode`` (the decode threads or processes),
``infer`` (the batcher) and the explanation building — with the same spans and metrics;
no adapter re-implements one.

The pieces: ``Model`` (model.py: the artifact, its graph and the request checks),
``Explanations`` (explanations.py), ``Listings`` (listings.py), ``MicroBatcher``
(batching.py), ``DecodePool`` (decode/pool.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from protonmf.service.decode.pool import DecodePool
from protonmf.service.engine.batching import MicroBatcher
from protonmf.service.engine.explanations import Explanations
from protonmf.service.engine.listings import Listings
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import CLASSIFY_TOP_K, OVERLAY_MAP_KIND, ExplainOptions
from protonmf.service.ops.errors import InvalidInput, NotReady
from protonmf.service.ops.metrics import METRICS
from protonmf.service.ops.observability import note, span
from protonmf.service.ops.settings import Settings

__all__ = ["Engine"]


class Engine:
    """One worker's serving pipeline over one loaded artifact."""

    def __init__(self, model: Model, settings: Settings):
        self.model = model
        self.explanations = Explanations(model)
        self.listings = Listings(model, self.explanations)
        self.settings = settings
        self.pool = ThreadPoolExecutor(
            settings.decode_thread_count(), thread_name_prefix="protonmf-decode"
        )
        # PROTONMF_DECODE_PROCESSES > 0: images decode in processes of this worker's own
        # (started by start()); rendering and listings stay on the threads
        self.decoder = (
            DecodePool(settings.decode_processes, model.limits, model.spec)
            if settings.decode_processes > 0
            else None
        )
        self.batcher = MicroBatcher(
            model.infer,
            model.per_image,
            max_batch=settings.max_batch_size,
            wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            max_latency_s=settings.max_latency_ms / 1000,
            buckets=settings.buckets(model.graph.provider),
        )
        self.ready = False

    @classmethod
    def from_artifact(cls, artifact, settings: Settings | None = None, **load) -> Engine:
        """An engine over ``artifact`` outside a server (notebooks, tests, benchmarks):
        ``Model.load(artifact, **load)``, default settings, nothing started or warmed."""
        return cls(Model.load(artifact, **load), settings or Settings())

    @classmethod
    def load(cls, settings: Settings, warm: bool = True) -> Engine:
        """Load the artifact and run the graph once per warm-up size (before ready).
        ``warm=False``: load and check only (``protonmf serve``'s pre-flight)."""
        if settings.artifact is None:
            raise NotReady("set PROTONMF_ARTIFACT to an artifact directory (protonmf convert)")
        # CUDA graphs run on CUDA only (GraphSession.load refuses any other provider), so
        # their buckets are CUDA's: the sizes the batcher pads to once the provider is known
        graph_buckets = settings.buckets("CUDAExecutionProvider") if settings.cuda_graphs else None
        model = Model.load(
            settings.artifact,
            device=settings.device,
            threads=settings.ort_threads_per_worker(),
            limits=settings.limits(),
            variant=settings.variant,
            spinning=settings.ort_spinning,
            cuda={"tf32": settings.cuda_tf32, "search": settings.cudnn_search},
            io_binding=settings.io_binding,
            cuda_graphs=settings.cuda_graphs,
            buckets=graph_buckets,
        )
        if settings.jpeg_decoder == "nvimgcodec":
            from protonmf.service.decode.gpu import GpuJpegDecoder  # ProviderError without it

            model.jpeg_decoder = GpuJpegDecoder().decode
        engine = cls(model, settings)
        if warm:
            model.warm_up(settings.max_batch_size, engine.batcher.buckets)
        return engine

    async def start(self) -> None:
        if self.decoder is not None:  # every decode process started and warm before ready
            await self.decoder.start()
        self.batcher.start()
        self.ready = True

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking requests; images already queued get ``grace_s`` to finish."""
        self.ready = False
        await self.batcher.stop(grace_s)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.decoder is not None:
            self.decoder.close()

    # --- the shared steps ----------------------------------------------------------------

    async def in_pool(self, func, *args):
        """CPU work (decoding, rendering, listings) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    async def decode(self, blobs: list[bytes]) -> list[np.ndarray]:
        """Encoded images → the crops the model reads, in parallel (threads or processes)."""
        self.model.check_request(len(blobs))
        with span("decode", images=len(blobs)):
            if self.decoder is not None:
                crops = await asyncio.gather(*(self.decoder.prepare(b) for b in blobs))
            else:
                crops = await asyncio.gather(*(self.in_pool(self.model.prepare, b) for b in blobs))
        return list(crops)

    async def infer(self, crops: list[np.ndarray], outputs: frozenset[str]) -> list[dict]:
        """Crops → each image's graph outputs (``outputs`` only), through the batcher."""
        self.model.check_request(len(crops))
        METRICS.images_per_request.observe(len(crops))
        note(images=len(crops))
        with span("infer", images=len(crops)):  # queue + the batch's run
            return await self.batcher.submit(list(crops), outputs)

    async def run(
        self, blobs: list[bytes], maps: str | None = None
    ) -> tuple[list[np.ndarray], list[dict]]:
        """Encoded images → their crops and graph outputs; the maps of kind ``maps`` only if
        asked (they are most of the graph's output)."""
        crops = await self.decode(blobs)
        return crops, await self.infer(crops, self.model.outputs_for(maps))

    def explain_outputs(self, outs: list[dict], options: ExplainOptions) -> list[dict]:
        """Each image's explanation (the /explain entry) from its graph outputs."""
        with span("explain", top_k=options.top_k, heatmaps=options.heatmaps):
            return [self.explanations.explanation(o, options) for o in outs]

    # --- one method per endpoint -----------------------------------------------------------

    async def classify(self, blobs: list[bytes], top_k: int = CLASSIFY_TOP_K) -> dict:
        self.model.check_request(len(blobs), ExplainOptions(top_k=top_k, heatmaps=False))
        _, outs = await self.run(blobs)
        with span("explain"):
            return {"predictions": [self.explanations.classification(o, top_k) for o in outs]}

    async def explain(self, blobs: list[bytes], options: ExplainOptions) -> dict:
        self.model.check_request(len(blobs), options)
        _, outs = await self.run(blobs, options.map_kind if options.heatmaps else None)
        return {
            "explanations": self.explain_outputs(outs, options),
            "provider": self.model.graph.provider,
        }

    async def overlay(
        self, blobs: list[bytes], rank: int = 0, map_kind: str = OVERLAY_MAP_KIND
    ) -> bytes:
        """PNG of the rank-th class's contribution (or similarity/presence) maps."""
        if len(blobs) != 1:
            raise InvalidInput(f"overlay takes exactly one image, got {len(blobs)}", "one_image")
        self.model.check_maps(1, map_kind)  # a graph without maps (of that kind): 422
        if rank >= self.model.map_classes:
            raise InvalidInput(
                f"rank must be < {self.model.map_classes} (the classes with maps)", "rank"
            )
        crops, outs = await self.run(blobs, map_kind)
        return await self.in_pool(self.listings.overlay, crops[0], outs[0], rank, map_kind)

    async def prototypes(self, classes: list[str | int] | None = None) -> dict:
        return await self.in_pool(self.listings.prototypes, classes)

    async def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = "augmented"
    ) -> bytes:
        return await self.in_pool(self.listings.prototype_image, class_name, prototype, kind)

    def model_info(self) -> dict:
        return self.listings.model_info()
