"""A fix for a BentoML 1.4 bug, applied when the service is imported: BentoML's own method
(Apache-2.0) with the bug taken out; tests/test_rest/bentoml_fixes.py shows the bug on BentoML's
original and its absence on the replacement (docs/architecture.md has the upstream note).

``TimeoutMiddleware`` (bentoml/_internal/server/http/traffic.py) arms a ``loop.call_later``
timer per request and never cancels it. The timer's handle keeps a copy of the request's
contextvars (tracing span, request context) alive for the whole timeout (60 s here): under
32 clients the worker's GC-tracked objects grew from 127k to 278k in 45 s and each full
collection took ~220 ms with the GIL held (profiled with py-spy/perf, 2 vCPUs). The
replacement arms the timer in an empty context and cancels it once the request is
answered; the 504-on-timeout behaviour is unchanged. BentoML's configuration cannot turn
the middleware off (traffic.timeout must be > 0), so it is patched, not replaced.

Also here, for a BentoML 1.4 limitation rather than a bug: /docs.json cannot list an
endpoint's error responses. ``document_errors`` wraps the public ``Service.openapi_spec``
property (the maintainers' advice, bentoml/BentoML#2975) to add every error status with
its body (schemas.ErrorBody) and give the request/response models their own names.

Only BentoML versions known to carry the bug are patched; anything else is left alone.
(The form handling BentoML gets wrong — text in a file field fetched as a URL, malformed
forms as 500s — is refused before BentoML sees it, by http_guard.RequestGuard.)
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

log = logging.getLogger(__name__)

__all__ = ["apply", "PATCHED_VERSIONS"]

PATCHED_VERSIONS = ("1.4.",)
ORIGINAL: dict = {}  # BentoML's own methods, kept for the tests that show the bugs


async def _timeout_call(self, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    # An empty context: a cancelled handle can sit in the loop's timer heap until its time
    # comes, and a copy of the request's context (asyncio's default) would sit with it.
    timer = loop.call_later(
        self.timeout, self._set_timer_out, waiter, context=contextvars.Context()
    )

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except asyncio.TimeoutError:
        if fut.cancel():
            error = f"Not able to process the request in {self.timeout} seconds"
            await JSONResponse({"error": error}, status_code=504)(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()  # the fix: release the request's context now, not after the timeout


def apply() -> bool:
    """Patch what this BentoML gets wrong, if it is a version known to; True if patched."""
    import bentoml
    from bentoml._internal.server.http import traffic

    if not bentoml.__version__.startswith(PATCHED_VERSIONS):
        log.info("bentoml %s: TimeoutMiddleware left as it is", bentoml.__version__)
        return False
    for key, owner, name, fix in (("call", traffic.TimeoutMiddleware, "__call__", _timeout_call),):
        if owner.__dict__.get(name) is not fix:
            ORIGINAL.setdefault(key, owner.__dict__[name])
            setattr(owner, name, fix)
    return True


def document_errors() -> None:
    """/docs.json with ErrorBody responses for every error status of every endpoint."""
    import io
    import json

    import bentoml

    from protonmf.api.schemas import with_error_responses, without_io_suffix

    generated = ORIGINAL.setdefault("openapi_spec", bentoml.Service.openapi_spec)

    def documented(service):
        spec = generated.fget(service)
        body = with_error_responses(without_io_suffix(spec.asdict()))
        # back into BentoML's spec class (its own descriptions hold emoji: no ASCII escaping)
        return type(spec).from_yaml_file(io.StringIO(json.dumps(body, ensure_ascii=False)))

    bentoml.Service.openapi_spec = property(documented)
