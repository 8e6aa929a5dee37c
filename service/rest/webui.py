"""The explanation viewer: static HTML/JS/CSS (``service/ui/``) mounted at ``/ui``.

Plain files, no build step, nothing fetched from outside the service: the page talks only
to the service's own endpoints (``/model``, ``/explain``, ``/prototypes``,
``/prototype_image``). A Content-Security-Policy header lets the browser enforce that.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"

# Only the service's own origin; images also as data:/blob: (the uploaded image, PNG strips).
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'; "
    "form-action 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),  # revalidate (ETag): a new release is seen at once
]


class UiApp:
    """StaticFiles (index.html at ``/ui/``) with the security headers on every answer."""

    def __init__(self, directory: Path = UI_DIR) -> None:
        self.files = StaticFiles(directory=directory, html=True)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to start: answer the protocol
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return await self.files(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.files(scope, receive, send_with_headers)


app = UiApp()
