"""The REST front door: one ASGI middleware between uvicorn and BentoML's endpoints.

Added with BentoML's public ``add_asgi_middleware``, inside BentoML's request timeout
(traffic.timeout; see rest/bentoml_fixes.py). BentoML's concurrency limit is off: this one
counts a request once its body has arrived. What it does:

- **Body first, slot second.** A request's body is read in full, within
  ``body_timeout_s`` and ``max_body_bytes`` (408 ``body_timeout``, 413 ``body_too_large``),
  before it takes one of ``max_concurrency`` slots (429 ``too_many_requests``): clients
  that send headers and then nothing hold a connection, not the service.
- **Forms checked before BentoML parses them.** Malformed multipart (no boundary, too many
  parts, a part over its limit) is 400 ``malformed_multipart``; a text value in a file
  field (multipart or urlencoded) is 400 ``not_a_file`` (BentoML 1.4 would fetch it as a URL); a plain field sent as
  a file part of bytes that are not UTF-8 is 400 ``malformed_multipart`` (BentoML: 500).

- **API keys** (when set): every path but the open ones (probes, /metrics by default)
  needs one, compared in constant time; else 401 ``unauthenticated``.
- **Request id and access log**: ``X-Request-ID`` taken from the client or made, returned
  on every answer; the service's endpoints are counted and logged (observability.py).

Errors answer with the service's error body (errors.py). Other paths (probes, /metrics,
/docs.json, /ui) pass through once authorized.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from protonmf.service.ops.errors import InvalidInput, PayloadTooLarge, ServiceError, Unauthenticated
from protonmf.service.ops.metrics import METRICS
from protonmf.service.ops.observability import REQUEST, ApiKeys, finish, presented_key, request_id

__all__ = ["RequestGuard"]


class _Refused(ServiceError):
    """A request refused before the service: status and reason as given."""

    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message, reason)
        self.status = status


async def _answer(send, e: ServiceError) -> None:
    METRICS.rejected.labels(reason=e.reason).inc()
    body = orjson.dumps(e.to_dict())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if getattr(e, "retry_after_s", None):
        headers.append((b"retry-after", str(e.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware; ``paths``: the service's endpoints ("/classify", …)."""

    def __init__(
        self,
        app,
        *,
        paths: list[str],
        file_fields: list[str],
        max_body_bytes: int,
        body_timeout_s: float,
        max_concurrency: int,
        max_parts: int,
        keys: ApiKeys | None = None,
        open_paths: list[str] = (),
    ):
        self.app = app
        self.keys = keys or ApiKeys([])
        self.open_paths = tuple(p.rstrip("/") for p in open_paths if p)
        self.paths = frozenset(paths)
        self.file_fields = frozenset(file_fields)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_concurrency = max_concurrency
        self.max_parts = max_parts
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        info = {"id": request_id(headers.get("x-request-id")), "status": 500}
        send = _tagged(send, info)
        path = scope["path"]
        if not self._authorized(path, headers):
            await _answer(
                send,
                Unauthenticated(
                    "a valid API key is required (Authorization: Bearer KEY or X-API-Key)"
                ),
            )
            return finish(info, "rest", path if path in self.paths else "other", 401, 0.0)
        if path not in self.paths:
            return await self.app(scope, receive, send)
        token, start = REQUEST.set(info), time.perf_counter()
        try:
            await self._serve(scope, receive, send)
        finally:
            REQUEST.reset(token)
            finish(info, "rest", path, info["status"], time.perf_counter() - start)

    def _authorized(self, path: str, headers: dict) -> bool:
        if not self.keys.enabled or any(
            path == p or path.startswith(p + "/") for p in self.open_paths
        ):
            return True
        return self.keys.allows(
            presented_key(headers.get("authorization"), headers.get("x-api-key"))
        )

    async def _serve(self, scope, receive, send) -> None:
        try:
            body = await self._read_body(scope, receive)
            if self.in_flight >= self.max_concurrency:
                raise _Refused(
                    429,
                    f"{self.in_flight} requests in flight in this worker "
                    f"(limit {self.max_concurrency}); retry shortly",
                    "too_many_requests",
                )
            await self._check_form(scope, body)
        except ServiceError as e:
            return await _answer(send, e)
        self.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body within the deadline and the byte limit."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"the body has {int(value)} bytes; the limit is {self.max_body_bytes}",
                    "body_too_large",
                )
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise _Refused(
                    408,
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                    "body_timeout",
                ) from None
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the client went away", "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"the body is over {self.max_body_bytes} bytes", "body_too_large"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, scope, body: bytes) -> None:
        """A form BentoML would fetch from, or fail on with a 500: 400."""
        request = Request(scope, _replay(body, None))
        kind = request.headers.get("content-type", "")
        if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return
        try:
            form = await request.form(max_files=self.max_parts, max_fields=self.max_parts)
        except MultiPartException as e:
            raise InvalidInput(f"malformed form: {e.message}", "malformed_multipart") from e
        except HTTPException as e:  # starlette's own 400 for the above, inside an app
            raise InvalidInput(f"malformed form: {e.detail}", "malformed_multipart") from e
        try:
            for key, value in form.multi_items():
                if key in self.file_fields and not isinstance(value, UploadFile):
                    raise InvalidInput(
                        f"{key!r} takes files; got a text value (URLs and paths "
                        "are not fetched: upload the file itself)",
                        "not_a_file",
                    )
                if key not in self.file_fields and isinstance(value, UploadFile):
                    try:
                        (await value.read()).decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise InvalidInput(
                            f"field {key!r} is not text", "malformed_multipart"
                        ) from e
        finally:
            await form.close()


def _tagged(send, info: dict):
    """``send`` that returns the request id in a header and notes the status."""
    header = (b"x-request-id", info["id"].encode())

    async def tagged(message) -> None:
        if message["type"] == "http.response.start":
            info["status"] = message["status"]
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return tagged


def _replay(body: bytes, receive):
    """``receive`` that hands the app the body already read, then the client's events."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
