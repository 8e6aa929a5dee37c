"""Fixes for BentoML 1.4 bugs, applied when the service is imported. Each replacement is
BentoML's own method (Apache-2.0) with the bug taken out; tests/test_bentoml_fixes.py shows
each bug on BentoML's original and its absence on the replacement.

1. ``TimeoutMiddleware`` (bentoml/_internal/server/http/traffic.py) arms a
   ``loop.call_later`` timer per request and never cancels it. The timer's handle keeps a
   copy of the request's contextvars (tracing span, request context) alive for the whole
   timeout (60 s here): under 32 clients the worker's GC-tracked objects grew from 127k to
   278k in 45 s and each full collection took ~220 ms with the GIL held (profiled with
   py-spy/perf, 2 vCPUs). The replacement arms the timer in an empty context and cancels it
   once the request is answered; the 504-on-timeout behaviour is unchanged.
2. Form fields fetched as URLs (``MultipartSerde.parse_request`` → ``ensure_file``,
   _bentoml_impl/serde.py): a text value in a file field (``images``) is taken for a URL
   and fetched with httpx: a request from the server to wherever the client says (loopback
   is blocked, anything else is fetched; a path or ``file://`` ends in a 500). The replacement fetches nothing: a text
   value in a file field is a 400 ``not_a_file``. (``JSONSerde`` fetches a body that is a
   URL only for single-argument "root" inputs with a file field; this service has none.)
3. Malformed forms ended in a 500 (a 400 from starlette, and a file part sent for a plain
   field with bytes that are not UTF-8, fell into BentoML's catch-all): now 400
   ``malformed_multipart`` and a validation error (400).

Only BentoML versions known to carry the bugs are patched; anything else is left alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
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


def _bad_input(message: str, reason: str):
    from bentoml.exceptions import BadInput

    return BadInput(f"{message} [{reason}]")  # 400, with the reason as the service writes it


async def _form(request):
    """The request's form; a malformed one (no boundary, too many parts, a field over
    1 MiB) is a 400 with starlette's reason."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        return await request.form()
    except MultiPartException as e:
        raise _bad_input(f"malformed form: {e.message}", "malformed_multipart") from e
    except HTTPException as e:  # starlette's own 400 for the above, inside an app
        if e.status_code >= 500:
            raise
        raise _bad_input(f"malformed form: {e.detail}", "malformed_multipart") from e


async def _multipart_parse_request(self, request, cls):
    """``MultipartSerde.parse_request`` that fetches nothing (file fields take uploads
    only) and answers a malformed form or a non-text plain field with a 400."""
    from typing import get_args

    from _bentoml_sdk.typing_utils import is_list_type, is_union_type
    from starlette.datastructures import UploadFile

    form = await _form(request)
    data: dict = {}
    for k in form:
        if k in cls.multipart_fields:
            value = form.getlist(k)
            if not all(isinstance(v, UploadFile) for v in value):  # the fix: no URL fetch
                raise _bad_input(f"{k!r} takes files; got a text value (URLs and paths are "
                                 "not fetched: upload the file itself)", "not_a_file")  # fmt: skip
            annotation = cls.model_fields[k].annotation
            if is_union_type(annotation):
                annotation = get_args(annotation)[0]
            if is_list_type(annotation):
                data[k] = value
            elif len(value) >= 1:
                data[k] = value[0]
        else:
            v = form[k]
            if isinstance(v, UploadFile):
                v = await v.read()
            try:
                data[k] = json.loads(v)
            except ValueError:  # not JSON, or bytes that are not text: validation decides
                data[k] = v
    return cls.model_validate(data)


def apply() -> bool:
    """Patch what this BentoML gets wrong, if it is a version known to; True if patched."""
    import bentoml
    from _bentoml_impl import serde
    from bentoml._internal.server.http import traffic

    if not bentoml.__version__.startswith(PATCHED_VERSIONS):
        log.info("bentoml %s: TimeoutMiddleware and MultipartSerde left as they are",
                 bentoml.__version__)  # fmt: skip
        return False
    for key, owner, name, fix in (
        ("call", traffic.TimeoutMiddleware, "__call__", _timeout_call),
        ("multipart", serde.MultipartSerde, "parse_request", _multipart_parse_request),
    ):
        if owner.__dict__.get(name) is not fix:
            ORIGINAL.setdefault(key, owner.__dict__[name])
            setattr(owner, name, fix)
    return True
