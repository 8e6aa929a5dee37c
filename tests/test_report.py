"""``protonmf report``: one self-contained HTML page, opened in headless Chromium offline."""

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import browse
from helpers import manifest_of, run_cli
from PIL import Image

from protonmf.analysis.report import bar_chart, build_report, class_shares
from protonmf.artifact import load_tensors, sha256_file
from protonmf.artifact.exemplars import EXEMPLARS_FILE, load_exemplars, save_exemplars


def _rewrite_exemplars(art: Path, ex) -> None:
    """Save changed exemplars into an artifact copy and fix the manifest's checksum."""
    save_exemplars(art / EXEMPLARS_FILE, ex)
    manifest = manifest_of(art)
    manifest["files"][EXEMPLARS_FILE] = sha256_file(art / EXEMPLARS_FILE)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def report_artifact(fashion_artifact, tmp_path_factory) -> Path:
    """The Fashion artifact (converted with exemplars) with some slots emptied: the
    prototype (0, 0) keeps 3 augmented exemplars and (1, 2) none."""
    art = tmp_path_factory.mktemp("report") / "artifact"
    shutil.copytree(fashion_artifact, art)
    ex = load_exemplars(art, manifest_of(art))
    assert ex is not None, "protonmf convert writes exemplars by default (--exemplars 8)"
    ex.index["augmented"][0, 0, 3:] = -1
    ex.index["augmented"][1, 2, :] = -1
    _rewrite_exemplars(art, ex)
    return art


class _Strips(HTMLParser):
    """Exemplar strips of a DOM: {(kind, class, prototype): number of img.exemplar}."""

    def __init__(self):
        super().__init__()
        self.strips, self.rows, self.srcs, self.plots = {}, set(), [], set()
        self._open, self._depth = None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "svg" and "plot" in classes:
            self.plots.add(a.get("id"))
        if tag == "div" and "prototype-row" in classes:
            self.rows.add((int(a["data-class"]), int(a["data-prototype"])))
        if tag == "div" and "exemplar-strip" in classes:
            self._open = (a["data-kind"], int(a["data-class"]), int(a["data-prototype"]))
            self.strips[self._open] = 0
            self._depth = 0
        elif tag == "div" and self._open:
            self._depth += 1
        if tag == "img" and "exemplar" in classes:
            assert self._open, "an exemplar image outside a strip"
            self.strips[self._open] += 1
            self.srcs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "div" and self._open:
            if self._depth == 0:
                self._open = None
            else:
                self._depth -= 1


def _external_refs(page: str) -> list[str]:
    """src/href values (and CSS url()/@import) that point anywhere but into the page."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, re.I)
    refs += re.findall(r"url\(\s*['\"]?([^)'\"]+)", page, re.I)
    bad = [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]
    return bad + re.findall(r"@import|<script|<link\b|<iframe", page, re.I)


@pytest.mark.e2e
def test_report_opens_offline_with_one_strip_per_prototype(report_artifact, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, stdout = run_cli(
        "report", report_artifact, "--max-images", 60, "--quiet", "--out", out, capsys=capsys
    )
    assert code == 0 and str(out) in stdout
    page = out.read_text()
    assert _external_refs(page) == []
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?://""", page, re.I)

    dom = browse(out.as_uri(), "--dump-dom").stdout
    parsed = _Strips()
    parsed.feed(dom)
    manifest = manifest_of(report_artifact)
    C, p = len(manifest["classes"]), manifest["p"]
    ex = load_exemplars(report_artifact, manifest)
    assert parsed.rows == {(c, i) for c in range(C) for i in range(p)}
    for kind in ("augmented", "nmf"):
        got = {(c, i): n for (k, c, i), n in parsed.strips.items() if k == kind}
        assert len(got) == C * p, kind
        want = {(c, i): int((ex.index[kind][c, i] >= 0).sum()) for c in range(C) for i in range(p)}
        assert got == want, kind
    assert parsed.strips[("augmented", 0, 0)] == 3 and parsed.strips[("augmented", 1, 2)] == 0
    assert all(s.startswith("data:image/png;base64,") for s in parsed.srcs)
    # Every key the evaluation gave has its plot (the p-sweep needs --sweep-p: not here).
    assert {"plot-ablation", "plot-explained-share", "plot-per-class-top1"} <= parsed.plots

    shot = tmp_path / "report.png"
    browse(out.as_uri(), f"--screenshot={shot}", "--window-size=1280,5000")
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int64)
    assert pixels.std() > 20, "blank screenshot"
    # The exemplar images decoded and were drawn (the atlas' first class is within 5,000 px):
    # grey crops under a colour ramp give tens of thousands of distinct colours, text and
    # plots a few thousand (measured: 34,700 with the images, 1,800 with img-src blocked).
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colours) > 8000, len(colours)


def test_report_without_exemplars_shows_reasons(fashion_artifact, tmp_path):
    """No exemplars: an atlas of numbers and a note. Keys that are unavailable show their
    reason, absent ones say so, odd shapes fall back to JSON; nothing raises."""
    art = tmp_path / "artifact"
    shutil.copytree(fashion_artifact, art)
    manifest = manifest_of(art)
    manifest.pop("exemplars", None)
    manifest["files"].pop(EXEMPLARS_FILE, None)
    (art / EXEMPLARS_FILE).unlink(missing_ok=True)
    (art / "manifest.json").write_text(json.dumps(manifest))
    evaluation = {
        "top1_accuracy": 0.9,
        "ablation": {"unavailable": "the graph has no pooled output"},
        "faithfulness": {"baselines": {"mean": {"unavailable": "no maps in this graph"}}},
        "intervention": [1, 2, 3],  # not a dict: shown as JSON
        "sweep": [
            {"p": 1, "feature_rel_error": 0.5, "nmf_only_top1": 0.2},
            {"p": 3, "feature_rel_error": 0.3, "nmf_only_top1": 0.4},
        ],
        "something_new": {"x": [1, 2]},
    }
    page = build_report(art, evaluation=evaluation)
    C, p = len(manifest["classes"]), manifest["p"]
    assert 'id="no-exemplars"' in page and 'class="exemplar-strip' not in page
    assert page.count('class="prototype-row"') == C * p
    assert "unavailable: the graph has no pooled output" in page
    assert "no maps in this graph" in page
    assert 'no "residual_share" key' in page
    assert 'id="plot-sweep-errors"' in page and 'id="plot-sweep-top1"' in page
    assert "something_new" in page
    assert _external_refs(page) == []

    page = build_report(art, evaluation={"unavailable": "no labelled images at /nowhere"})
    assert "evaluation unavailable: no labelled images at /nowhere" in page
    assert 'id="plot-explained-share"' in page  # from the tensors, no images needed


def test_explained_share_matches_projection(fashion_artifact):
    """The atlas' share of V carried by the NMF prototypes, against an independent
    reference: V's least-squares projection onto the rows of B."""
    manifest = manifest_of(fashion_artifact)
    tensors = load_tensors(fashion_artifact, manifest)
    folds = [d["fold"] for d in manifest["diagnostics"]["per_class"]]
    shares = class_shares(tensors, folds)
    for c, fold in enumerate(folds):
        V = tensors["class_vectors"][c].astype(np.float64)
        B = tensors["nmf_prototypes"][c].astype(np.float64)
        coef = np.linalg.lstsq(B.T, V, rcond=None)[0]
        proj = np.linalg.norm(coef @ B) / np.linalg.norm(V)
        want = 0.0 if fold in ("class_vector", "no_images") else proj
        assert shares["energy"][c] == pytest.approx(want**2, abs=2e-5), c
        assert shares["norm_ratio"][c] == pytest.approx(want, abs=2e-5), c
    page = build_report(fashion_artifact, evaluation={}, classes=["trouser"])
    assert page.count('class="atlas-class"') == 1
    c = manifest["classes"].index("trouser")
    assert f"<dd>{100 * shares['energy'][c]:.1f}%</dd>" in page
    explained = [c for c, f in enumerate(folds) if f not in ("class_vector", "no_images")]
    assert f"carry {100 * shares['energy'][explained].mean():.1f}% of the class" in page


def test_bar_heights_are_proportional():
    svg = bar_chart("t", "t", [("a", [0.9]), ("b", [0.45]), ("c", [-0.3])], ["s"])
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]* height="([\d.]+)"', svg)]
    assert heights[0] / heights[1] == pytest.approx(2.0, rel=0.02)
    assert heights[0] / heights[2] == pytest.approx(3.0, rel=0.02)
    assert "n/a" in bar_chart("t", "t", [("a", [None]), ("b", [float("nan")])], ["s"])


def test_chart_labels_are_escaped():
    """Names in plots (group labels, legends, tooltips, titles) reach the SVG as text."""
    name = '<img src=x onerror=alert(1)>"'
    svg = bar_chart(f"id-{name}", f"title {name}", [(name, [0.5, 0.2])], [name, "b"])
    assert "<img" not in svg and 'alert(1)>"' not in svg
    # id, aria-label, title, legend, group label, and 3 in the two bars' tooltips
    assert svg.count("&lt;img src=x onerror=alert(1)&gt;&#34;") == 8
