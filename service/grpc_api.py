"""gRPC adapter (protonmf.v1): the REST API's twin over the same core and the same batcher.

BentoML 1.4 cannot serve gRPC for new-style services, so the service starts this
``grpc.aio`` server in its start-up hook, on the worker's own event loop. Every RPC goes
through ``ProtoNMFService.run`` — the path REST takes — so gRPC and REST requests merge
into the same adaptive batches and count in the same metrics. Responses are built from
the core's JSON-able dicts (the REST bodies) so both transports say the same thing.

Health (``grpc.health.v1``) says NOT_SERVING until one image has gone through the batched
path, then SERVING; reflection lists the services for grpcurl and friends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .core import ExplainOptions, Intervention
from .errors import NotReady, ServiceError
from .metrics import METRICS
from .proto.protonmf.v1 import protonmf_pb2 as pb
from .proto.protonmf.v1 import protonmf_pb2_grpc as pb_grpc

__all__ = ["GrpcConfig", "GrpcServer", "Malformed", "add_servicer", "explanation_to_proto", "pb",
           "pb_grpc", "prototypes_to_proto"]

log = logging.getLogger("protonmf.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProtoNMF"].full_name


@dataclass(frozen=True)
class GrpcConfig:
    """From the environment: PROTONMF_GRPC_PORT (0 = off), _HOST, _MAX_CONCURRENCY,
    _MAX_MESSAGE_BYTES (default: a full request of maximum-size images), _GRACE_S."""

    port: int = 50051
    host: str = "0.0.0.0"
    max_concurrency: int = 128
    max_message_bytes: int = 0
    grace_s: float = 10.0

    @classmethod
    def from_env(cls, default_message_bytes: int, env=os.environ) -> GrpcConfig:
        get = env.get
        return cls(
            port=int(get("PROTONMF_GRPC_PORT", cls.port)),
            host=get("PROTONMF_GRPC_HOST", cls.host),
            max_concurrency=int(get("PROTONMF_GRPC_MAX_CONCURRENCY", cls.max_concurrency)),
            max_message_bytes=int(get("PROTONMF_GRPC_MAX_MESSAGE_BYTES", default_message_bytes)),
            grace_s=float(get("PROTONMF_GRPC_GRACE_S", cls.grace_s)),
        )


# --- dict (REST body) → message, field by field (json_format.ParseDict is ~3× slower) -----


def _score(d: dict) -> pb.ClassScore:
    return pb.ClassScore(class_name=d["class"], index=d["index"], logit=d["logit"],
                         probability=d["probability"])  # fmt: skip


def _heatmap(h: dict) -> pb.Heatmap:
    box = h["box"]
    return pb.Heatmap(
        shape=h["shape"], values=[v for row in h["values"] for v in row], peak=pb.Peak(**h["peak"]),
        box=pb.Box(percentile=box["percentile"], feature=pb.Rect(**box["feature"]),
                   input=pb.Rect(**box["input"])),
        kind=h["kind"],
    )  # fmt: skip


def _exemplars(entries: list[dict]) -> list[pb.Exemplar]:
    return [pb.Exemplar(image=x["image"], source=x["source"], presence=x["presence"])
            for x in entries]  # fmt: skip


def _class_entry(e: dict) -> pb.ClassExplanation:
    protos = [
        pb.PrototypeExplanation(
            prototype=d["prototype"], coefficient=d["coefficient"], score=d["score"],
            contribution=d["contribution"], share_of_logit=d["share_of_logit"],
            heatmap=_heatmap(d["heatmap"]) if "heatmap" in d else None,
            nmf_contribution=d["nmf_contribution"],
            residual_contribution=d["residual_contribution"],
            exemplars=_exemplars(d["exemplars"]),
        )
        for d in e["prototypes"]
    ]  # fmt: skip
    share = e["residual_share"]
    return pb.ClassExplanation(
        class_name=e["class"], index=e["index"], description=e["description"], logit=e["logit"],
        probability=e["probability"], bias=e["bias"], exactness_gap=e["exactness_gap"],
        prototypes=protos, residual_share=pb.ResidualShare(**share) if share else None,
    )  # fmt: skip


def _intervention(d: dict | None) -> pb.InterventionResult | None:
    if d is None:
        return None
    return pb.InterventionResult(
        switched_off=[pb.SwitchedOff(class_name=s["class"], prototype=s["prototype"])
                      for s in d["switched_off"]],
        logits=d["logits"], top_k=[_score(s) for s in d["top_k"]],
        prediction_before=d["prediction_before"], prediction_after=d["prediction_after"],
        prediction_changed=d["prediction_changed"],
    )  # fmt: skip


def explanation_to_proto(explanation: dict) -> pb.Explanation:
    """The core's explanation dict (the REST body) → its message."""
    return pb.Explanation(top_k=[_class_entry(e) for e in explanation["top_k"]],
                          exactness=explanation["exactness"],
                          intervention=_intervention(explanation["intervention"]))  # fmt: skip


def classification_to_proto(classification: dict) -> pb.Classification:
    return pb.Classification(top_k=[_score(s) for s in classification["top_k"]])


def prototypes_to_proto(body: dict) -> pb.PrototypesResponse:
    """The core's /prototypes dict → its message."""
    classes = [
        pb.ClassPrototypes(
            class_name=c["class"], index=c["index"], explained=c["explained"], fold=c["fold"],
            explained_share=pb.ExplainedShare(**c["explained_share"]),
            prototypes=[pb.PrototypeInfo(
                prototype=d["prototype"], coefficient=d["coefficient"],
                fold_weight=d["fold_weight"],
                exemplars={k: pb.ExemplarList(entries=_exemplars(v))
                           for k, v in d["exemplars"].items()},
            ) for d in c["prototypes"]],
        )
        for c in body["classes"]
    ]  # fmt: skip
    return pb.PrototypesResponse(p=body["p"], exemplar_kinds=body["exemplar_kinds"],
                                 classes=classes)  # fmt: skip


def _status(e: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)


class ProtoNMFServicer(pb_grpc.ProtoNMFServicer):
    """The RPCs; ``service`` is the running ProtoNMFService (core, batched ``run``,
    ``in_pool`` for CPU work off the event loop)."""

    def __init__(self, service):
        self.service = service
        self.core = service.core
        self.ready = False  # set with health SERVING: no RPC runs before the batcher works

    async def _guarded(self, context: grpc.aio.ServicerContext, work):
        """Typed errors → status codes (REST's reasons in the message); deadline enforced
        here too, so a request queued behind a long batch does not outlive its caller."""
        try:
            if not self.ready:
                work.close()  # never started
                raise NotReady("the model is warming up; retry shortly", "not_ready")
            remaining = context.time_remaining()
            if remaining is None:
                return await work
            return await asyncio.wait_for(work, timeout=max(remaining, 0.0))
        except ServiceError as e:
            METRICS.rejected.labels(reason=e.reason).inc()
            if getattr(e, "retry_after_s", None):
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            await context.abort(_status(e), f"{e.message} [{e.reason}]")
        except asyncio.TimeoutError:
            METRICS.rejected.labels(reason="deadline_exceeded").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "deadline exceeded before the explanation was ready [deadline]")  # fmt: skip

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        async def work():
            top_k = request.top_k if request.HasField("top_k") else 5
            blobs = list(request.images)
            self.core.check_request(len(blobs), ExplainOptions(top_k=top_k, heatmaps=False))
            _, outs = await self.service.run(blobs)
            return pb.ClassifyResponse(predictions=[
                classification_to_proto(self.core.classification(o, top_k)) for o in outs])

        return await self._guarded(context, work())

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        async def work():
            options = ExplainOptions(
                top_k=request.top_k if request.HasField("top_k") else 3,
                heatmaps=request.heatmaps if request.HasField("heatmaps") else True,
                box_percentile=(request.box_percentile if request.HasField("box_percentile")
                                else 90.0),
                interventions=tuple(Intervention(i.class_name, i.prototype)
                                    for i in request.interventions),
                map_kind=request.map_kind if request.HasField("map_kind") else "similarity",
            )  # fmt: skip
            blobs = list(request.images)
            self.core.check_request(len(blobs), options)
            _, outs = await self.service.run(blobs)
            return pb.ExplainResponse(
                explanations=[explanation_to_proto(self.core.explanation(o, options))
                              for o in outs],
                provider=self.core.explainer.provider,
            )  # fmt: skip

        return await self._guarded(context, work())

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        info = self.core.model_info()
        return pb.ModelInfoResponse(
            json=json.dumps(info), classes=info["classes"], p=info["p"],
            provider=info["provider"], model_sha256=info["artifact"]["model_sha256"] or "",
            format_version=info["artifact"]["format_version"],
        )  # fmt: skip

    async def Prototypes(self, request: pb.PrototypesRequest, context) -> pb.PrototypesResponse:
        async def work():
            body = await self.service.in_pool(self.core.prototypes, list(request.classes))
            return prototypes_to_proto(body)

        return await self._guarded(context, work())

    async def PrototypeImage(self, request: pb.PrototypeImageRequest, context
                             ) -> pb.PrototypeImageResponse:  # fmt: skip
        async def work():
            kind = request.kind if request.HasField("kind") else "augmented"
            png = await self.service.in_pool(self.core.prototype_image, request.class_name,
                                             request.prototype, kind)  # fmt: skip
            return pb.PrototypeImageResponse(png=png)

        return await self._guarded(context, work())


@dataclass(frozen=True)
class Malformed:
    """What the deserializer hands on for bytes that are not the method's request message."""

    message: str  # the message type expected
    error: str


def _lenient(message_class):
    """``message_class.FromString`` that answers malformed bytes with ``Malformed``: a
    deserializer that raises makes grpc.aio answer UNKNOWN with the exception's text."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # any failure here means the bytes are not that message
            return Malformed(message_class.DESCRIPTOR.full_name, str(e) or type(e).__name__)

    return parse


def _checked(method):
    """``method`` for well-formed requests; INVALID_ARGUMENT (reason malformed_message)
    for a ``Malformed`` one."""

    async def handler(request, context):
        if isinstance(request, Malformed):
            METRICS.rejected.labels(reason="malformed_message").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not a valid {request.message} message: {request.error} "
                                "[malformed_message]")  # fmt: skip
        return await method(request, context)

    return handler


def add_servicer(servicer: ProtoNMFServicer, server) -> None:
    """``pb_grpc.add_ProtoNMFServicer_to_server``, built from the service's descriptor with
    lenient deserializers, so malformed request bytes are INVALID_ARGUMENT, not UNKNOWN."""
    service = pb.DESCRIPTOR.services_by_name["ProtoNMF"]
    handlers = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            raise TypeError(f"{m.full_name}: only unary methods are registered here")
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _checked(getattr(servicer, m.name)),
            request_deserializer=_lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))  # fmt: skip
    server.add_registered_method_handlers(service.full_name, handlers)


class GrpcServer:
    """The grpc.aio server of one worker: ProtoNMF + health + reflection.

    Workers of one service bind the same port (gRPC sets SO_REUSEPORT), and the kernel
    spreads connections across them, as it does for BentoML's HTTP workers.
    """

    def __init__(self, service, config: GrpcConfig):
        self.config = config
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=config.max_concurrency,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        self.servicer = ProtoNMFServicer(service)
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)  # fmt: skip
        reflection.enable_server_reflection(names, self.server)
        self.address = f"{config.host}:{config.port}"
        if self.server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"gRPC: cannot bind {self.address}")

    async def start(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("gRPC listening on %s", self.address)

    async def ready(self) -> None:
        self.servicer.ready = True
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        self.servicer.ready = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)

    async def _set(self, status) -> None:
        for name in ("", SERVICE_NAME):  # "" = the server as a whole
            await self.health.set(name, status)
