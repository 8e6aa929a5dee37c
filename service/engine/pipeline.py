"""The transport-free data plane: decode pool → micro-batcher → explanation building.

REST (service.py) and gRPC (grpc_api.py) are adapters over one ``DataPlane`` per worker:
they read their transport's request, call one method here and write its answer (a JSON-able
dict, or PNG bytes) in their transport's form. Both transports' images meet in the same
batcher and count in the same metrics; neither re-implements a step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from protonmf.service.engine.batching import MicroBatcher
from protonmf.service.engine.core import Core, ExplainOptions
from protonmf.service.decode.pool import DecodePool
from protonmf.service.ops.errors import InvalidInput, NotReady
from protonmf.service.ops.metrics import METRICS
from protonmf.service.ops.observability import note, span
from protonmf.service.ops.settings import Settings

__all__ = ["DataPlane"]


class DataPlane:
    """One worker's serving pipeline over one loaded artifact."""

    def __init__(self, core: Core, settings: Settings):
        self.core = core
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.decode_thread_count(),
                                       thread_name_prefix="protonmf-decode")  # fmt: skip
        # PROTONMF_DECODE_PROCESSES > 0: images decode in processes of this worker's own
        # (started by start()); rendering and listings stay on the threads
        self.decoder = (DecodePool(settings.decode_processes, core.limits, core.spec)
                        if settings.decode_processes > 0 else None)  # fmt: skip
        self.batcher = MicroBatcher(
            core.infer, core.per_image, max_batch=settings.max_batch_size,
            wait_s=settings.batch_wait_ms / 1000, max_queue=settings.max_queue,
            max_latency_s=settings.max_latency_ms / 1000,
            buckets=settings.buckets(core.explainer.provider),
        )  # fmt: skip
        self.ready = False

    @classmethod
    def load(cls, settings: Settings, warm: bool = True) -> DataPlane:
        """Load the artifact and run the graph once per warm-up size (before ready).
        ``warm=False``: load and check only (``protonmf serve``'s pre-flight)."""
        if settings.artifact is None:
            raise NotReady("set PROTONMF_ARTIFACT to an artifact directory (protonmf convert)")
        # CUDA graphs run on CUDA only (GraphSession.load refuses any other provider), so their
        # buckets are CUDA's: the same sizes the batcher pads to once the provider is known
        graph_buckets = settings.buckets("CUDAExecutionProvider") if settings.cuda_graphs else None
        core = Core.load(settings.artifact, device=settings.device,
                         threads=settings.ort_threads_per_worker(), limits=settings.limits(),
                         variant=settings.variant, spinning=settings.ort_spinning,
                         cuda={"tf32": settings.cuda_tf32, "search": settings.cudnn_search},
                         io_binding=settings.io_binding, cuda_graphs=settings.cuda_graphs,
                         buckets=graph_buckets)  # fmt: skip
        if settings.jpeg_decoder == "nvimgcodec":
            from protonmf.service.decode.gpu import GpuJpegDecoder  # ProviderError without nvImageCodec or GPU

            core.jpeg_decoder = GpuJpegDecoder().decode
        plane = cls(core, settings)
        if warm:
            core.warm_up(settings.max_batch_size, plane.batcher.buckets)
        return plane

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

    async def run(self, blobs: list[bytes], maps: str | None = None
                  ) -> tuple[list[np.ndarray], list[dict]]:  # fmt: skip
        """Encoded images → their crops and graph outputs (decoded in parallel, batched);
        the maps of kind ``maps`` only if asked (they are most of the graph's output)."""
        self.core.check_request(len(blobs))
        METRICS.images_per_request.observe(len(blobs))
        note(images=len(blobs))
        with span("decode", images=len(blobs)):
            if self.decoder is not None:
                crops = await asyncio.gather(*(self.decoder.prepare(b) for b in blobs))
            else:
                crops = await asyncio.gather(*(self.in_pool(self.core.prepare, b) for b in blobs))
        with span("infer", images=len(blobs)):  # queue + the batch's run
            outs = await self.batcher.submit(list(crops), self.core.outputs_for(maps))
        return crops, outs

    # --- one method per endpoint -----------------------------------------------------------

    async def classify(self, blobs: list[bytes], top_k: int = 5) -> dict:
        self.core.check_request(len(blobs), ExplainOptions(top_k=top_k, heatmaps=False))
        _, outs = await self.run(blobs)
        with span("explain"):
            return {"predictions": [self.core.classification(o, top_k) for o in outs]}

    async def explain(self, blobs: list[bytes], options: ExplainOptions) -> dict:
        self.core.check_request(len(blobs), options)
        _, outs = await self.run(blobs, options.map_kind if options.heatmaps else None)
        with span("explain", top_k=options.top_k, heatmaps=options.heatmaps):
            return {"explanations": [self.core.explanation(o, options) for o in outs],
                    "provider": self.core.explainer.provider}  # fmt: skip

    async def overlay(self, blobs: list[bytes], rank: int = 0,
                      map_kind: str = "contribution") -> bytes:  # fmt: skip
        """PNG of the rank-th class's contribution (or similarity/presence) maps."""
        if len(blobs) != 1:
            raise InvalidInput(f"overlay takes exactly one image, got {len(blobs)}", "one_image")
        self.core.check_maps(1, map_kind)  # a graph without maps (of that kind): 422
        if rank >= self.core.map_classes:
            raise InvalidInput(f"rank must be < {self.core.map_classes} (the classes with "
                               "maps)", "rank")  # fmt: skip
        crops, outs = await self.run(blobs, map_kind)
        return await self.in_pool(self.core.overlay, crops[0], outs[0], rank, map_kind)

    async def prototypes(self, classes: list[str | int] | None = None) -> dict:
        return await self.in_pool(self.core.prototypes, classes)

    async def prototype_image(self, class_name: str | int, prototype: int,
                              kind: str = "augmented") -> bytes:  # fmt: skip
        return await self.in_pool(self.core.prototype_image, class_name, prototype, kind)

    def model_info(self) -> dict:
        return self.core.model_info()
