"""BentoML adapter: REST endpoints over the core, with adaptive batching in the middle.

    POST /classify   images → top-k classes with probabilities
    POST /explain    images → per top-k class: prototypes, contributions, heatmaps;
                     optional test-time intervention (counterfactual logits)
    POST /overlay    one image → PNG of a class's contribution maps over it (red for,
                     blue against, one scale), with the NMF/residual split in the legend
    POST /model      classes, p, coefficients, artifact identity, provider in use
    POST /prototypes every prototype: coefficient, fold weight, exemplars; per class the
                     share of the class vector the NMF prototypes carry
    POST /prototype_image  one prototype's exemplars with their presence maps, as a PNG
    POST /infer      the batchable step (uint8 crops in, packed outputs out); the public
                     endpoints (and gRPC) reach its adaptive batcher in-process, so
                     concurrent requests merge into one onnxruntime run

Images come as multipart files (``images``) or base64 strings in JSON (``images_base64``).
Configuration (environment): PROTONMF_ARTIFACT (required), PROTONMF_DEVICE (cpu|cuda|auto), PROTONMF_VARIANT,
PROTONMF_ORT_THREADS, PROTONMF_DECODE_THREADS, PROTONMF_MAX_BATCH_SIZE,
PROTONMF_MAX_LATENCY_MS, PROTONMF_MAX_CONCURRENCY, PROTONMF_WORKERS, PROTONMF_ORT_SPINNING, PROTONMF_CUDA_TF32, PROTONMF_CUDNN_SEARCH,
PROTONMF_BATCH_PATH (in_process | http), the gRPC settings of ``grpc_api.GrpcConfig`` and
the limits of ``imaging.Limits``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import gc
import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
import orjson
from bentoml.exceptions import BentoMLException
from PIL import Image
from pydantic import Field
from starlette.responses import Response

from . import bentoml_fixes
from .core import Core, ExplainOptions
from .errors import InvalidInput, Overloaded, ServiceError
from .grpc_api import GrpcConfig, GrpcServer
from .imaging import Limits
from .metrics import METRICS
from .schemas import InterventionIn, PrototypeImageIn
from .webui import app as ui_app

MAX_BATCH_SIZE = int(os.environ.get("PROTONMF_MAX_BATCH_SIZE", "32"))
MAX_LATENCY_MS = int(os.environ.get("PROTONMF_MAX_LATENCY_MS", "10000"))
# Public requests in flight per worker (beyond: 429). With the HTTP self-call fallback each
# request holds two slots (its own and its call to ``infer``).
MAX_CONCURRENCY = int(os.environ.get("PROTONMF_MAX_CONCURRENCY", "256"))
log = logging.getLogger("protonmf.service")
bentoml_fixes.apply()


def _json(body: dict) -> Response:
    """A JSON response encoded once by orjson. Returning a dict made BentoML rebuild the
    output schema, run pydantic's model_dump twice and json.dumps per response: ~2 ms of
    the event loop per /explain image (profiled, 2 vCPUs). NaN/Inf become null, as before."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")  # fmt: skip


def _error_class(status: int) -> type[BentoMLException]:
    return type(f"HTTP{status}", (BentoMLException,), {"error_code": HTTPStatus(status)})


_HTTP_ERRORS = {s: _error_class(s) for s in (400, 413, 415, 422, 429, 500, 503)}


def _http_error(e: ServiceError) -> BentoMLException:
    METRICS.rejected.labels(reason=e.reason).inc()
    return _HTTP_ERRORS.get(e.status, _HTTP_ERRORS[500])(f"{e.message} [{e.reason}]")


def _maps_errors(endpoint):
    """Typed core errors → their HTTP status, once for every endpoint."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except ServiceError as e:
            raise _http_error(e) from e

    return wrapper


IMAGES = Field(default_factory=list, description="image files (multipart), JPEG/PNG/WebP")
IMAGES_B64 = Field(default_factory=list, description="base64-encoded images (JSON requests)",
                   examples=[["iVBORw0KGgo..."]])  # fmt: skip


WORKERS = int(os.environ.get("PROTONMF_WORKERS", "1"))


def default_ort_threads(workers: int = WORKERS) -> int | None:
    """onnxruntime threads per worker when PROTONMF_ORT_THREADS is unset. One worker:
    onnxruntime's own choice (None). Several: this process's CPUs shared out between them,
    since onnxruntime alone would take every core in every worker. On 2 vCPUs, 2 workers ×
    1 thread served 1.23× the images/s of 1 worker × 2 threads, and 2 × 2 0.97× (A/B runs,
    benchmarks/bench_env_ab.py)."""
    if workers <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers)


@bentoml.asgi_app(ui_app, path="/ui")  # the explanation viewer (service/webui.py)
@bentoml.service(
    name="protonmf",
    workers=WORKERS,
    traffic={"timeout": 60, "max_concurrency": MAX_CONCURRENCY},
)
class ProtoNMFService:
    """Serves one ProtoNMF artifact; every prediction comes with its explanation."""

    def __init__(self) -> None:
        artifact = os.environ.get("PROTONMF_ARTIFACT")
        if not artifact:
            raise RuntimeError("set PROTONMF_ARTIFACT to an artifact directory (protonmf convert)")
        threads = os.environ.get("PROTONMF_ORT_THREADS")
        self.core = Core.load(
            artifact,
            device=os.environ.get("PROTONMF_DEVICE", "cpu"),
            threads=int(threads) if threads else default_ort_threads(),
            limits=Limits.from_env(),
            variant=os.environ.get("PROTONMF_VARIANT", "fp32"),
            # Off by default here: decoding and HTTP share the cores with onnxruntime (A/B on
            # 2 vCPUs, 32 clients: 1.07x img/s, 13% less server CPU per image).
            spinning=os.environ.get("PROTONMF_ORT_SPINNING", "0") == "1",
        )
        decode_threads = int(os.environ.get("PROTONMF_DECODE_THREADS", os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="protonmf-decode")
        # Warm-up before /readyz: allocation and planning (and, on CUDA, every batch size).
        self.core.warm_up(MAX_BATCH_SIZE)
        # Everything alive now (modules, the artifact, BentoML's app) lives as long as the
        # worker: out of the collector's sight, full collections only walk per-request garbage.
        gc.freeze()
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    # --- start-up: the batcher's in-process entry, the gRPC twin (service/grpc_api.py) ---

    @bentoml.on_startup
    async def start(self) -> None:
        if os.environ.get("PROTONMF_BATCH_PATH", "in_process") != "http":
            self._find_batcher()  # here: the hook's caller owns the batchers
        METRICS.batching_in_process.set(1 if self._batcher else 0)
        limits = self.core.limits
        config = GrpcConfig.from_env(limits.max_bytes * limits.max_images + (1 << 20))
        self.grpc = GrpcServer(self, config) if config.port > 0 else None
        if self.grpc:
            await self.grpc.start()
            self._grpc_warmup = asyncio.create_task(self._grpc_when_batching_works())

    async def _grpc_when_batching_works(self, attempts: int = 120) -> None:
        """Health says SERVING once an image has gone through the batched path gRPC uses.
        (BentoML attaches ``to_async`` after the start-up hooks; HTTP may not listen yet.)"""
        import aiohttp

        crop = np.zeros(self.core.crop_shape, np.uint8)
        for _ in range(attempts):
            try:
                if self._batcher is not None or getattr(self, "to_async", None) is not None:
                    await self._infer_crops([crop])
                    await self.grpc.ready()
                    return
            except (OSError, aiohttp.ClientError, BentoMLException, ServiceError) as e:
                log.debug("gRPC warm-up: %s", e)  # HTTP not up yet: health stays NOT_SERVING
            await asyncio.sleep(0.5)
        log.error("gRPC: the batched path never answered; health stays NOT_SERVING")

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if getattr(self, "grpc", None):
            self._grpc_warmup.cancel()
            await self.grpc.stop()

    # --- the batchable step ---------------------------------------------------------

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, crops: list[str]) -> list[str]:
        """Base64 uint8 crops (preprocessing.height × width [× 3]) → base64 float32 outputs
        in graph output order. A malformed crop yields "" without failing its batch-mates.

        In-process callers (``run``) hand the batcher uint8 arrays instead and get each
        image's outputs back as arrays; one batch may hold both kinds."""
        arrays, kinds = [], []
        for item in crops:
            if isinstance(item, np.ndarray):
                arrays.append(item)
                kinds.append("array")
                continue
            try:
                arrays.append(self.core.decode_crop(item))
                kinds.append("text")
            except (ServiceError, binascii.Error, ValueError):
                kinds.append(None)
        outs = self.core.infer(np.stack(arrays)) if arrays else {}
        packed = self.core.pack(outs) if "text" in kinds else []
        results, i = [], 0
        for kind in kinds:
            if kind is None:
                results.append("")
                continue
            results.append(packed[i] if kind == "text" else {k: v[i] for k, v in outs.items()})
            i += 1
        return results

    # --- shared flow (REST now, gRPC too) -------------------------------------------

    async def in_pool(self, func, *args):
        """CPU work (rendering, listings) in the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    async def prepare(self, blobs: list[bytes]) -> list[np.ndarray]:
        """Decode + crop every image in parallel threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(self.pool, self.core.prepare, b)
                                      for b in blobs))  # fmt: skip

    async def run(self, blobs: list[bytes]) -> tuple[list[np.ndarray], list[dict]]:
        self.core.check_request(len(blobs))
        METRICS.images_per_request.observe(len(blobs))
        crops = await self.prepare(blobs)
        return crops, await self._infer_crops(crops)

    async def _infer_crops(self, crops: list[np.ndarray]) -> list[dict]:
        """uint8 crops → each image's graph outputs, through the adaptive batcher."""
        if self._batcher is not None:
            return await self._batcher.batch_infer("infer", (list(crops),), {})
        packed = await self._infer_batched([self.core.encode_crop(c) for c in crops])
        if any(not p for p in packed):
            raise ServiceError("inference returned no output for an image", "internal")
        return [self.core.unpack(p) for p in packed]

    _batcher = None  # BentoML's in-process batch entry, found at start-up (see below)

    def _find_batcher(self) -> None:
        """Reach ``infer``'s adaptive batcher in-process, without the HTTP/JSON round trip.

        BentoML 1.4 runs start-up hooks from the ServiceAppFactory that owns this instance
        and its batch dispatchers; its ``batch_infer`` is the batcher every ``/infer``
        request goes through (same queue, same bentoml_service_adaptive_batch_size), minus
        ~200 KB of base64 JSON per image each way. It is not public API: if it is missing
        (another BentoML), ``run`` falls back to the self-call through BentoML's client.
        """
        frame = inspect.currentframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if (getattr(owner, "_service_instance", None) is self
                    and "infer" in getattr(owner, "dispatchers", {})
                    and callable(getattr(owner, "batch_infer", None))):  # fmt: skip
                self._batcher = owner
                break
            frame = frame.f_back
        del frame
        if self._batcher is None:
            log.warning("BentoML's in-process batcher not found; batching through HTTP")

    async def _infer_batched(self, crops: list[str], attempts: int = 4) -> list[str]:
        """Fallback: through BentoML's client to the batchable ``infer``, so requests merge.

        BentoML 1.4's internal client renews its session every ~100 calls and closes the
        old one under in-flight calls (ServerDisconnectedError / "Cannot write to closing
        transport"). ``infer`` is a pure function, so such a call is safely sent again.
        """
        import aiohttp

        last = None
        for attempt in range(1, attempts + 1):
            try:
                return await self.to_async.infer(crops)
            except aiohttp.ClientConnectionError as e:
                METRICS.internal_retries.inc()
                last = e
                await asyncio.sleep(0.01 * attempt)
        raise Overloaded(f"internal batching call failed {attempts} times: {last}",
                         "internal_retry_exhausted") from last  # fmt: skip

    @staticmethod
    async def _read(images: list[Path], images_base64: list[str]) -> list[bytes]:
        blobs = [p.read_bytes() for p in images]
        for i, text in enumerate(images_base64):
            try:
                blobs.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError) as e:
                raise InvalidInput(f"images_base64[{i}] is not valid base64: {e}",
                                   "bad_base64") from e  # fmt: skip
        return blobs

    # --- public endpoints ---------------------------------------------------------------

    @bentoml.api
    @_maps_errors
    async def classify(
        self,
        images: list[Path] = IMAGES,
        images_base64: list[str] = IMAGES_B64,
        top_k: int = Field(default=5, ge=1, description="classes to return per image"),
    ) -> dict:
        """Top-k classes with probabilities for each image."""
        blobs = await self._read(images, images_base64)
        self.core.check_request(len(blobs), ExplainOptions(top_k=top_k, heatmaps=False))
        _, outs = await self.run(blobs)
        return _json({"predictions": [self.core.classification(o, top_k) for o in outs]})

    @bentoml.api
    @_maps_errors
    async def explain(
        self,
        images: list[Path] = IMAGES,
        images_base64: list[str] = IMAGES_B64,
        top_k: int = Field(default=3, ge=1, description="classes to explain per image"),
        heatmaps: bool = Field(default=True, description="include prototype heatmaps"),
        box_percentile: float = Field(default=90.0, description="heatmap box threshold"),
        interventions: list[InterventionIn] = Field(
            default_factory=list,
            description="prototypes to switch off: counterfactual logits and top-k",
            examples=[[{"class": "bag", "prototype": 1}]],
        ),
        map_kind: str = Field(
            default="similarity",
            description="heatmap kind: similarity (F·b'), contribution (a·F·b' [/σ], its "
            "mean is the contribution) or presence (Eq. 9's E'; 422 no_presence_maps unless "
            "the graph was exported with --presence)",
            examples=["contribution"],
        ),
    ) -> dict:
        """Per top-k class: logit, probability, bias, exactness gap logit − (Σ contributions
        + bias), residual_share {logit: r/(logit − bias), margin: (r − r_o)/(logit −
        logit_o), versus: o} (o = the runner-up for the top class, else the top class; r =
        Σ residual contributions) and every prototype's coefficient, score, contribution
        split exactly into nmf_contribution a(b·f) + residual_contribution a(Δ·f) [/σ]
        (Δ = b' − b; null, as residual_share, for a graph without pooled features),
        share of the logit, exemplars [{image, source, presence}] and heatmap (with its
        kind); if asked, a test-time intervention."""
        blobs = await self._read(images, images_base64)
        options = ExplainOptions(
            top_k=top_k, heatmaps=heatmaps, box_percentile=box_percentile,
            interventions=tuple(i.to_core() for i in interventions), map_kind=map_kind,
        )  # fmt: skip
        self.core.check_request(len(blobs), options)
        _, outs = await self.run(blobs)
        return _json({"explanations": [self.core.explanation(o, options) for o in outs],
                      "provider": self.core.explainer.provider})  # fmt: skip

    @bentoml.api
    @_maps_errors
    async def overlay(
        self,
        images: list[Path] = IMAGES,
        images_base64: list[str] = IMAGES_B64,
        rank: int = Field(default=0, ge=0, description="which of the top-k classes (0 = top)"),
        map_kind: str = Field(default="contribution",
                              description="contribution (default) | similarity | presence"),
    ) -> Image.Image:
        """PNG: the image as the model saw it under the class's contribution maps (all
        prototypes, then each): red = for the class, blue = against, opacity by |value| on
        one scale; legend: signed contributions split NMF/residual, the residual share."""
        blobs = await self._read(images, images_base64)
        if len(blobs) != 1:
            raise InvalidInput(f"overlay takes exactly one image, got {len(blobs)}",
                               "one_image")  # fmt: skip
        self.core.check_maps(1, map_kind)  # a graph without maps (of that kind): 422
        if rank >= self.core.map_classes:
            raise InvalidInput(f"rank must be < {self.core.map_classes} (the classes with maps)",
                               "rank")  # fmt: skip
        crops, outs = await self.run(blobs)
        png = await self.in_pool(self.core.overlay, crops[0], outs[0], rank, map_kind)
        return Response(png, media_type="image/png")  # already a PNG: no re-encoding

    @bentoml.api
    @_maps_errors
    async def prototypes(
        self,
        classes: list[str | int] = Field(default_factory=list,
                                         description="class names or indices (default: all)",
                                         examples=[["bag"]]),  # fmt: skip
    ) -> dict:
        """{p, exemplar_kinds, classes: [{class, index, explained, fold, explained_share:
        {energy: 1 − ‖R‖²/‖V‖², norm_ratio: ‖a·B‖/‖V‖}, prototypes: [{prototype,
        coefficient, fold_weight, exemplars: {kind: [{image, source, presence}]}}]}]}."""
        return _json(await self.in_pool(self.core.prototypes, classes))

    @bentoml.api(input_spec=PrototypeImageIn)
    @_maps_errors
    async def prototype_image(self, class_name: str | int, prototype: int,
                              kind: str = "augmented") -> Image.Image:  # fmt: skip
        """PNG strip of one prototype's exemplars (best first), each with its presence map
        over it and its score; 422 no_exemplars when the artifact has none."""
        png = await self.in_pool(self.core.prototype_image, class_name, prototype, kind)
        return Response(png, media_type="image/png")

    @bentoml.api
    def model(self) -> dict:
        """Classes, p, coefficients, prototype descriptions, artifact identity, provider."""
        return self.core.model_info()
