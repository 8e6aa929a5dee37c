"""gRPC adapter (protonmf.v1): the REST API's twin over the same engine.

BentoML 1.4 cannot serve gRPC for new-style services, so the service starts this
``grpc.aio`` server in its start-up hook, on the worker's own event loop. Every RPC calls
the ``Engine`` method its REST endpoint calls — images of both transports merge into
the same batches and count in the same metrics — and turns the same JSON-able body into
its message (protonmf/api/protomap.py, from the descriptors), so both transports say the same thing.

Health (``grpc.health.v1``) says SERVING once the engine has started (the model is
loaded and warmed before); reflection lists the services for grpcurl and friends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protonmf.api.proto.protonmf.v1 import protonmf_pb2 as pb
from protonmf.api.proto.protonmf.v1 import protonmf_pb2_grpc as pb_grpc
from protonmf.api.protomap import model_info_message, to_message
from protonmf.api.schemas import PrototypeImageRequest, default_of
from protonmf.service.engine.options import CLASSIFY_TOP_K, ExplainOptions, Intervention
from protonmf.service.grpc.calls import Malformed, guarded, register_unary
from protonmf.service.oip.grpc import SERVICE_NAME as OIP_SERVICE_NAME
from protonmf.service.oip.grpc import add_oip_servicer
from protonmf.service.ops.errors import NotReady, ServiceError
from protonmf.service.ops.metrics import METRICS
from protonmf.service.ops.observability import (
    ApiKeys,
    initialize,
    presented_key,
)

__all__ = ["GrpcConfig", "GrpcServer", "Malformed", "add_servicer", "pb", "pb_grpc"]

log = logging.getLogger("protonmf.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProtoNMF"].full_name
# ExplainRequest's optional scalars: unset, they take ExplainOptions' (the schema's) defaults
EXPLAIN_FIELDS = ("top_k", "heatmaps", "box_percentile", "map_kind")
EXEMPLAR_KIND = default_of(PrototypeImageRequest, "kind")


@dataclass(frozen=True)
class GrpcConfig:
    """Where and how the gRPC server listens (settings.py's PROTONMF_GRPC_*)."""

    port: int = 50051
    host: str = "0.0.0.0"
    max_concurrency: int = 128
    max_message_bytes: int = 9 << 20
    grace_s: float = 10.0
    drain_delay_s: float = 0.5
    keys: ApiKeys | None = None  # None or empty: no authentication
    open_services: tuple[str, ...] = ("grpc.health.v1.Health",)
    tls_cert: str | None = None  # PEM paths: TLS when both are set
    tls_key: str | None = None

    @classmethod
    def from_settings(cls, s) -> GrpcConfig:
        return cls(
            port=s.grpc_port,
            host=s.grpc_host,
            max_concurrency=s.grpc_max_concurrency,
            max_message_bytes=s.grpc_message_bytes(),
            grace_s=s.grpc_grace_s,
            drain_delay_s=s.grpc_drain_delay_s,
            keys=ApiKeys.from_settings(s),
            open_services=tuple(x for x in s.auth_open_grpc.split(",") if x),
            tls_cert=s.grpc_tls_cert and str(s.grpc_tls_cert),
            tls_key=s.grpc_tls_key and str(s.grpc_tls_key),
        )


async def _refuse(error: ServiceError):
    raise error


class ProtoNMFServicer(pb_grpc.ProtoNMFServicer):
    """The RPCs over ``engine`` (engine.Engine)."""

    def __init__(self, engine):
        self.engine = engine
        self.ready = False  # set with health SERVING

    async def _guarded(self, context: grpc.aio.ServicerContext, work):
        """``guarded``, once the engine has started."""
        if not self.ready:
            work.close()  # never started: no "never awaited" warning
            return await guarded(
                context, _refuse(NotReady("the model is warming up; retry shortly", "not_ready"))
            )
        return await guarded(context, work)

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        top_k = request.top_k if request.HasField("top_k") else CLASSIFY_TOP_K
        body = await self._guarded(context, self.engine.classify(list(request.images), top_k))
        return to_message(body, pb.ClassifyResponse)

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        given = {name: getattr(request, name) for name in EXPLAIN_FIELDS if request.HasField(name)}
        interventions = tuple(
            Intervention(i.class_name, i.prototype) for i in request.interventions
        )
        options = ExplainOptions(**given, interventions=interventions)  # unset: the defaults
        body = await self._guarded(context, self.engine.explain(list(request.images), options))
        return to_message(body, pb.ExplainResponse)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return model_info_message(self.engine.model_info(), pb.ModelInfoResponse)

    async def Prototypes(self, request: pb.PrototypesRequest, context) -> pb.PrototypesResponse:
        body = await self._guarded(context, self.engine.prototypes(list(request.classes)))
        return to_message(body, pb.PrototypesResponse)

    async def PrototypeImage(
        self, request: pb.PrototypeImageRequest, context
    ) -> pb.PrototypeImageResponse:
        kind = request.kind if request.HasField("kind") else EXEMPLAR_KIND
        work = self.engine.prototype_image(request.class_name, request.prototype, kind)
        return pb.PrototypeImageResponse(png=await self._guarded(context, work))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys for every gRPC service but the open ones (health by default): the key in
    ``authorization: Bearer KEY`` or ``x-api-key`` metadata; else UNAUTHENTICATED."""

    def __init__(self, keys: ApiKeys, open_services: list[str]):
        self.keys = keys
        self.open = tuple(f"/{s.strip()}/" for s in open_services if s.strip())

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.keys.allows(
            presented_key(metadata.get("authorization"), metadata.get("x-api-key"))
        ):
            return handler
        METRICS.rejected.labels(reason="unauthenticated").inc()
        return _denied_like(handler)


def _denied_like(handler):
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED."""

    async def deny(request_or_iterator, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "a valid API key is required (authorization: Bearer KEY or "
            "x-api-key metadata) [unauthenticated]",
        )

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for kind, make in kinds:
        if getattr(handler, kind) is not None:
            return make(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def add_servicer(servicer: ProtoNMFServicer, server) -> None:
    """``pb_grpc.add_ProtoNMFServicer_to_server`` with lenient deserializers, so malformed
    request bytes are INVALID_ARGUMENT, not UNKNOWN (``calls.register_unary``)."""
    register_unary(server, pb.DESCRIPTOR.services_by_name["ProtoNMF"], servicer, pb)


class GrpcServer:
    """The grpc.aio server of one worker: ProtoNMF + health + reflection.

    Workers of one service bind the same port (gRPC sets SO_REUSEPORT), and the kernel
    spreads connections across them, as it does for BentoML's HTTP workers.
    """

    def __init__(self, engine, config):
        """``config``: a GrpcConfig or the service's Settings."""
        config = config if isinstance(config, GrpcConfig) else GrpcConfig.from_settings(config)
        self.config = config
        self.health = health.aio.HealthServicer()
        interceptors = []
        if config.keys is not None and config.keys.enabled:
            interceptors.append(AuthInterceptor(config.keys, list(config.open_services)))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrency,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        self.servicer = ProtoNMFServicer(engine)
        self._drain: asyncio.Task | None = None
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # the Open Inference Protocol v2 (docs/oip.md) on the same port and engine
        add_oip_servicer(self.server, lambda: engine, "protonmf")
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            OIP_SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        self.address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
            bound = self.server.add_secure_port(self.address, credentials)
        else:
            bound = self.server.add_insecure_port(self.address)
        if bound == 0:
            raise RuntimeError(f"gRPC: cannot bind {self.address}")

    async def start(self, ready: bool = True) -> None:
        """Listen; SERVING at once unless ``ready`` is False (then call ``ready()``)."""
        initialize(
            "grpc", [m.name for m in pb.DESCRIPTOR.services_by_name["ProtoNMF"].methods], "OK"
        )
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("gRPC listening on %s", self.address)
        if ready:
            await self.ready()

    async def ready(self) -> None:
        self.servicer.ready = True
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> asyncio.Task:
        """Stop taking calls now and give those in flight the grace period (idempotent).
        grpc.aio refuses new calls itself; the servicer keeps answering the accepted ones,
        so nothing sent before the drain is lost."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._stop())
        return self._drain

    async def _stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        # Calls already on the wire when the drain starts are still taken: grpc.aio's
        # stop() cancels those it has received but not yet handed to a servicer (measured:
        # 17 of 958 calls sent before SIGTERM, 32 clients; 0 of 936 with 0.5 s here).
        await asyncio.sleep(self.config.drain_delay_s)
        await self.server.stop(self.config.grace_s)
        self.servicer.ready = False

    async def stop(self) -> None:
        await self.drain()

    async def _set(self, status) -> None:
        for name in ("", SERVICE_NAME):  # "" = the server as a whole
            await self.health.set(name, status)
