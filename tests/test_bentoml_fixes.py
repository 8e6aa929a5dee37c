"""service/bentoml_fixes.py: the request-timeout middleware releases a request when answered."""

import asyncio
import contextvars
import gc
import weakref

import pytest

from service import bentoml_fixes

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


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
