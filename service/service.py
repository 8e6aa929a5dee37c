"""REST adapter (BentoML): each endpoint reads its request, calls the engine, answers.

    POST /classify         images → top-k classes with probabilities
    POST /explain          images → per top-k class: prototypes, contributions (NMF and
                           residual parts), heatmaps; optional test-time intervention
    POST /overlay          one image → PNG of a class's maps over it, with a legend
    POST /prototypes       every prototype: coefficient, fold weight, exemplars
    POST /prototype_image  one prototype's exemplars with their presence maps (PNG)
    POST /model            classes, p, coefficients, artifact identity, provider
    /ui                    the explanation viewer (service/rest/webui.py)
    /v2/...                the Open Inference Protocol v2 (oip/rest.py; gRPC: oip/grpc.py)

Images come as multipart files (``images``) or base64 strings in JSON (``images_base64``).
Errors answer with ``{"error", "reason", "status"}`` (errors.py). The gRPC twin
(grpc/server.py) runs in the same worker over the same engine (engine/pipeline.py). Settings:
docs/configuration.md (settings.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import signal
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException
from PIL import Image
from starlette.responses import Response

from protonmf.api import schemas as S
from protonmf.service.engine.options import ExplainOptions
from protonmf.service.engine.pipeline import Engine
from protonmf.service.grpc.server import GrpcServer
from protonmf.service.oip.rest import V2Root
from protonmf.service.oip.rest import build_app as build_oip_app
from protonmf.service.ops.errors import InvalidInput, ServiceError
from protonmf.service.ops.observability import ApiKeys, configure_logging, initialize
from protonmf.service.ops.settings import Settings
from protonmf.service.rest import bentoml_fixes
from protonmf.service.rest.guard import RequestGuard
from protonmf.service.rest.responses import error_response, json_response
from protonmf.service.rest.webui import app as ui_app

SETTINGS = Settings.from_env()  # the decorator below needs the worker count now
bentoml_fixes.apply()
bentoml_fixes.document_errors()
ENDPOINTS = ("classify", "explain", "overlay", "prototypes", "prototype_image", "model")


async def _answer(work, media_type: str | None = None) -> Response:
    """The engine's answer (a dict, or bytes of ``media_type``) or its typed error."""
    try:
        result = await work
    except ServiceError as e:
        return error_response(e)
    return json_response(result) if media_type is None else Response(result, media_type=media_type)


def _read(images: list[Path], images_base64: list[str]) -> list[bytes]:
    blobs = [p.read_bytes() for p in images]
    for i, text in enumerate(images_base64):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as e:
            raise InvalidInput(f"images_base64[{i}] is not valid base64: {e}", "bad_base64") from e
    return blobs


async def _read_then(request, call):
    """Read the request's images, then ``call(blobs)`` (a engine coroutine)."""
    return await call(_read(request.images, request.images_base64))


# Open Inference Protocol v2 (docs/oip.md) on the same engine; until the service is up
# its endpoints answer 503
def _current_engine() -> Engine | None:
    """This worker's engine; None before the service instance exists."""
    try:
        return bentoml.get_current_service().engine
    except BentoMLException:  # "service isn't instantiated yet"
        return None


oip_app = build_oip_app(_current_engine, "protonmf")


@bentoml.asgi_app(oip_app, path="/v2")
@bentoml.asgi_app(ui_app, path="/ui")  # the explanation viewer (service/rest/webui.py)
@bentoml.service(
    name="protonmf",
    workers=SETTINGS.workers,
    # no max_concurrency: RequestGuard (rest/guard.py) counts requests once their body is in
    traffic={"timeout": SETTINGS.request_timeout_s},
    # RequestGuard writes the access log (protonmf.access, JSON); BentoML's own would add a
    # second, plain-text line per request to the same stream
    logging={"access": {"enabled": False}},
)
class ProtoNMFService:
    """Serves one ProtoNMF artifact; every prediction comes with its explanation."""

    def __init__(self) -> None:
        # Read again: the environment of the worker that builds the instance is the one
        # that counts (SETTINGS above only sized the decorator and the middleware).
        self.settings = Settings.from_env()
        configure_logging(self.settings.log_format, self.settings.access_log)
        initialize("rest", [f"/{name}" for name in ENDPOINTS], "200")
        # Loaded and warmed before /readyz says ready.
        self.engine = Engine.load(self.settings)
        self.grpc = GrpcServer(self.engine, self.settings) if self.settings.grpc_port > 0 else None

        # Everything alive now (modules, the artifact, BentoML's app) lives as long as the
        # worker: out of the collector's sight, full collections only walk per-request garbage.
        gc.freeze()

    def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.on_startup
    async def start(self) -> None:
        await self.engine.start()
        if self.grpc:
            await self.grpc.start()
            self._drain_grpc_on_sigterm()

    def _drain_grpc_on_sigterm(self) -> None:
        """SIGTERM starts gRPC's drain at once, beside the HTTP server's (whose handler,
        installed before this hook runs, is kept and called): otherwise gRPC would go on
        taking new calls until HTTP had drained and the shutdown hook ran."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            loop.call_soon_threadsafe(self.grpc.drain)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc:
            await self.grpc.stop()
        await self.engine.stop(self.settings.grpc_grace_s)

    # --- endpoints: request and response models in protonmf/api/schemas.py ------------------------------

    @bentoml.api(input_spec=S.ClassifyRequest, output_spec=S.ClassifyResponse)
    async def classify(self, **request) -> dict:
        """Top-k classes with probabilities for each image."""
        r = S.ClassifyRequest.model_construct(**request)
        return await _answer(_read_then(r, lambda blobs: self.engine.classify(blobs, r.top_k)))

    @bentoml.api(input_spec=S.ExplainRequest, output_spec=S.ExplainResponse)
    async def explain(self, **request) -> dict:
        """Per top-k class: logit, probability, bias, exactness gap logit − (Σ contributions
        + bias), residual_share {logit: r/(logit − bias), margin: (r − r_o)/(logit −
        logit_o), versus: o} (o = the runner-up for the top class, else the top class; r =
        Σ residual contributions) and every prototype's coefficient, score, contribution
        split exactly into nmf_contribution a(b·f) + residual_contribution a(Δ·f) [/σ]
        (Δ = b' − b; null, as residual_share, for a graph without pooled features),
        share of the logit, exemplars [{image, source, presence}] and heatmap (with its
        kind); if asked, a test-time intervention."""
        r = S.ExplainRequest.model_construct(**request)
        options = ExplainOptions(
            top_k=r.top_k,
            heatmaps=r.heatmaps,
            box_percentile=r.box_percentile,
            interventions=tuple(i.to_core() for i in r.interventions),
            map_kind=r.map_kind,
        )
        return await _answer(_read_then(r, lambda blobs: self.engine.explain(blobs, options)))

    @bentoml.api(input_spec=S.OverlayRequest)
    async def overlay(self, **request) -> Image.Image:
        """PNG: the image as the model saw it under the class's contribution maps (all
        prototypes, then each): red = for the class, blue = against, opacity by |value| on
        one scale; legend: signed contributions split NMF/residual, the residual share."""
        r = S.OverlayRequest.model_construct(**request)
        work = _read_then(r, lambda blobs: self.engine.overlay(blobs, r.rank, r.map_kind))
        return await _answer(work, media_type="image/png")

    @bentoml.api(input_spec=S.PrototypesRequest, output_spec=S.PrototypesResponse)
    async def prototypes(self, **request) -> dict:
        """{p, exemplar_kinds, classes: [{class, index, explained, fold, explained_share:
        {energy: 1 − ‖R‖²/‖V‖², norm_ratio: ‖a·B‖/‖V‖}, prototypes: [{prototype,
        coefficient, fold_weight, exemplars: {kind: [{image, source, presence}]}}]}]}."""
        return await _answer(self.engine.prototypes(request["classes"]))

    @bentoml.api(input_spec=S.PrototypeImageRequest)
    async def prototype_image(self, **request) -> Image.Image:
        """PNG strip of one prototype's exemplars (best first), each with its presence map
        over it and its score; 422 no_exemplars when the artifact has none."""
        r = S.PrototypeImageRequest.model_construct(**request)
        work = self.engine.prototype_image(r.class_name, r.prototype, r.kind)
        return await _answer(work, media_type="image/png")

    @bentoml.api(output_spec=S.ModelInfo)
    def model(self) -> dict:
        """Classes, p, coefficients, prototype descriptions, artifact identity, provider."""
        return json_response(self.engine.model_info())


ProtoNMFService.add_asgi_middleware(V2Root)  # GET /v2 without Starlette's redirect to /v2/
ProtoNMFService.add_asgi_middleware(
    RequestGuard,
    paths=[f"/{name}" for name in ENDPOINTS],
    file_fields=["images"],
    keys=ApiKeys.from_settings(SETTINGS),
    open_paths=SETTINGS.auth_open_paths.split(","),
    max_body_bytes=SETTINGS.body_bytes(),
    body_timeout_s=SETTINGS.body_timeout_s,
    max_concurrency=SETTINGS.max_concurrency,
    max_parts=SETTINGS.max_images + 16,
)
