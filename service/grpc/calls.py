"""What every gRPC call of this server goes through, whichever service it belongs to
(protonmf.v1 and the Open Inference Protocol): lenient deserializers, a request id, the
access log, typed errors mapped to status codes once, the caller's deadline enforced."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from protonmf.service.ops.errors import ServiceError
from protonmf.service.ops.metrics import METRICS
from protonmf.service.ops.observability import REQUEST, finish, request_id, server_span

__all__ = ["Malformed", "checked", "guarded", "lenient", "register_unary"]


def status_of(e: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)


async def guarded(context: grpc.aio.ServicerContext, work):
    """``work``'s result; typed errors → status codes (REST's reasons in the message). The
    caller's deadline is enforced here too, so a request queued behind a long batch does
    not outlive its caller (its images leave the batcher's queue with it). Both gRPC
    services (protonmf.v1 and the Open Inference Protocol) answer through this."""
    try:
        remaining = context.time_remaining()
        if remaining is None:
            return await work
        return await asyncio.wait_for(work, timeout=max(remaining, 0.0))
    except ServiceError as e:
        METRICS.rejected.labels(reason=e.reason).inc()
        if getattr(e, "retry_after_s", None):
            context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
        await context.abort(status_of(e), f"{e.message} [{e.reason}]")
    except asyncio.TimeoutError:
        METRICS.rejected.labels(reason="deadline_exceeded").inc()
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline exceeded before the answer was ready [deadline]",
        )


@dataclass(frozen=True)
class Malformed:
    """What the deserializer hands on for bytes that are not the method's request message."""

    message: str  # the message type expected
    error: str


def lenient(message_class):
    """``message_class.FromString`` that answers malformed bytes with ``Malformed``: a
    deserializer that raises makes grpc.aio answer UNKNOWN with the exception's text."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # any failure here means the bytes are not that message
            return Malformed(message_class.DESCRIPTOR.full_name, str(e) or type(e).__name__)

    return parse


def checked(method, name: str):
    """``method`` for well-formed requests; INVALID_ARGUMENT (reason malformed_message)
    for a ``Malformed`` one. Each call gets a request id (the client's ``x-request-id``
    metadata or a new one, sent back in the initial metadata), is counted and logged."""

    async def handler(request, context):
        metadata = dict(context.invocation_metadata() or ())
        info = {"id": request_id(metadata.get("x-request-id"))}
        token, start = REQUEST.set(info), time.perf_counter()
        await context.send_initial_metadata((("x-request-id", info["id"]),))
        try:
            with server_span(f"grpc {name}", metadata):
                if isinstance(request, Malformed):
                    METRICS.rejected.labels(reason="malformed_message").inc()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"not a valid {request.message} message: {request.error} "
                        "[malformed_message]",
                    )
                return await method(request, context)
        finally:
            REQUEST.reset(token)
            code = context.code() or grpc.StatusCode.OK
            finish(
                info, "grpc", name, getattr(code, "name", str(code)), time.perf_counter() - start
            )

    return handler


def register_unary(server, service, servicer, pb_module) -> None:
    """Register every (unary) method of ``service`` (a ServiceDescriptor of ``pb_module``)
    on the grpc.aio ``server``, through ``checked`` and with ``lenient`` deserializers."""
    handlers = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            raise TypeError(f"{m.full_name}: only unary methods are registered here")
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            checked(getattr(servicer, m.name), m.name),
            request_deserializer=lenient(getattr(pb_module, m.input_type.name)),
            response_serializer=getattr(pb_module, m.output_type.name).SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)
