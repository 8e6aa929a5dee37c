"""A fix for BentoML 1.4's request-timeout middleware, applied when the service is imported.

``TimeoutMiddleware`` (bentoml/_internal/server/http/traffic.py) arms a ``loop.call_later``
timer per request and never cancels it. The timer's handle keeps a copy of the request's
contextvars (tracing span, request context) alive for the whole timeout (60 s here): under
32 clients the worker's GC-tracked objects grew from 127k to 278k in 45 s and each full
collection took ~220 ms with the GIL held (profiled with py-spy/perf, 2 vCPUs). The
replacement below is BentoML's own method (Apache-2.0) with the timer armed in an empty
context and cancelled once the request is answered; the 504-on-timeout behaviour is
unchanged (tests/test_bentoml_fixes.py).

Only BentoML versions known to carry the bug are patched; anything else is left alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

log = logging.getLogger(__name__)

__all__ = ["apply", "PATCHED_VERSIONS"]

PATCHED_VERSIONS = ("1.4.",)
ORIGINAL: dict = {}  # BentoML's own method, kept for the test that shows the bug


async def _timeout_call(self, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    # An empty context: a cancelled handle can sit in the loop's timer heap until its time
    # comes, and a copy of the request's context (asyncio's default) would sit with it.
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

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
    """Patch TimeoutMiddleware if this BentoML has the bug; True if patched."""
    import bentoml
    from bentoml._internal.server.http import traffic

    if not bentoml.__version__.startswith(PATCHED_VERSIONS):
        log.info("bentoml %s: TimeoutMiddleware left as is", bentoml.__version__)
        return False
    if traffic.TimeoutMiddleware.__call__ is not _timeout_call:
        ORIGINAL.setdefault("call", traffic.TimeoutMiddleware.__call__)
        traffic.TimeoutMiddleware.__call__ = _timeout_call
    return True
