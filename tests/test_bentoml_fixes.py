"""service/bentoml_fixes.py: the request-timeout middleware releases a request when
answered; forms are parsed without fetching anything, malformed ones are 400s. Each fix
next to the bug it fixes, shown on BentoML's original."""

import asyncio
import contextvars
import gc
import weakref

import pytest

from protonmf.service import bentoml_fixes

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
    from _bentoml_impl.serde import MultipartSerde
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    before = [TimeoutMiddleware.__call__, MultipartSerde.parse_request]
    monkeypatch.setattr(bentoml, "__version__", "1.5.0")
    assert bentoml_fixes.apply() is False
    assert [TimeoutMiddleware.__call__, MultipartSerde.parse_request] == before


# --- forms: nothing fetched, malformed ones are 400s ----------------------------------------


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


def request(body: bytes, content_type: str, in_app: bool = True):
    """A starlette request as BentoML's app hands it to a serde (``app`` in its scope, as
    in a running server: starlette then turns a malformed form into its own 400)."""
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/explain", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())]}  # fmt: skip
    if in_app:
        scope["app"] = object()
    sent = False

    async def receive():
        nonlocal sent
        more, sent = sent, True
        return {"type": "http.request", "body": b"" if more else body, "more_body": False}

    return Request(scope, receive)


def form(parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in parts:
        file = f'; filename="{filename}"' if filename else ""
        out += (f'--b\r\nContent-Disposition: form-data; name="{name}"{file}\r\n\r\n'.encode()
                + value + b"\r\n")  # fmt: skip
    return out + b"--b--\r\n"


FORM = "multipart/form-data; boundary=b"


def parse(body: bytes, content_type: str, spec, original: bool = False, in_app: bool = True):
    """``spec`` from the form ``body``, by the patched MultipartSerde or BentoML's own."""
    from _bentoml_impl.serde import MultipartSerde

    assert bentoml_fixes.apply()
    method = bentoml_fixes.ORIGINAL["multipart"] if original else MultipartSerde.parse_request
    return asyncio.run(method(MultipartSerde(), request(body, content_type, in_app), spec))


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


TEXT_VALUES = [b"file:///etc/passwd", b"/etc/passwd", b"http://169.254.169.254/latest/"]


@pytest.mark.parametrize("value", TEXT_VALUES, ids=["file_url", "path", "http_url"])
def test_text_in_a_file_field_is_a_400_and_nothing_is_fetched(explain_input, fetches, value):
    body = form([("images", value, None)])
    with pytest.raises(Exception, match=r"\[not_a_file\]") as e:
        parse(body, FORM, explain_input)
    assert e.value.error_code == 400 and fetches == []
    urlencoded = b"images=" + value
    assert status_of(lambda: parse(urlencoded, "application/x-www-form-urlencoded",
                                   explain_input)) == 400  # fmt: skip
    assert fetches == []


@pytest.mark.parametrize("value", TEXT_VALUES, ids=["file_url", "path", "http_url"])
def test_bentoml_original_fetches_a_text_file_field(explain_input, fetches, value):
    """The bug: the text goes to httpx.get as a URL (the real one GETs an http URL and
    refuses a path or file:// with an exception BentoML answers with a 500)."""
    body = form([("images", value, None)])
    assert status_of(lambda: parse(body, FORM, explain_input, original=True)) == 500
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
    with pytest.raises(Exception, match=r"malformed form: .*\[malformed_multipart\]") as e:
        parse(body, content_type, explain_input, in_app=in_app)
    assert e.value.error_code == 400
    # the bug: starlette's exception is not BentoML's, so BentoML's app answers 500
    assert status_of(lambda: parse(body, content_type, explain_input,
                                   original=True, in_app=in_app)) == 500  # fmt: skip


def test_plain_field_sent_as_a_file_of_bytes_that_are_not_text(explain_input):
    """A validation error (400), where BentoML's json.loads raised UnicodeDecodeError (500)."""
    body = form([("top_k", b"\xff\xfe\x00", "top_k.bin")])
    assert status_of(lambda: parse(body, FORM, explain_input)) == 400
    assert status_of(lambda: parse(body, FORM, explain_input, original=True)) == 500
    assert parse(form([("top_k", b"2", "top_k.txt")]), FORM, explain_input).top_k == 2


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
