"""Hostile class names end to end: a model whose labels are HTML (folder names of its
ImageFolder, so the exemplar sources carry them too) is converted; the report and the /ui
viewer are opened in headless Chromium with the pages' CSP bypassed (the CSP alone would
stop an injected handler and hide the bug) and window.alert recorded. No handler may run,
no element may come from a name, and every name must read back as the literal text."""

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from browser import Browser
from helpers import FASHION_DATA, FASHION_MODEL, manifest_of, run_cli
from PIL import Image
from served import serve

# Linux folder names hold anything but "/" and NUL: no closing tags, but open ones do.
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(2)>',
    "<b>bold<b>",
    "<script>alert(3)",
    "x' onmouseover='alert(4)",
    "&lt;i&gt;amp",  # must show as typed: not decoded to <i>amp, not escaped twice
]

# Before any page script: alert & co. only record (a real dialog would block the page).
RECORD_ALERTS = """window.__alerts = [];
for (const f of ["alert", "confirm", "prompt"]) window[f] = (m) => { window.__alerts.push(String(m)); };"""

# What an injected name would leave in the DOM: an event handler attribute anywhere.
HANDLERS = (
    "[...document.querySelectorAll('*')].filter(e => [...e.attributes]"
    ".some(a => a.name.startsWith('on'))).map(e => e.outerHTML.slice(0, 120))"
)


@pytest.fixture(scope="module")
def hostile_artifact(tmp_path_factory) -> Path:
    """The Fashion model with its first classes renamed to HOSTILE, converted from a small
    ImageFolder of those names (20 training and 10 held-out images per class)."""
    root = tmp_path_factory.mktemp("xss")
    model = root / "model"
    shutil.copytree(FASHION_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    originals = config["label_names"]
    names = HOSTILE + originals[len(HOSTILE) :]
    config["label_names"] = names
    (model / "config.json").write_text(json.dumps(config, indent=2))
    for split, n in (("train", 20), ("test", 10)):
        for original, name in zip(originals, names, strict=True):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for f in sorted((FASHION_DATA / split / original).glob("*.png"))[:n]:
                shutil.copy(f, folder / f.name)
    out = root / "artifact"
    code, _ = run_cli(
        "convert",
        "--quiet",
        "--model",
        model,
        "--data",
        root / "data",
        "-p",
        2,
        "--exemplars",
        3,
        "--out",
        out,
    )
    assert code == 0
    assert manifest_of(out)["classes"] == names
    return out


async def open_hostile(open_page, url: str):
    """A tab with alerts recorded and the CSP bypassed, navigated to ``url``, loaded."""
    page = await open_page()
    await page.send("Page.addScriptToEvaluateOnNewDocument", source=RECORD_ALERTS)
    await page.send("Page.setBypassCSP", enabled=True)
    loaded = page.expect("Page.loadEventFired")
    await page.send("Page.navigate", url=url)
    await asyncio.wait_for(loaded, 30)
    return page


async def assert_inert(page, allowed_images: str) -> None:
    """No handler ran or exists, and no element a name could have made: scripts beyond the
    page's own, SVG outside the plots, <b>/<i> other than the page's, foreign images."""
    await page.js("new Promise(r => setTimeout(r, 300))")  # img onerror fires after load
    assert await page.js("window.__alerts") == []
    assert not [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
    assert await page.js(HANDLERS) == []
    assert await page.js("document.querySelectorAll('svg:not(.plot), i').length") == 0
    assert await page.js(
        "[...document.querySelectorAll('b')].every(b => /^prototype \\d+$/.test(b.textContent))"
    )
    bad = await page.js(
        f"[...document.images].filter(i => !({allowed_images})).map(i => i.outerHTML.slice(0, 120))"
    )
    assert bad == []


def check_screenshot(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"), np.int64)
    assert pixels.std() > 20, f"blank screenshot {path}"


@pytest.mark.e2e
def test_report_shows_hostile_names_as_text(hostile_artifact, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, _ = run_cli(
        "report", hostile_artifact, "--max-images", 40, "--quiet", "--out", out, capsys=capsys
    )
    assert code == 0
    page = out.read_text()
    for name in HOSTILE:
        assert name not in page, name  # only ever escaped in the source
    names = manifest_of(hostile_artifact)["classes"]

    async def check():
        async with Browser(tmp_path) as open_page:
            page = await open_hostile(open_page, out.as_uri())
            assert await page.js("document.scripts.length") == 0
            await assert_inert(
                page, "i.classList.contains('exemplar') && i.src.startsWith('data:image/png')"
            )
            atlas = await page.js(
                "[...document.querySelectorAll('.atlas-class')].map(s => "
                "[s.dataset.className, s.querySelector('h3').firstChild"
                ".textContent])"
            )
            assert atlas == [[n, n] for n in names]
            labels = await page.js(
                "[...document.querySelectorAll('#plot-per-class-top1 "
                "text')].map(t => t.textContent)"
            )
            assert set(names) <= set(labels)
            tips = await page.js("[...document.querySelectorAll('img.exemplar')].map(i => i.title)")
            # the exemplars' sources (FOLDER/FILE) carry the names too
            assert all(any(t.startswith(f"{n}/") for t in tips) for n in HOSTILE)
            text = await page.js("document.body.innerText")
            assert all(n in text for n in HOSTILE)
            await page.screenshot(tmp_path / "report.png")
            await page.close()

    asyncio.run(check())
    check_screenshot(tmp_path / "report.png")


async def drive_ui(url: str, upload: Path, names: list[str], out: Path) -> None:
    async with Browser(out) as open_page:
        page = await open_hostile(open_page, f"{url}/ui/")
        await page.wait_for("document.body.dataset.ready")
        assert await page.js("document.body.dataset.ready") == "true"
        # Every class in the explanation: the top-k table and one card per class.
        await page.js(f"document.querySelector('#top-k').value = '{len(names)}'")
        doc = await page.send("DOM.getDocument")
        node = await page.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        await page.send("DOM.setFileInputFiles", files=[str(upload)], nodeId=node["nodeId"])
        await page.wait_for("document.querySelector('#result').dataset.state === 'explained'")
        shown = await page.js(
            "[...document.querySelectorAll('#topk tbody th')].map(t => t.textContent)"
        )
        assert sorted(shown) == sorted(names)
        cards = await page.js(
            "[...document.querySelectorAll('.class-card')]"
            ".map(c => [c.dataset.class, c.querySelector('h3').textContent])"
        )
        assert [c for c, _ in cards] == shown
        assert all(h.endswith(f" {c}") for c, h in cards)
        # A hostile class's prototype off: the counterfactual names it.
        await page.js("document.querySelector('#off-0-0').click()")
        await page.wait_for("document.querySelector('#counterfactual').dataset.state === 'ready'")
        off = await page.js("document.querySelector('#cf-off').textContent")
        assert off == f"Off: {names[0]} #0"
        await page.wait_for(
            f"[...document.querySelectorAll('.proto-row .strip img')].length === {2 * len(names)}"
        )
        await assert_inert(
            page, "i.src.startsWith('blob:') || i.getAttribute('src').startsWith('samples/')"
        )
        await page.screenshot(out / "ui-explanation.png")

        # The atlas: the class list and a hostile class's page.
        await page.js("document.querySelector('#tab-atlas').click()")
        await page.wait_for("document.querySelector('#atlas-detail').dataset.state === 'ready'")
        options = await page.js(
            "[...document.querySelector('#atlas-class').options].map(o => o.textContent)"
        )
        assert options == [f"{i} · {n}" for i, n in enumerate(names)]
        for i in range(len(HOSTILE)):
            await page.js(
                f"{{ const s = document.querySelector('#atlas-class'); s.value = '{i}'; "
                "s.dispatchEvent(new Event('change')); }"
            )
            await page.wait_for(
                f"document.querySelector('#atlas-detail').dataset.class === {json.dumps(names[i])}"
            )
            title = await page.js("document.querySelector('#atlas-detail h2').textContent")
            assert title == f"{i} · {names[i]}"
        await page.wait_for(
            "[...document.querySelectorAll('.atlas-proto .strip img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        await assert_inert(
            page, "i.src.startsWith('blob:') || i.getAttribute('src').startsWith('samples/')"
        )
        await page.screenshot(out / "ui-atlas.png")
        await page.close()


@pytest.mark.e2e
def test_ui_shows_hostile_names_as_text(hostile_artifact, tmp_path):
    names = manifest_of(hostile_artifact)["classes"]
    upload = next((hostile_artifact.parent / "data" / "test" / names[0]).glob("*.png"))
    with serve(hostile_artifact, tmp_path) as served:
        asyncio.run(drive_ui(served.url, upload, names, tmp_path))
    for shot in ("ui-explanation.png", "ui-atlas.png"):
        check_screenshot(tmp_path / shot)
