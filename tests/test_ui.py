"""The /ui explanation viewer end to end: a real `protonmf serve`, the page in headless
Chromium (tests/browser.py, DevTools protocol): upload, explanation, a prototype switched
off by keyboard (its counterfactual equals /explain's), the atlas, API errors' reasons;
screenshots checked non-blank; no request leaves the service."""

import asyncio
import base64
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from browser import Browser
from helpers import FASHION_DATA
from PIL import Image
from served import serve

UPLOAD = FASHION_DATA / "test" / "bag" / "00030.png"
MAX_BYTES = 20_000  # the server's limit on one image, so that a "large" one is small here


def check_screenshot(path: Path, min_colours: int = 200) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"), np.int64)
    assert pixels.std() > 20, f"blank screenshot {path}"
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colours) > min_colours, (path, len(colours))


async def drive(url: str, out: Path) -> dict:
    """Everything the page must do, against the server at ``url``; returns measurements."""
    found = {}
    async with Browser(out) as open_page:
        page = await open_page()
        loaded = page.expect("Page.loadEventFired")
        await page.send("Page.navigate", url=f"{url}/ui/")
        await asyncio.wait_for(loaded, 30)
        found["load_ms"] = await page.js(
            "performance.getEntriesByType('navigation')[0].loadEventEnd"
        )
        await page.wait_for("document.body.dataset.ready")
        assert await page.js("document.body.dataset.ready") == "true", await page.js(
            "document.querySelector('#error').textContent"
        )
        model = httpx.post(f"{url}/model", json={}, timeout=30).json()

        # Upload an image through the file input; wait for the explanation and its strips.
        doc = await page.send("DOM.getDocument")
        node = await page.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        await page.send("DOM.setFileInputFiles", files=[str(UPLOAD)], nodeId=node["nodeId"])
        await page.wait_for("document.querySelector('#result').dataset.state === 'explained'")
        top_k = int(await page.js("Number(document.querySelector('#top-k').value)"))
        rows = await page.js("[...document.querySelectorAll('.proto-row')].length")
        assert rows == top_k * model["p"]
        shown = await page.js(
            "[...document.querySelectorAll('#topk tbody tr')].map(r => r.dataset.class)"
        )
        blob = UPLOAD.read_bytes()
        body = {"images_base64": [base64.b64encode(blob).decode()], "top_k": top_k}
        api = httpx.post(f"{url}/explain", json={**body, "heatmaps": False}, timeout=60).json()
        assert shown == [c["class"] for c in api["explanations"][0]["top_k"]]
        assert shown[0] == "bag"
        maps = await page.js("document.querySelectorAll('canvas.map').length")
        assert maps == (rows if model["heatmap_classes"] else 0)
        if model["exemplars"]:
            await page.wait_for(
                f"document.querySelectorAll('.proto-row .strip img').length === {rows}"
            )
            await page.wait_for(
                "[...document.querySelectorAll('.strip img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        check_screenshot(await page.screenshot(out / "explanation.png"), 2000)

        # Switch the top class's prototype 1 off with the keyboard (focus + Space).
        cls = shown[0]
        index = api["explanations"][0]["top_k"][0]["index"]
        await page.js(f"document.querySelector('#off-{index}-1').focus()")
        await page.key(" ", text=" ")
        await page.wait_for("document.querySelector('#counterfactual').dataset.state === 'ready'")
        assert await page.js(f"document.querySelector('#off-{index}-1').checked")
        logits = await page.js(
            "Object.fromEntries([...document.querySelectorAll("
            "'#cf-logits tbody tr')].map(r => [r.dataset.class, "
            "Number(r.dataset.logit)]))"
        )
        new_top = await page.js(
            "[...document.querySelectorAll('#cf-topk tbody tr')]"
            ".map(r => [r.dataset.class, Number(r.dataset.logit)])"
        )
        want = httpx.post(
            f"{url}/explain",
            json={**body, "heatmaps": False, "interventions": [{"class": cls, "prototype": 1}]},
            timeout=60,
        ).json()["explanations"][0]["intervention"]
        assert logits == want["logits"]  # the same doubles (JSON → JS → text → float)
        assert new_top == [[c["class"], c["logit"]] for c in want["top_k"]]
        assert want["logits"][cls] != api["explanations"][0]["top_k"][0]["logit"]
        check_screenshot(await page.screenshot(out / "counterfactual.png"), 2000)
        found["counterfactual"] = want

        # An API error is shown with its reason: a file that is not an image.
        bad = out / "not-an-image.png"
        bad.write_bytes(b"this is not a PNG")
        await page.send("DOM.setFileInputFiles", files=[str(bad)], nodeId=node["nodeId"])
        await page.wait_for("!document.querySelector('#error').hidden")
        error = await page.js("document.querySelector('#error').textContent")
        assert "unsupported_format" in error and "415" in error, error
        # Large images meet the service's own limits (here PROTONMF_MAX_BYTES, see below).
        big = out / "too-large.png"
        noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), np.uint8)
        Image.fromarray(noise).save(big)
        assert big.stat().st_size > MAX_BYTES
        await page.send("DOM.setFileInputFiles", files=[str(big)], nodeId=node["nodeId"])
        await page.wait_for("document.querySelector('#error').textContent.includes('too_large')")
        error = await page.js("document.querySelector('#error').textContent")
        assert "413" in error and f"the limit is {MAX_BYTES}" in error, error

        # The atlas: keyboard to the tab (ArrowRight from the first), a class, its strips.
        await page.js("document.querySelector('#tab-explain').focus()")
        await page.key("ArrowRight")
        await page.wait_for("!document.querySelector('#view-atlas').hidden")
        await page.wait_for("document.querySelector('#atlas-detail').dataset.state === 'ready'")
        n_options = await page.js("document.querySelector('#atlas-class').options.length")
        assert n_options == len(model["classes"])
        await page.js("document.querySelector('#atlas-filter').focus()")
        for ch in "bag":
            await page.key(ch, code=f"Key{ch.upper()}", text=ch)
        await page.key("Enter")
        await page.wait_for("document.querySelector('#atlas-detail').dataset.class === 'bag'")
        protos = await page.js("document.querySelectorAll('.atlas-proto').length")
        assert protos == model["p"]
        if model["exemplars"]:
            await page.wait_for(
                "[...document.querySelectorAll('.atlas-proto .strip img')]"
                ".length > 0 && [...document.querySelectorAll('.atlas-proto "
                ".strip img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        check_screenshot(await page.screenshot(out / "atlas.png"), 2000)

        # Nothing but the service (and data:/blob: URLs the page made itself).
        urls = page.request_urls()
        assert urls and all(u.startswith((url + "/", "data:", "blob:")) for u in urls), urls
        found["requests"] = len(urls)
        await page.close()
    return found


def test_ui_files_are_served_self_contained():
    """The mounted app alone (no model): the page, its script, style and samples, with the
    CSP header; no absolute URL anywhere in them (everything relative to /ui/)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from protonmf.service.rest.webui import UI_DIR, app

    with TestClient(Starlette(routes=[Mount("/ui", app)])) as client:  # as BentoML mounts it
        page = client.get("/ui/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("app.js", "style.css", "samples/bag.png"):
            assert client.get(f"/ui/{name}").status_code == 200, name
        assert client.get("/ui/%2e%2e/webui.py").status_code == 404
    for f in (UI_DIR / "index.html", UI_DIR / "app.js", UI_DIR / "style.css"):
        text = f.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text, re.I), f
    samples = re.search(r"const SAMPLES = \[(.*?)\]", (UI_DIR / "app.js").read_text()).group(1)
    for name in re.findall(r'"(\w+)"', samples):
        assert (UI_DIR / "samples" / f"{name}.png").is_file(), name


@pytest.mark.e2e  # ~8 s per graph on 2 cores, after the conversion fixture (~40 s)
@pytest.mark.parametrize("graph", ["all-class", "top-k"])
def test_ui_end_to_end(graph, fashion_artifact, fashion_topk_artifact, tmp_path):
    artifact = fashion_artifact if graph == "all-class" else fashion_topk_artifact
    with serve(artifact, tmp_path, env={"PROTONMF_MAX_BYTES": str(MAX_BYTES)}) as served:
        found = asyncio.run(drive(served.url, tmp_path))
    (tmp_path / "found.json").write_text(json.dumps(found, indent=2))
    assert found["load_ms"] < 1000, found  # navigation start → load event, locally
