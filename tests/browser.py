"""Headless Debian Chromium driven over the Chrome DevTools Protocol (a websocket from
aiohttp, which BentoML already depends on): no Playwright, no downloaded browser build."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from served import start_process, stop_process

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


def chromium() -> str:
    """The browser; in CI it must be there (scripts/install_deploy_tools.sh installs it)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI: run scripts/install_deploy_tools.sh")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return CHROMIUM


# Both ways of running it: headless, no first-run work, and every request that is not to
# loopback sent to a dead proxy (port 9; loopback bypasses it, Chromium's implicit rule).
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--proxy-server=127.0.0.1:9",
    "--disable-background-networking",
    "--disable-component-update",
    "--hide-scrollbars",
)


def browse(url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on ``url`` (``--dump-dom``, ``--screenshot=PATH``, ...),
    loopback included in what goes to the dead proxy: for pages that must need nothing."""
    cmd = [chromium(), *OFFLINE_FLAGS, "--proxy-bypass-list=<-loopback>", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


class Page:
    """One tab: ``send`` a CDP command, wait for events, evaluate JavaScript."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, size: tuple[int, int]):
        self.ws, self.size = ws, size
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.waiters: list[tuple[str, asyncio.Future]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                self.events.append(data)
                for method, fut in list(self.waiters):
                    if method == data["method"] and not fut.done():
                        fut.set_result(data.get("params", {}))
                        self.waiters.remove((method, fut))

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 60)

    def expect(self, method: str) -> asyncio.Future:
        """A future for the next ``method`` event (arm it before what causes the event)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((method, fut))
        return fut

    async def js(self, expression: str):
        r = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")

    async def key(self, key: str, code: str | None = None, text: str = "") -> None:
        """A real key press (keydown + keyup) to the focused element."""
        codes = {
            " ": ("Space", 32),
            "Enter": ("Enter", 13),
            "ArrowRight": ("ArrowRight", 39),
            "ArrowDown": ("ArrowDown", 40),
            "Tab": ("Tab", 9),
        }
        code, vk = codes.get(key, (code or key, 0))
        down = {"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk}
        if text:
            down["text"] = text
        await self.send("Input.dispatchKeyEvent", **down)
        await self.send(
            "Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk
        )

    async def screenshot(self, path: Path) -> Path:
        """The whole page: the viewport made as tall as the document for the shot
        (captureBeyondViewport left some off-screen images undrawn)."""
        width, height = self.size
        full = await self.js("Math.ceil(document.documentElement.scrollHeight)")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=max(height, full),
            deviceScaleFactor=1,
            mobile=False,
        )
        try:
            await self.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            r = await self.send("Page.captureScreenshot", format="png")
        finally:
            await self.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    def request_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()


class Browser:
    """``async with Browser(workdir) as open_page: page = await open_page()``. Every
    request that is not to loopback goes to a dead proxy (port 9)."""

    def __init__(self, workdir: Path, width: int = 1280, height: int = 900):
        self.workdir, self.size = workdir, (width, height)

    async def __aenter__(self):
        self.log = self.workdir / "chromium.log"
        self.proc = start_process(
            [
                chromium(),
                *OFFLINE_FLAGS,
                "--remote-debugging-port=0",
                f"--user-data-dir={self.workdir / 'profile'}",
                "--disable-sync",
                "--disable-extensions",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            self.log,
        )
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", self.log.read_text())
            if m:
                port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {self.log.read_text()[-2000:]}")
            else:
                await asyncio.sleep(0.1)
        self.session = aiohttp.ClientSession()
        self.http = f"http://127.0.0.1:{port}"
        return self.open_page

    async def open_page(self) -> Page:
        async with self.session.get(f"{self.http}/json/list") as r:
            targets = [t for t in await r.json() if t["type"] == "page"]
        ws = await self.session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws, self.size)
        for domain in ("Page", "Runtime", "Network", "DOM"):
            await page.send(f"{domain}.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.size[0],
            height=self.size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        return page

    async def __aexit__(self, *exc):
        await self.session.close()
        stop_process(self.proc)
