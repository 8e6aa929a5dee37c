"""Request ids, one JSON log line per request, per-transport request metrics, API keys,
tracing spans (decode, infer, explain) for both transports.

Both transports call the same few functions, so a REST and a gRPC request leave the same
traces: a request id (taken from the client's ``X-Request-ID`` header / ``x-request-id``
metadata when it is sane, else made here, and returned the same way), a log line on the
``protonmf.access`` logger ({request_id, transport, endpoint, status, images, latency_ms})
and ``protonmf_requests_total`` / ``protonmf_request_duration_seconds`` labelled by
transport. The data plane adds what it learns (images) to the request's context.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import trace

from protonmf.service.ops.metrics import METRICS

__all__ = [
    "REQUEST",
    "ApiKeys",
    "configure_logging",
    "finish",
    "initialize",
    "note",
    "request_id",
    "server_span",
    "span",
]

ACCESS = logging.getLogger("protonmf.access")
# the request being served (a dict: id, images, ...): set by the transport, read by all
REQUEST: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "protonmf_request", default=None
)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(candidate: str | None) -> str:
    """The client's id if it is a sane token (echoed in logs and headers), else a new one."""
    return candidate if candidate and _SANE_ID.match(candidate) else uuid.uuid4().hex


def note(**fields) -> None:
    """Add ``fields`` (e.g. images=3) to the current request's log line."""
    current = REQUEST.get()
    if current is not None:
        current.update(fields)


def finish(info: dict, transport: str, endpoint: str, status: str | int, seconds: float) -> None:
    """Count and log one answered request."""
    METRICS.requests.labels(transport=transport, endpoint=endpoint, status=str(status)).inc()
    METRICS.request_seconds.labels(transport=transport, endpoint=endpoint).observe(seconds)
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info(
            "request",
            extra={
                "request_id": info.get("id"),
                "transport": transport,
                "endpoint": endpoint,
                "status": status,
                "images": info.get("images"),
                "latency_ms": round(seconds * 1e3, 2),
            },
        )


@contextmanager
def span(name: str, **attributes):
    """An OpenTelemetry span (a no-op unless a tracer provider is set: BentoML's tracing
    configuration, or the application's)."""
    with trace.get_tracer("protonmf.service").start_as_current_span(name) as current:
        for key, value in attributes.items():
            current.set_attribute(key, value)
        yield current


@contextmanager
def server_span(name: str, metadata: dict):
    """The server span of a gRPC call, continuing the caller's trace (W3C traceparent in
    the metadata) as BentoML's middleware does for REST."""
    from opentelemetry import propagate

    tracer = trace.get_tracer("protonmf.service")
    with tracer.start_as_current_span(
        name, context=propagate.extract(metadata), kind=trace.SpanKind.SERVER
    ) as current:
        yield current


def initialize(transport: str, endpoints, ok: str) -> None:
    """Create each endpoint's success series at 0 now, so rates see the first requests."""
    for endpoint in endpoints:
        METRICS.requests.labels(transport=transport, endpoint=endpoint, status=ok)


def configure_logging(fmt: str = "json", enabled: bool = True) -> None:
    """The access log: one JSON object per line on stderr (or plain text), or off."""
    ACCESS.propagate = False
    ACCESS.setLevel(logging.INFO if enabled else logging.WARNING)
    for handler in list(ACCESS.handlers):
        ACCESS.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"asctime": "time"}
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(name)s %(request_id)s %(transport)s %(endpoint)s %(status)s "
                "%(latency_ms)sms"
            )
        )
    ACCESS.addHandler(handler)


class ApiKeys:
    """The accepted API keys; ``allows`` compares a presented key with every one of them in
    constant time (no early exit, so timing tells nothing about which or how close)."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_settings(cls, settings) -> ApiKeys:
        secret = settings.api_keys.get_secret_value() if settings.api_keys else ""
        keys = [k.strip() for k in secret.split(",")]
        if settings.api_keys_file:
            keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines()]
        return cls([k for k in keys if k and not k.startswith("#")])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, presented: str | None) -> bool:
        if not self._keys:
            return True
        given = (presented or "").encode()
        return any([hmac.compare_digest(given, k) for k in self._keys])  # all compared


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
