"""``protonmf report``: one self-contained HTML page about an artifact.

The page holds the evaluation numbers (``service.evaluate.evaluate``, or a saved
``protonmf evaluate --json``) with small inline SVG plots, a plain-language reading of them,
and the prototype atlas: per class, one row per prototype with its coefficient, fold and
exemplar strips (thumbnails with the presence map laid over, as data: URIs).

Nothing on the page loads anything: no scripts, fonts or stylesheets from elsewhere, and a
Content-Security-Policy that only allows inline styles and data: images. No torch: numpy,
Pillow and the standard library (the plots are hand-written SVG).

Stable hooks for tests and readers: ``#evaluation``, ``#reading``, ``#atlas``;
``.eval-block[data-key]`` per evaluation key (``.unavailable`` / ``.absent`` inside when
it has no numbers); ``svg.plot[id]``; ``.atlas-class[data-class]``;
``.prototype-row[data-class][data-prototype]``;
``.exemplar-strip[data-class][data-prototype][data-kind]`` holding one ``img.exemplar`` per
non-empty exemplar slot.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from protonmf.artifact import load_manifest, load_tensors
from protonmf.artifact.exemplars import load_exemplars

__all__ = ["build_report", "class_shares", "run_evaluation", "write_report"]

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
# Folds where prototype 0 is V itself: the NMF part explains nothing of the class.
WHOLE_VECTOR_FOLDS = ("class_vector", "no_images")
THUMB_MAX = 112  # pixels: larger crops are shrunk before encoding (page size)


# --------------------------------------------------------------------------- numbers


def _num(v) -> float | None:
    """A finite float, or None for anything else (absent, null, NaN, a string…)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v, percent: bool = False) -> str:
    x = _num(v)
    if x is None:
        return "—" if v is None else html.escape(str(v))
    if percent:
        return f"{100 * x:.1f}%"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"


def _unavailable(v) -> str | None:
    """The reason of a ``{"unavailable": reason}`` value, else None."""
    if isinstance(v, dict) and "unavailable" in v:
        return str(v["unavailable"])
    return None


def class_shares(tensors: dict, folds: list[str | None]) -> dict[str, np.ndarray]:
    """Per class, how much of V the NMF prototypes carry: ``energy`` = 1 − ‖R‖²/‖V‖² and
    ``norm_ratio`` = ‖aB‖/‖V‖ with aB = V − R (the fit's a: the stored coefficients are
    (1, 0, …) for whole-vector folds). Both 0 where the fold keeps V whole."""
    V = np.asarray(tensors["class_vectors"], np.float64)
    R = np.asarray(tensors["residuals"], np.float64)
    v2 = np.maximum((V**2).sum(1), 1e-300)
    energy = 1.0 - (R**2).sum(1) / v2
    norm_ratio = np.linalg.norm(V - R, axis=1) / np.sqrt(v2)
    whole = np.array([f in WHOLE_VECTOR_FOLDS for f in folds], bool)
    energy[whole] = 0.0
    norm_ratio[whole] = 0.0
    return {"energy": energy, "norm_ratio": norm_ratio}


# ------------------------------------------------------------------------- evaluation


def run_evaluation(artifact, data=None, max_images=None, progress=False) -> tuple[dict, list]:
    """``service.evaluate.evaluate`` on the artifact → (its dict, notes). A missing data
    folder becomes ``{"unavailable": reason}``: the atlas needs no images."""
    from protonmf.analysis.evaluate import evaluate

    params = inspect.signature(evaluate).parameters
    kwargs = {"progress": progress}
    notes = []
    if max_images is not None:
        if "max_images" in params:
            kwargs["max_images"] = max_images
        else:
            notes.append(f"--max-images {max_images} ignored: this evaluate() evaluates every "
                         "image")  # fmt: skip
    try:
        return evaluate(artifact, data, **kwargs), notes
    except FileNotFoundError as e:
        return {"unavailable": str(e)}, notes


# ------------------------------------------------------------------------------ SVG


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values, floor=None, ceil=None) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    lo = min([0.0, *vals])
    hi = max([0.0, *vals])
    if floor is not None:
        lo = min(lo, floor)
    if ceil is not None:
        hi = max(hi, ceil)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    return lo, hi


def _tick_label(t: float, percent: bool) -> str:
    return f"{100 * t:.0f}%" if percent else f"{t:.3g}"


def _text_w(text: str, px: float = 6.2) -> float:
    """Rough width of a label in the plots' 11 px font (no font metrics offline)."""
    return px * len(text)


def _legend(series: list[str], left: float, width: float) -> tuple[list[str], float]:
    """Legend items flowing in rows from y = 30 within ``width``: (SVG, height used)."""
    out, x, y = [], left, 30.0
    for k, name in enumerate(series):
        item_w = 20 + _text_w(name)
        if x > left and x + item_w > width - 8:
            x, y = left, y + 15
        colour = PALETTE[k % len(PALETTE)]
        out.append(f'<rect x="{x:.0f}" y="{y - 9:.0f}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14:.0f}" y="{y:.0f}">{html.escape(name)}</text>')  # fmt: skip
        x += item_w + 10
    return out, (y - 30 + 15) if series else 0.0


def _frame(plot_id: str, title: str, plot_w: float, series: list[str], left: int = 48):
    """Width, legend SVG and the plot's top edge for a chart of ``plot_w`` drawing width."""
    width = max(left + plot_w + 16, _text_w(title, 7.0) + 24, 220)
    legend, legend_h = _legend(series, left, width) if len(series) > 1 else ([], 0.0)
    top = 24 + legend_h + 12  # title, legend, then room for the value labels
    return int(width), legend, top


def _svg(plot_id: str, width: int, height: int, title: str, parts: list[str]) -> str:
    return "".join([
        f'<svg class="plot" id="{html.escape(plot_id)}" width="{width}" height="{height:.0f}" '
        f'viewBox="0 0 {width} {height:.0f}" role="img" aria-label="{html.escape(title)}">',
        f'<text class="plot-title" x="{width / 2:.0f}" y="14" text-anchor="middle">'
        f"{html.escape(title)}</text>",
        *parts,
        "</svg>",
    ])  # fmt: skip


def _y_axis(lo, hi, y_of, left, right, percent) -> list[str]:
    out = []
    for t in _ticks(lo, hi):
        y = y_of(t)
        out.append(f'<line class="grid" x1="{left}" x2="{right:.0f}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end">'
                   f"{_tick_label(t, percent)}</text>")  # fmt: skip
    y0 = y_of(0.0) if lo <= 0 <= hi else y_of(lo)
    out.append(f'<line class="axis" x1="{left}" x2="{right:.0f}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
    return out


def bar_chart(plot_id: str, title: str, groups: list[tuple[str, list]], series: list[str],
              percent: bool = False, ceil: float | None = None) -> str:  # fmt: skip
    """Grouped bars: ``groups`` = [(label, [value per series])]; None values are left out
    (marked n/a). Negative values go below the zero line. Values are printed on the bars
    when there are few; each bar's tooltip has its value."""
    values = [_num(v) for _, vs in groups for v in vs]
    lo, hi = _range(values, ceil=ceil)
    n_s, n_bars = len(series), len(groups) * len(series)
    show_values = n_bars <= 12
    bar = 28 if show_values else (16 if n_bars <= 40 else max(3, 480 // max(n_bars, 1)))
    longest = max((_text_w(g) for g, _ in groups), default=0)
    group_w = n_s * bar + max(10, bar // 2)
    if len(groups) <= 8:  # room for the labels to stay horizontal
        group_w = max(group_w, min(longest + 12, 140))
    rotate = longest + 4 > group_w
    left, plot_h = 48, 150
    width, legend, top = _frame(plot_id, title, len(groups) * group_w, series, left)
    if lo < 0 and show_values:
        lo -= 0.12 * (hi - lo)  # room for the value label under a negative bar
    bottom = (min(longest, 110) * 0.72 + 16) if rotate else 24
    height = top + plot_h + bottom

    def y_of(v):
        return top + plot_h * (hi - v) / (hi - lo)

    out = legend + _y_axis(lo, hi, y_of, left, left + len(groups) * group_w, percent)
    y0 = y_of(min(max(0.0, lo), hi))
    for g, (label, vs) in enumerate(groups):
        gx = left + g * group_w + (group_w - n_s * bar) / 2
        for k, v in enumerate(vs):
            x = gx + k * bar
            v = _num(v)
            if v is None:
                out.append(f'<text class="na" x="{x + bar / 2:.1f}" y="{y0 - 3:.1f}" '
                           f'text-anchor="middle">n/a</text>')  # fmt: skip
                continue
            y1, y2 = sorted((y_of(v), y0))
            tip = html.escape(f"{label} · {series[k]}: {_fmt(v, percent)}")
            out.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y1:.1f}" width="{bar - 2}" '
                       f'height="{max(y2 - y1, 0.5):.1f}" fill="{PALETTE[k % len(PALETTE)]}">'
                       f"<title>{tip}</title></rect>")  # fmt: skip
            if show_values:
                ty = y1 - 3 if v >= 0 else y2 + 10
                out.append(f'<text class="value" x="{x + bar / 2:.1f}" y="{ty:.1f}" '
                           f'text-anchor="middle">{_fmt(v, percent)}</text>')  # fmt: skip
        cx = left + g * group_w + group_w / 2
        ly = top + plot_h + 14
        if rotate:
            out.append(f'<text x="{cx + 3:.1f}" y="{ly:.1f}" text-anchor="end" '
                       f'transform="rotate(-45 {cx + 3:.1f} {ly:.1f})">{html.escape(label)}</text>')
        else:
            out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" text-anchor="middle">'
                       f"{html.escape(label)}</text>")  # fmt: skip
    return _svg(plot_id, width, height, title, out)


def line_chart(plot_id: str, title: str, x: list, series: dict[str, list], xlabel: str = "",
               percent: bool = False, ceil: float | None = None) -> str:  # fmt: skip
    """Lines with markers over numeric x; None points are skipped."""
    xs = [_num(v) for v in x]
    values = [_num(v) for vs in series.values() for v in vs]
    lo, hi = _range(values, ceil=ceil)
    known = [v for v in xs if v is not None] or [0.0, 1.0]
    x_lo, x_hi = min(known), max(known)
    if x_hi - x_lo < 1e-12:
        x_hi = x_lo + 1
    left, plot_w, plot_h = 48, 300, 150
    width, legend, top = _frame(plot_id, title, plot_w, list(series), left)
    height = top + plot_h + 36

    def y_of(v):
        return top + plot_h * (hi - v) / (hi - lo)

    def x_of(v):
        return left + plot_w * (v - x_lo) / (x_hi - x_lo)

    out = legend + _y_axis(lo, hi, y_of, left, left + plot_w, percent)
    x_ticks = sorted(set(v for v in xs if v is not None)) if len(xs) <= 10 else None
    for t in x_ticks or _ticks(x_lo, x_hi, 6):
        out.append(f'<text x="{x_of(t):.1f}" y="{top + plot_h + 14:.0f}" text-anchor="middle">'
                   f"{t:.3g}</text>")  # fmt: skip
    if xlabel:
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h + 30:.0f}" '
                   f'text-anchor="middle">{html.escape(xlabel)}</text>')  # fmt: skip
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(x_of(a), y_of(_num(b)), a, b) for a, b in zip(xs, vs, strict=False)
               if a is not None and _num(b) is not None]  # fmt: skip
        if len(pts) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in pts)
            out.append(f'<polyline class="line" points="{path}" fill="none" '
                       f'stroke="{colour}" stroke-width="2"/>')  # fmt: skip
        if len(pts) <= 40:
            for px, py, a, b in pts:
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}">'
                           f"<title>{html.escape(name)} at {a:.3g}: {_fmt(b, percent)}</title>"
                           "</circle>")  # fmt: skip
    return _svg(plot_id, width, height, title, out)


# ----------------------------------------------------------------------- exemplars

# Heat colours for the presence maps: blue (low) → yellow → red (the strip's peak); low
# presence is also nearly transparent, so the image shows through where the prototype is not.
_STOPS = np.array([[49, 54, 149], [116, 173, 209], [254, 224, 144], [244, 109, 67],
                   [165, 0, 38]], np.float64)  # fmt: skip
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, k])
                 for k in range(3)], 1).astype(np.uint8)  # fmt: skip
CSS_GRADIENT = ",".join("#" + "".join(f"{int(x):02x}" for x in c) for c in _STOPS)


def overlay_png(thumb: np.ndarray, presence: np.ndarray, vmax: float) -> str:
    """uint8 crop (h, w[, 3]) + presence map (H, W) → data: URI of a PNG: the map,
    upsampled bilinearly, over the crop; colour and opacity grow with presence / vmax.
    Negative presence (Eq. 9's least squares allows it) is left uncoloured."""
    from PIL import Image

    img = Image.fromarray(thumb).convert("RGB")
    if max(img.size) > THUMB_MAX:
        scale = THUMB_MAX / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)),
                         Image.Resampling.LANCZOS)  # fmt: skip
    level = np.clip(np.nan_to_num(presence, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0)
    heat = Image.fromarray(level.astype(np.float32), mode="F").resize(img.size,
                                                                      Image.Resampling.BILINEAR)
    level = np.clip(np.asarray(heat), 0.0, 1.0)
    colour = _LUT[(level * 255).astype(np.uint8)].astype(np.float32)
    alpha = (0.75 * level**1.5)[..., None]
    out = np.asarray(img, np.float32) * 0.85 * (1 - alpha) + colour * alpha
    buf = io.BytesIO()
    Image.fromarray(out.round().astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def exemplar_strip(ex, c: int, i: int, kind: str) -> str:
    """One prototype's exemplars of one kind: one ``img.exemplar`` per non-empty slot, the
    maps on one scale (the strip's peak) so the images compare."""
    slots = ex.index[kind][c, i]
    scores = ex.score[kind][c, i]
    maps = ex.maps[kind][c, i]
    used = [s for s in range(len(slots)) if slots[s] >= 0]
    vmax = max([float(np.nanmax(maps[s])) for s in used if np.isfinite(maps[s]).any()] or [1.0])
    attrs = f'data-class="{c}" data-prototype="{i}" data-kind="{kind}"'
    if not used:
        return (f'<div class="exemplar-strip empty" {attrs}><p class="note">no conversion image '
                "shows this prototype</p></div>")  # fmt: skip
    cells = []
    for s in used:
        u = int(slots[s])
        source = ex.sources[u] if u < len(ex.sources) else f"#{u}"
        tip = html.escape(f"{source} — peak presence {_fmt(scores[s])}")
        cells.append(
            f'<figure class="exemplar-slot" data-slot="{s}">'
            f'<img class="exemplar" src="{overlay_png(ex.thumbnails[u], maps[s], vmax)}" '
            f'alt="{tip}" title="{tip}">'
            f'<figcaption>{_fmt(scores[s])}<br><span class="source">'
            f"{html.escape(Path(source).name)}</span></figcaption></figure>"
        )
    return (f'<div class="exemplar-strip" {attrs} data-scale="{vmax:.6g}">{"".join(cells)}'
            "</div>")  # fmt: skip


# ---------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;
 padding:0 20px 40px;color:#222;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.8em 0 .2em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;
 margin-top:1.6em}h3{margin:.2em 0}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}td.num{text-align:right}
.meta td:first-child{color:#555}
.eval-block{margin:1em 0;padding:.4em .8em;border-left:4px solid #4c72b0;background:#fafbfd}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
svg.plot{font-size:11px;background:#fff;border:1px solid #eee}
svg.plot text{fill:#333}svg.plot .plot-title{font-weight:600;font-size:12px}
svg.plot .grid{stroke:#eee}svg.plot .axis{stroke:#888}svg.plot .na{fill:#999;font-size:9px}
svg.plot .value{font-size:9px}
.unavailable,.absent,.note{color:#8a5a00;background:#fff6e0;padding:3px 8px;display:inline-block}
#reading li{margin:.3em 0}
.atlas-class{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em .8em}
.class-summary{color:#444;font-size:.9em;margin:.2em 0 .5em}
.fold{font-size:.75em;padding:1px 6px;border-radius:8px;background:#e8eef8;margin-left:.5em}
.fold-min_norm{background:#fde9d8}.fold-class_vector,.fold-no_images{background:#f6d5d5}
.prototype-row{display:flex;gap:12px;border-top:1px solid #eee;padding:6px 0}
.prototype-meta{flex:0 0 210px;font-size:.82em}
.prototype-meta dl{display:grid;grid-template-columns:auto auto;gap:0 8px;margin:0}
.prototype-meta dt{color:#666}.prototype-meta dd{margin:0;text-align:right}
.strips{flex:1;min-width:0}
.strip-label{font-size:.8em;color:#555;margin-bottom:2px}
.exemplar-strip{display:flex;flex-wrap:wrap;gap:4px}
.exemplar-slot{margin:0;text-align:center;font-size:.7em;width:92px}
img.exemplar{width:88px;height:88px;image-rendering:auto;border:1px solid #ccc;display:block}
.source{color:#777;overflow-wrap:anywhere}
details.nmf-exemplars summary{cursor:pointer;font-size:.8em;color:#555;margin-top:4px}
.colorbar{display:inline-block;width:160px;height:10px;vertical-align:middle}
.caption{color:#666;font-size:.85em}
pre{background:#f6f6f6;padding:6px;overflow-x:auto;font-size:.8em}
footer{margin-top:2em;color:#777;font-size:.8em}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_PERCENT_KEYS = ("accuracy", "top1", "top5", "top2", "share", "energy", "norm_ratio")


def _is_percent(key: str) -> bool:
    return any(k in key for k in _PERCENT_KEYS) and "n_" not in key


def _kv_table(d: dict, cls: str = "kv") -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
            cell = " · ".join(f"{html.escape(str(a))} {_fmt(b)}" for a, b in v.items())
        elif isinstance(v, (dict, list)):
            cell = f"<pre>{html.escape(json.dumps(v, indent=1, default=str)[:4000])}</pre>"
        else:
            cell = _fmt(v, _is_percent(k) and _num(v) is not None and abs(_num(v)) <= 1.5)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{cell}</td></tr>")
    return f'<table class="{cls}">{"".join(rows)}</table>'


def _block(key: str, title: str, body: str) -> str:
    return (f'<section class="eval-block" id="eval-{key}" data-key="{key}"><h3>'
            f"{html.escape(title)}</h3>{body}</section>")  # fmt: skip


def _guarded(key: str, title: str, value, render) -> str:
    """An evaluation block: the reason if unavailable, a note if absent, else ``render``;
    a value of an unexpected shape falls back to its JSON, so the page is always written."""
    reason = _unavailable(value)
    if reason is not None:
        return _block(key, title, f'<p class="unavailable">unavailable: {html.escape(reason)}</p>')
    if value is None:
        return _block(key, title, f'<p class="absent">not in this evaluation (no "{key}" key)</p>')
    try:
        return _block(key, title, render(value))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        return _block(key, title, f'<p class="note">unexpected shape ({html.escape(str(e))}):'
                                  f"</p>{_kv_table({key: value})}")  # fmt: skip


def _render_ablation(v: dict) -> str:
    names = ["black_box", "augmented", "nmf_only", "residual_only"]
    labels = ["black box V", "augmented Σa·b′", "NMF only a·B", "residual only R"]
    groups = [(lab, [v.get(k)]) for k, lab in zip(names, labels, strict=True)]
    extra = {k: x for k, x in v.items() if k not in names}
    n = f" on {_fmt(v.get('n_images'))} images" if "n_images" in v else ""
    plot = bar_chart("plot-ablation", f"Top-1 with part of the head{n}", groups, ["top-1"],
                     percent=True, ceil=1.0)  # fmt: skip
    return f'<div class="plots">{plot}</div>' + (_kv_table(extra) if extra else "")


def _render_explained_share(v: dict, source: str = "evaluation") -> str:
    per_class = v.get("per_class") or {}
    groups = [(name, [d.get("energy"), d.get("norm_ratio")]) for name, d in per_class.items()
              if isinstance(d, dict)]  # fmt: skip
    out = [_kv_table({k: x for k, x in v.items() if k != "per_class"})]
    if len(groups) > 60:  # one bar per class stops being readable: the sorted distribution
        energy = sorted((_num(e) for _, (e, _n) in groups if _num(e) is not None), reverse=True)
        out.append(line_chart("plot-explained-share", "NMF share of V's energy, classes sorted",
                              list(range(1, len(energy) + 1)), {"energy": energy},
                              xlabel="class rank", percent=True, ceil=1.0))  # fmt: skip
    elif groups:
        out.append(bar_chart("plot-explained-share", "NMF share of the class vector, per class",
                             groups, ["energy 1−‖R‖²/‖V‖²", "norm ‖aB‖/‖V‖"], percent=True,
                             ceil=1.0))  # fmt: skip
    out.append(f'<p class="caption">from {html.escape(source)}</p>')
    return '<div class="plots">' + "".join(out) + "</div>"


def _render_residual_share(v: dict) -> str:
    keys = ["logit_mean", "logit_median", "margin_mean", "margin_median"]
    groups = [(k.replace("_", " "), [v.get(k)]) for k in keys]
    plot = bar_chart("plot-residual-share", "Residual share of the predicted class", groups,
                     ["share"], percent=True)  # fmt: skip
    extra = {k: x for k, x in v.items() if k not in keys}
    return f'<div class="plots">{plot}{_kv_table(extra) if extra else ""}</div>'


def _render_intervention(v: dict) -> str:
    rates = [("top-1", v.get("top1")), ("oracle top-1", v.get("oracle_top1")),
             ("top-2", v.get("top2_accuracy"))]  # fmt: skip
    counts = ["errors", "oracle_fixes", "heaviest_fixes", "true_runner_up_among_heaviest_fixes"]
    plots = [bar_chart("plot-intervention", "Test-time intervention: accuracy",
                       [(k, [x]) for k, x in rates], ["accuracy"], percent=True, ceil=1.0)]
    if any(_num(v.get(k)) is not None for k in counts):
        plots.append(bar_chart("plot-intervention-counts", "Wrong predictions and fixes",
                               [(k.replace("_", " "), [v.get(k)]) for k in counts[:3]],
                               ["images"]))  # fmt: skip
    return f'<div class="plots">{"".join(plots)}{_kv_table(v)}</div>'


def _faithfulness_curves(baseline: str, methods: dict) -> list[str]:
    """Where the evaluation gives curves (lists of numbers, e.g. ``deletion_curve``): one
    plot per curve kind with the methods as lines, so they compare at a glance."""
    kinds: dict[str, dict[str, list]] = {}
    for m, d in methods.items():
        for k, x in (d.items() if isinstance(d, dict) else []):
            if isinstance(x, list) and x and all(_num(y) is not None for y in x):
                kinds.setdefault(k, {})[m] = x
    plots = []
    for k, lines in kinds.items():
        n = max(len(x) for x in lines.values())
        plots.append(line_chart(f"plot-faithfulness-{baseline}-{k}",
                                f"{k.replace('_', ' ')}, {baseline} baseline",
                                [j / max(n - 1, 1) for j in range(n)], lines,
                                xlabel="fraction of pixels"))  # fmt: skip
    return plots


def _render_faithfulness(v: dict) -> str:
    baselines = v.get("baselines") or {}
    plots, curves = [], []
    for b, methods in baselines.items():
        reason = _unavailable(methods)
        if reason is not None:
            plots.append(f'<p class="unavailable">baseline {html.escape(b)}: {html.escape(reason)}</p>')
            continue
        groups = [(m, [d.get("deletion_auc"), d.get("insertion_auc")]) if isinstance(d, dict)
                  else (m, [None, None]) for m, d in methods.items()]  # fmt: skip
        plots.append(bar_chart(f"plot-faithfulness-{b}", f"Deletion / insertion AUC, {b} baseline",
                               groups, ["deletion AUC (lower better)",
                                        "insertion AUC (higher better)"]))  # fmt: skip
        curves += _faithfulness_curves(b, methods)
    scalars = {k: x for k, x in v.items() if k != "baselines"}
    return (f'<div class="plots">{"".join(plots + curves)}</div>'
            + (_kv_table(scalars) if scalars else ""))  # fmt: skip


def _render_sweep(v: list) -> str:
    rows = [r for r in v if isinstance(r, dict)]
    ps = [r.get("p") for r in rows]
    errors = {k: [r.get(k) for r in rows] for k in ("feature_rel_error", "head_rel_error")}
    tops = {k.replace("_top1", ""): [r.get(k) for r in rows]
            for k in ("nmf_only_top1", "residual_only_top1", "augmented_top1")}  # fmt: skip
    table = ("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
             + "</tr>" + "".join("<tr>" + "".join(f"<td class='num'>{_fmt(x, 'top1' in k)}</td>"
                                                   for k, x in r.items()) + "</tr>" for r in rows)
             + "</table>") if rows else ""  # fmt: skip
    return ('<div class="plots">'
            + line_chart("plot-sweep-errors", "Reconstruction error vs p (Fig. 5)", ps, errors,
                         xlabel="prototypes per class p")
            + line_chart("plot-sweep-top1", "Top-1 vs p (Table 3)", ps, tops,
                         xlabel="prototypes per class p", percent=True, ceil=1.0)
            + f"</div>{table}")  # fmt: skip


def _render_accuracy(ev: dict) -> str:
    scalars = {k: v for k, v in ev.items() if not isinstance(v, (dict, list))}
    out = [_kv_table(scalars, "eval-scalars")]
    per_class = ev.get("per_class_top1")
    if isinstance(per_class, dict) and per_class and len(per_class) <= 60:
        out.append('<div class="plots">' + bar_chart(
            "plot-per-class-top1", "Top-1 per class", [(k, [x]) for k, x in per_class.items()],
            ["top-1"], percent=True, ceil=1.0) + "</div>")  # fmt: skip
    return "".join(out)


EVAL_BLOCKS = (  # (key, title, renderer)
    ("ablation", "Ablation: top-1 with part of the head (Table 3)", _render_ablation),
    ("explained_share", "Explained share per class", _render_explained_share),
    ("residual_share", "Residual share of the logit and the margin", _render_residual_share),
    ("intervention", "Test-time intervention (App. A.4)", _render_intervention),
    ("faithfulness", "Faithfulness: deletion and insertion", _render_faithfulness),
    ("sweep", "Sweep over p", _render_sweep),
)
_SHOWN = {"per_class_top1", *(k for k, _, _ in EVAL_BLOCKS)}


def evaluation_section(ev: dict, shares: dict, classes: list[str], notes: list[str]) -> str:
    out = ['<section id="evaluation"><h2>Evaluation</h2>']
    out += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    reason = _unavailable(ev)
    if reason is not None:
        out.append(f'<p class="unavailable">evaluation unavailable: {html.escape(reason)}</p>')
        ev = {}
    else:
        out.append(_block("accuracy", "Accuracy", _render_accuracy(ev)))
    for key, title, render in EVAL_BLOCKS:
        value = ev.get(key)
        if key == "explained_share" and value is None:  # the tensors give it without images
            value = {"per_class": {c: {"energy": float(e), "norm_ratio": float(n)} for c, e, n
                                   in zip(classes, shares["energy"], shares["norm_ratio"],
                                          strict=True)}}  # fmt: skip
            out.append(_guarded(key, title, value,
                                lambda v: _render_explained_share(v, "the artifact's tensors")))
            continue
        if key == "sweep" and value is None:
            out.append(_block(key, title, '<p class="absent">no sweep in this evaluation (run '
                              "<code>protonmf evaluate --sweep-p 1,3,5,10 --json</code> and pass "
                              "it with <code>--evaluation</code>)</p>"))  # fmt: skip
            continue
        out.append(_guarded(key, title, value, render))
    other = {k: v for k, v in ev.items() if k not in _SHOWN and isinstance(v, (dict, list))}
    if other:
        out.append(_block("other", "Other evaluation keys", _kv_table(other)))
    out.append("</section>")
    return "".join(out)


# ------------------------------------------------------------------------- reading


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def reading(ev: dict, manifest: dict, shares: dict, folds: list) -> list[tuple[str, str]]:
    """Plain-language sentences from the values: [(topic, sentence)]; a topic whose
    numbers are missing is left out."""
    out = []
    explained = [k for k, f in enumerate(folds) if f not in WHOLE_VECTOR_FOLDS]
    if explained:
        e = shares["energy"][explained]
        worst = manifest["classes"][explained[int(np.argmin(e))]]
        out.append(("energy", f"The NMF prototypes alone carry {_pct(e.mean())} of the class "
                    f"vectors' energy on average (1 − ‖R‖²/‖V‖², from {_pct(e.min())} for "
                    f"{worst} to {_pct(e.max())}); the residual prototype R carries the rest, "
                    "folded into the served prototypes b′."))  # fmt: skip
    whole = [manifest["classes"][k] for k, f in enumerate(folds) if f in WHOLE_VECTOR_FOLDS]
    if whole:
        out.append(("unexplained", f"{len(whole)} class(es) keep their class vector whole "
                    f"(nothing explained by NMF): {', '.join(whole[:10])}."))  # fmt: skip
    guarded = [manifest["classes"][k] for k, f in enumerate(folds) if f == "min_norm"]
    if guarded:
        out.append(("fold", f"{len(guarded)} of {len(folds)} classes have coefficients that "
                    "largely cancel (|Σa|/‖a‖₁ below the guard), so the residual was split by "
                    "the minimum-norm rule instead of Eq. 8's R/Σa: "
                    f"{', '.join(guarded[:10])}{'…' if len(guarded) > 10 else ''}."))
    ab = ev.get("ablation") if isinstance(ev.get("ablation"), dict) else {}
    bb, aug = _num(ab.get("black_box")), _num(ab.get("augmented"))
    nmf, res = _num(ab.get("nmf_only")), _num(ab.get("residual_only"))
    if bb is not None and aug is not None:
        same = "the same top-1 as" if abs(bb - aug) < 1e-9 else "a different top-1 from"
        s = (f"On {_fmt(ab.get('n_images', ev.get('n_images')))} images the served model has "
             f"{same} the black box ({_pct(aug)} vs {_pct(bb)}).")
        if nmf is not None and res is not None:
            lead = "the residual R carries" if res > nmf else "the NMF prototypes carry"
            s += (f" With only the NMF part of the head (a·B) top-1 is {_pct(nmf)}, with only "
                  f"the residual R {_pct(res)}: {lead} most of the decision.")
        out.append(("ablation", s))
    rs = ev.get("residual_share") if isinstance(ev.get("residual_share"), dict) else {}
    lm, mm = _num(rs.get("logit_mean")), _num(rs.get("margin_mean"))
    if lm is not None or mm is not None:
        parts = []
        if lm is not None:
            parts.append(f"{_pct(lm)} of the predicted class's logit (above its bias; median "
                         f"{_fmt(rs.get('logit_median'), True)})")
        if mm is not None:
            parts.append(f"{_pct(mm)} of its margin over the runner-up (median "
                         f"{_fmt(rs.get('margin_median'), True)})")
        out.append(("residual", "On average the residual supplies " + " and ".join(parts) + "."))
    iv = ev.get("intervention") if isinstance(ev.get("intervention"), dict) else {}
    errors = _num(iv.get("errors"))
    if errors is not None:
        s = f"Of {int(errors)} wrong predictions, switching off the predicted class's heaviest "
        s += f"prototype fixes {_fmt(iv.get('heaviest_fixes'))}"
        if _num(iv.get("oracle_fixes")) is not None:
            s += (f"; an oracle picking the best prototype fixes {_fmt(iv.get('oracle_fixes'))}"
                  f" (top-1 {_fmt(iv.get('top1'), True)} → {_fmt(iv.get('oracle_top1'), True)})")
        out.append(("intervention", s + "."))
    fa = ev.get("faithfulness") if isinstance(ev.get("faithfulness"), dict) else {}
    mean = (fa.get("baselines") or {}).get("mean") if isinstance(fa.get("baselines"), dict) else None
    if isinstance(mean, dict) and isinstance(mean.get("prototype"), dict):
        def auc(m, k):
            return _num((mean.get(m) or {}).get(k)) if isinstance(mean.get(m), dict) else None
        d = {m: auc(m, "deletion_auc") for m in ("prototype", "cam", "random")}
        i = {m: auc(m, "insertion_auc") for m in ("prototype", "cam", "random")}
        if d["prototype"] is not None and i["prototype"] is not None:
            def versus(x):
                return ", ".join(f"{m} {_fmt(x[m])}" for m in ("cam", "random") if x[m] is not None)
            out.append(("faithfulness", "Removing pixels in the order the prototype maps rank "
                        f"them (mean baseline) gives a deletion AUC of {_fmt(d['prototype'])} "
                        f"({versus(d)}; lower is better) and an insertion AUC of "
                        f"{_fmt(i['prototype'])} ({versus(i)}; higher is better)."))  # fmt: skip
    sweep = [r for r in ev.get("sweep") or [] if isinstance(r, dict)] if isinstance(
        ev.get("sweep"), list) else []  # fmt: skip
    if len(sweep) >= 2:
        a, b = sweep[0], sweep[-1]
        out.append(("sweep", f"From p={a.get('p')} to p={b.get('p')} the feature reconstruction "
                    f"error goes {_fmt(a.get('feature_rel_error'))} → "
                    f"{_fmt(b.get('feature_rel_error'))} and NMF-only top-1 "
                    f"{_fmt(a.get('nmf_only_top1'), True)} → {_fmt(b.get('nmf_only_top1'), True)}."))
    return out


# --------------------------------------------------------------------------- atlas


def atlas_section(manifest: dict, tensors: dict, ex, shares: dict, folds: list,
                  classes: list[int]) -> str:  # fmt: skip
    names = manifest["classes"]
    per_class = manifest.get("diagnostics", {}).get("per_class") or [{}] * len(names)
    a = np.asarray(tensors["coefficients"], np.float64)
    B = np.asarray(tensors["nmf_prototypes"], np.float64)
    Bp = np.asarray(tensors["prototypes"], np.float64)
    V = np.asarray(tensors["class_vectors"], np.float64)
    w = tensors.get("fold_weights")
    out = ['<section id="atlas"><h2>Prototype atlas</h2>']
    if ex is None:
        out.append('<p class="note" id="no-exemplars">This artifact has no exemplars '
                   "(converted with <code>--exemplars 0</code> or by an older protonmf): the "
                   "atlas shows the numbers only.</p>")  # fmt: skip
    else:
        bar = f'<span class="colorbar" style="background:linear-gradient(to right,{CSS_GRADIENT})">'
        out.append(f"<p>Each strip: the conversion images where the prototype is most present "
                   f"(up to {ex.m}, best first), with its presence map laid over {bar}</span> "
                   "(0 → the strip's peak); the caption is the peak presence. Augmented = the "
                   "served prototype b′ (Eq. 9's E′); NMF = the NMF prototype b (the factor E)."
                   "</p>")  # fmt: skip
    for c in classes:
        d = per_class[c] if c < len(per_class) else {}
        fold = folds[c] or "?"
        summary = (f"NMF part: {_pct(shares['energy'][c])} of V's energy, ‖aB‖/‖V‖ = "
                   f"{shares['norm_ratio'][c]:.3f}; bias {_fmt(float(tensors['bias'][c]))}")
        for key, label in (("n_images", "images"), ("sum_a_ratio", "|Σa|/‖a‖₁"),
                           ("feature_rel_error", "feature error"), ("head_rel_error", "‖R‖/‖V‖")):
            if key in d:
                summary += f"; {label} {_fmt(d[key])}"
        out.append(f'<section class="atlas-class" id="class-{c}" data-class="{c}" '
                   f'data-class-name="{html.escape(names[c])}" data-fold="{html.escape(fold)}">'
                   f'<h3>{html.escape(names[c])}<span class="fold fold-{html.escape(fold)}">fold: '
                   f'{html.escape(fold)}</span></h3><p class="class-summary">{summary}</p>')
        vnorm = max(np.linalg.norm(V[c]), 1e-300)
        for i in range(a.shape[1]):
            cos = float(B[c, i] @ Bp[c, i] / max(np.linalg.norm(B[c, i]) * np.linalg.norm(Bp[c, i]),
                                                 1e-300))  # fmt: skip
            meta = {
                "coefficient a": _fmt(a[c, i]),
                "fold weight w": _fmt(float(w[c, i])) if w is not None else "—",
                "fold": html.escape(fold),
                "class NMF share": _pct(shares["energy"][c]),
                "‖a·b‖/‖V‖": _fmt(abs(a[c, i]) * np.linalg.norm(B[c, i]) / vnorm),
                "cos(b, b′)": _fmt(cos),
            }
            if fold in WHOLE_VECTOR_FOLDS:
                meta["‖a·b‖/‖V‖"] = "—"
                meta["cos(b, b′)"] = "—"
            dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta.items())
            strips = ""
            if ex is not None:
                if "augmented" in ex.kinds:
                    strips += (f'<div class="strip-label">served prototype b′{i} (augmented)'
                               f"</div>{exemplar_strip(ex, c, i, 'augmented')}")
                if "nmf" in ex.kinds:
                    strips += ('<details class="nmf-exemplars"><summary>exemplars of the NMF '
                               f"prototype b{i}</summary>{exemplar_strip(ex, c, i, 'nmf')}"
                               "</details>")  # fmt: skip
            out.append(f'<div class="prototype-row" id="proto-{c}-{i}" data-class="{c}" '
                       f'data-prototype="{i}"><div class="prototype-meta"><b>prototype {i}</b>'
                       f'<dl>{dl}</dl></div><div class="strips">{strips}</div></div>')
        out.append("</section>")
    out.append("</section>")
    return "".join(out)


# ---------------------------------------------------------------------------- entry


def _select_classes(names: list[str], wanted: list[str] | None) -> list[int]:
    if not wanted:
        return list(range(len(names)))
    out = []
    for w in wanted:
        if w in names:
            out.append(names.index(w))
        elif w.isdigit() and int(w) < len(names):
            out.append(int(w))
        else:
            raise ValueError(f"unknown class {w!r} (e.g. {names[:3]})")
    return out


def build_report(artifact, data=None, max_images=None, evaluation: dict | None = None,
                 classes: list[str] | None = None, progress: bool = False) -> str:  # fmt: skip
    """The report page as a string. ``evaluation``: a saved ``evaluate`` dict (e.g. one with
    a p-sweep); None runs ``service.evaluate.evaluate`` on ``data`` (default: the
    artifact's held-out images). ``classes``: names or indices for the atlas (default all)."""
    t0 = time.perf_counter()
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    tensors = load_tensors(artifact, manifest)
    ex = load_exemplars(artifact, manifest)
    names = manifest["classes"]
    atlas_classes = _select_classes(names, classes)
    per_class = manifest.get("diagnostics", {}).get("per_class") or []
    folds = [(per_class[c].get("fold") if c < len(per_class) else None) for c in range(len(names))]
    shares = class_shares(tensors, folds)
    notes = []
    if evaluation is None:
        evaluation, notes = run_evaluation(artifact, data, max_images, progress)
    t_eval = time.perf_counter() - t0
    title = f"ProtoNMF report — {artifact.resolve().name}"
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>")  # fmt: skip
    diag = manifest.get("diagnostics", {})
    meta = {
        "artifact": str(artifact.resolve()),
        "format": f"v{manifest.get('format_version')} (protonmf {manifest.get('protonmf_version')})",
        "created": manifest.get("created"),
        "backbone": f"{manifest.get('backbone', {}).get('architecture')} "
                    f"({manifest.get('backbone', {}).get('model')})",
        "head": manifest.get("head", {}).get("kind"),
        "classes": f"{len(names)} ({diag.get('classes_explained', '?')} explained by prototypes)",
        "prototypes": f"p = {manifest.get('p')} per class, features {manifest.get('feature_dim')}"
                      f" × {'×'.join(map(str, manifest.get('feature_grid', [])))}",
        "rebuild": f"max ‖Σa b′ − V‖/‖V‖ = {_fmt(diag.get('max_rebuild_rel_error'))}",
        "exemplars": (f"{ex.m} per prototype, kinds {', '.join(ex.kinds)}, "
                      f"{len(ex.thumbnails)} images" if ex is not None else "none"),
    }  # fmt: skip
    meta_rows = "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>"
                        for k, v in meta.items())  # fmt: skip
    items = reading(evaluation if isinstance(evaluation, dict) else {}, manifest, shares, folds)
    read = "".join(f'<li class="reading-item" data-topic="{t}">{html.escape(s)}</li>'
                   for t, s in items)  # fmt: skip
    body = [
        head,
        f"<h1>{html.escape(title)}</h1>",
        '<nav><a href="#reading">Reading</a><a href="#evaluation">Evaluation</a>'
        '<a href="#atlas">Prototype atlas</a></nav>',
        f'<table class="meta" id="artifact-meta">{meta_rows}</table>',
        f'<section id="reading"><h2>Reading</h2><ul>{read}</ul></section>',
        evaluation_section(evaluation if isinstance(evaluation, dict) else {}, shares, names,
                           notes),
        atlas_section(manifest, tensors, ex, shares, folds, atlas_classes),
    ]
    t_all = time.perf_counter() - t0
    body.append(f"<footer>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}; evaluation "
                f"{t_eval:.1f} s, page {t_all - t_eval:.1f} s. Self-contained: no network "
                "resources.</footer></body></html>")  # fmt: skip
    return "".join(body)


def write_report(artifact, out, **kwargs) -> Path:
    """``build_report`` written to ``out`` (parent folders made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(artifact, **kwargs), encoding="utf-8")
    return out
