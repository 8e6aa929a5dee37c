"""BentoML 1.4's bugs and what stands between them and a client, each fix next to the bug
shown on BentoML's own code: service/bentoml_fixes.py (the request timeout releases a
request once answered) and service/http_guard.py (forms checked before BentoML parses them:
nothing fetched, malformed ones 400s; bodies read before a slot is taken)."""

import asyncio
import contextvars
import gc
import weakref

import pytest

from protonmf.service.rest import bentoml_fixes

REQUEST = contextvars.ContextVar("request")


class Payload:
    """Stands in for what a request keeps in its context (a tracing span, say)."""


def middleware(app, timeout):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    assert bentoml_fixes.apply()  # the pinned BentoML 1.4 is patched
    return TimeoutMiddleware(app, timeout=timeout)


async def call(mw) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    await mw({"type": "http", "path": "/explain"}, receive, send)
    return sent


def released_after_answer(mw) -> bool:
    """Serve one request the way uvicorn does (a task per request, with what outer
    middlewares put in its context: a tracing span, say); once it is answered and the
    task is gone, is that context released?"""
    ref = {}

    async def request():
        payload = Payload()
        ref["payload"] = weakref.ref(payload)
        REQUEST.set(payload)
        del payload
        return await call(mw)

    async def main():
        sent = await asyncio.create_task(request())
        assert sent[0]["status"] == 200
        for _ in range(3):  # let the loop drop its own references to the finished task
            await asyncio.sleep(0)
        gc.collect()
        return ref["payload"]() is None

    return asyncio.run(main())


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_answered_request_is_released_before_the_timeout():
    assert released_after_answer(middleware(ok_app, timeout=60))


def test_bentoml_original_keeps_the_request_until_the_timeout(monkeypatch):
    """The bug the patch fixes, shown on BentoML's own method (so the test above can fail)."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    mw = middleware(ok_app, timeout=60)
    monkeypatch.setattr(TimeoutMiddleware, "__call__", bentoml_fixes.ORIGINAL["call"])
    assert not released_after_answer(mw)


def test_slow_request_still_gets_504():
    async def app(scope, receive, send):
        await asyncio.sleep(5)

    sent = asyncio.run(call(middleware(app, timeout=0.05)))
    assert sent[0]["status"] == 504


def test_unknown_bentoml_versions_are_left_alone(monkeypatch):
    import bentoml
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    before = TimeoutMiddleware.__call__
    monkeypatch.setattr(bentoml, "__version__", "1.5.0")
    assert bentoml_fixes.apply() is False
    assert TimeoutMiddleware.__call__ is before


# --- forms: BentoML's serde fetches and fails; the guard refuses first ------------------


@pytest.fixture(scope="module")
def explain_input():
    """/explain's input model: ``images`` is a file field (list[Path])."""
    from protonmf.service.service import ProtoNMFService

    spec = ProtoNMFService.apis["explain"].input_spec
    assert "images" in spec.multipart_fields
    return spec


@pytest.fixture
def fetches(monkeypatch) -> list[str]:
    """Every URL httpx is asked to GET; none is (the request fails before leaving)."""
    import httpx

    urls = []

    async def get(self, url, *args, **kwargs):
        urls.append(str(url))
        raise httpx.ConnectError("no network in this test")

    monkeypatch.setattr(httpx.AsyncClient, "get", get)
    return urls


def scope_for(content_type: str, body: bytes, in_app: bool = True) -> dict:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/explain",
        "query_string": b"",
        "headers": [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    if in_app:
        scope["app"] = object()  # as in a running server: starlette answers its own 400s
    return scope


async def silent():
    await asyncio.sleep(3600)  # a client that sent its headers and nothing else


def receiver(body: bytes, chunks: int = 1, delay: float = 0.0):
    parts = [body[i * len(body) // chunks : (i + 1) * len(body) // chunks] for i in range(chunks)]

    async def receive():
        if not parts:
            await silent()
        if delay:
            await asyncio.sleep(delay)
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    return receive


def form(parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in parts:
        file = f'; filename="{filename}"' if filename else ""
        out += (
            f'--b\r\nContent-Disposition: form-data; name="{name}"{file}\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    return out + b"--b--\r\n"


FORM = "multipart/form-data; boundary=b"


def bentoml_parse(body: bytes, content_type: str, spec, in_app: bool = True):
    """``spec`` from the form ``body`` by BentoML's own MultipartSerde (unpatched)."""
    from _bentoml_impl.serde import MultipartSerde
    from starlette.requests import Request

    request = Request(scope_for(content_type, body, in_app), receiver(body))
    return asyncio.run(MultipartSerde().parse_request(request, spec))


def status_of(call) -> int:
    """The HTTP status BentoML's app gives what ``call`` raises (its api_endpoint_wrapper:
    ValidationError 400, BentoMLException its code, anything else 500)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    try:
        call()
    except ValidationError:
        return 400
    except BentoMLException as e:
        return e.error_code.value
    except Exception:  # noqa: BLE001 - BentoML's catch-all
        return 500
    return 200


def guarded(body: bytes, content_type: str = FORM, in_app: bool = True, **limits):
    """(status, JSON body or None, whether the app behind the guard was called)."""
    import json

    from protonmf.service.rest.guard import RequestGuard

    reached = []

    async def app(scope, receive, send):
        message = await receive()
        reached.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    options = dict(
        paths=["/explain"],
        file_fields=["images"],
        max_body_bytes=1 << 24,
        body_timeout_s=5.0,
        max_concurrency=4,
        max_parts=32,
    )
    guard = RequestGuard(app, **{**options, **limits})
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope_for(content_type, body, in_app), receiver(body), send))
    payload = sent[1]["body"]
    return sent[0]["status"], (json.loads(payload) if sent[0]["status"] != 200 else None), reached


TEXT_VALUES = [b"file:///etc/passwd", b"/etc/passwd", b"http://169.254.169.254/latest/"]


@pytest.mark.parametrize("value", TEXT_VALUES, ids=["file_url", "path", "http_url"])
def test_text_in_a_file_field_is_a_400_and_nothing_is_fetched(fetches, value):
    status, body, reached = guarded(form([("images", value, None)]))
    assert (status, body["reason"], reached, fetches) == (400, "not_a_file", [], [])


@pytest.mark.parametrize("value", TEXT_VALUES, ids=["file_url", "path", "http_url"])
def test_bentoml_original_fetches_a_text_file_field(explain_input, fetches, value):
    """The bug: the text goes to httpx.get as a URL (the real one GETs an http URL and
    refuses a path or file:// with an exception BentoML answers with a 500)."""
    body = form([("images", value, None)])
    assert status_of(lambda: bentoml_parse(body, FORM, explain_input)) == 500
    assert fetches == [value.decode()]


MALFORMED = {
    "no boundary": (form([("top_k", b"1", None)]), "multipart/form-data"),
    "1001 fields": (form([("top_k", b"1", None)] * 1001), FORM),
    "field over 1 MiB": (form([("top_k", b"1" * ((1 << 20) + 1), None)]), FORM),
}


@pytest.mark.parametrize("name", MALFORMED)
@pytest.mark.parametrize("in_app", [True, False], ids=["in_app", "bare"])
def test_malformed_form_is_a_400(explain_input, name, in_app):
    body, content_type = MALFORMED[name]
    status, answer, reached = guarded(body, content_type, in_app=in_app)
    assert (status, answer["reason"], reached) == (400, "malformed_multipart", [])
    assert answer["error"].startswith("malformed form: ")
    # the bug: starlette's exception is not BentoML's, so BentoML's app answers 500
    assert status_of(lambda: bentoml_parse(body, content_type, explain_input, in_app=in_app)) == 500


def test_plain_field_sent_as_a_file_of_bytes_that_are_not_text(explain_input):
    """400, where BentoML's json.loads raised UnicodeDecodeError (500)."""
    body = form([("top_k", b"\xff\xfe\x00", "top_k.bin")])
    status, answer, _ = guarded(body)
    assert (status, answer["reason"]) == (400, "malformed_multipart")
    assert status_of(lambda: bentoml_parse(body, FORM, explain_input)) == 500
    ok = form([("top_k", b"2", "top_k.txt")])
    assert guarded(ok)[0] == 200 and bentoml_parse(ok, FORM, explain_input).top_k == 2


def test_a_good_form_reaches_the_app_with_its_body_intact():
    body = form([("images", b"\x89PNG...", "a.png"), ("top_k", b"2", None)])
    status, _, reached = guarded(body)
    assert status == 200 and reached == [body]


# --- bodies: read in full before a slot is taken; slow or huge ones refused -----------------


def run_guard(scope, receive, **limits):
    from protonmf.service.rest.guard import RequestGuard

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    options = dict(
        paths=["/explain"],
        file_fields=["images"],
        max_body_bytes=1 << 20,
        body_timeout_s=5.0,
        max_concurrency=4,
        max_parts=32,
    )
    guard = RequestGuard(app, **{**options, **limits})
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_slow_body_is_408_and_huge_body_413_before_reading_it():
    body = b'{"images_base64": []}'
    scope = scope_for("application/json", body)
    status, answer = run_guard(scope, receiver(body, chunks=3, delay=0.2), body_timeout_s=0.3)
    assert status == 408 and b"body_timeout" in answer
    assert run_guard(scope, receiver(body, chunks=3, delay=0.05), body_timeout_s=1.0)[0] == 200
    huge = scope_for("application/json", b"x" * 2048)
    status, answer = run_guard(huge, receiver(b""), max_body_bytes=1024)
    assert status == 413 and b"body_too_large" in answer


def test_clients_that_send_only_headers_do_not_take_slots():
    """Four clients stuck in their bodies; a fifth, complete request is still served."""
    from protonmf.service.rest.guard import RequestGuard

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = RequestGuard(
        app,
        paths=["/explain"],
        file_fields=["images"],
        max_body_bytes=1 << 20,
        body_timeout_s=0.5,
        max_concurrency=1,
        max_parts=32,
    )
    body = b"{}"

    async def main():
        statuses = []

        def sender():
            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            return send

        stuck = [
            asyncio.create_task(guard(scope_for("application/json", body), silent, sender()))
            for _ in range(4)
        ]
        await asyncio.sleep(0.05)
        await guard(scope_for("application/json", body), receiver(body), sender())
        first = statuses[0]
        await asyncio.gather(*stuck)
        return first, statuses[1:]

    first, rest = asyncio.run(main())
    assert first == 200 and rest == [408] * 4


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
