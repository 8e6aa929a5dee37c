"""``protonmf report``: one self-contained HTML page about an artifact.

The page holds the evaluation numbers (``service.evaluate.evaluate``, or a saved
``protonmf evaluate --json``) with small inline SVG plots, a plain-language reading of them,
and the prototype atlas: per class, one row per prototype with its coefficient, fold and
exemplar strips (thumbnails with the presence map laid over, as data: URIs).

Nothing on the page loads anything: no scripts, fonts or stylesheets from elsewhere, and a
Content-Security-Policy that only allows inline styles and data: images. No torch: numpy,
Pillow, Jinja2 and the standard library.

The HTML is in ``templates/`` (Jinja2, autoescape on): this module computes the numbers,
sentences and chart layouts as plain data and the templates turn them into markup, so class
names and other strings from a checkpoint are escaped in one place. The plots are rendered
by ``templates/chart.html`` too and reach the page as Markup.

Stable hooks for tests and readers: ``#evaluation``, ``#reading``, ``#atlas``;
``.eval-block[data-key]`` per evaluation key (``.unavailable`` / ``.absent`` inside when
it has no numbers); ``svg.plot[id]``; ``.atlas-class[data-class]``;
``.prototype-row[data-class][data-prototype]``;
``.exemplar-strip[data-class][data-prototype][data-kind]`` holding one ``img.exemplar`` per
non-empty exemplar slot.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from protonmf import explain
from protonmf.artifact import load_manifest, load_tensors
from protonmf.artifact.exemplars import load_exemplars
from protonmf.artifact.manifest import Manifest

__all__ = ["build_report", "class_shares", "run_evaluation", "write_report"]

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
# Folds where prototype 0 is V itself: the NMF part explains nothing of the class.
WHOLE_VECTOR_FOLDS = explain.ALL_RESIDUAL_FOLDS
THUMB_MAX = 112  # pixels: larger crops are shrunk before encoding (page size)
TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def _env() -> Environment:
    # autoescape for every template (chart.html included); StrictUndefined: a misspelt
    # field fails the build instead of vanishing from the page.
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


# --------------------------------------------------------------------------- numbers


def _num(v) -> float | None:
    """A finite float, or None for anything else (absent, null, NaN, a string…)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v, percent: bool = False) -> str:
    """A value as plain text (the templates escape it)."""
    x = _num(v)
    if x is None:
        return "—" if v is None else str(v)
    if percent:
        return f"{100 * x:.1f}%"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _unavailable(v) -> str | None:
    """The reason of a ``{"unavailable": reason}`` value, else None."""
    if isinstance(v, dict) and "unavailable" in v:
        return str(v["unavailable"])
    return None


def _dict_at(d: dict, key: str) -> dict:
    """``d[key]`` when it is a dict, else {}: evaluation files come in many shapes."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def class_shares(tensors: dict, folds: list[str | None]) -> dict[str, np.ndarray]:
    """Per class, how much of V the NMF prototypes carry (``protonmf.explain.explained_share``:
    ``energy`` and ``norm_ratio``; 0 where the fold keeps V whole, NaN where V = 0)."""
    energy, norm_ratio = explain.explained_share(tensors, [f or "sum" for f in folds])
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
            notes.append(
                f"--max-images {max_images} ignored: this evaluate() evaluates every image"
            )
    try:
        return evaluate(artifact, data, **kwargs), notes
    except FileNotFoundError as e:
        return {"unavailable": str(e)}, notes


# ------------------------------------------------------------------------------ SVG
# The chart helpers lay plots out as lists of elements ({tag, attrs, text, title}, all
# strings); templates/chart.html writes them, escaping labels like any other text.


def _el(tag: str, attrs: dict, text: str | None = None, title: str | None = None) -> dict:
    return {"tag": tag, "attrs": attrs, "text": text, "title": title}


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


def _legend(series: list[str], left: float, width: float) -> tuple[list[dict], float]:
    """Legend items flowing in rows from y = 30 within ``width``: (elements, height used)."""
    out, x, y = [], left, 30.0
    for k, name in enumerate(series):
        item_w = 20 + _text_w(name)
        if x > left and x + item_w > width - 8:
            x, y = left, y + 15
        out.append(
            _el(
                "rect",
                {
                    "x": f"{x:.0f}",
                    "y": f"{y - 9:.0f}",
                    "width": "10",
                    "height": "10",
                    "fill": PALETTE[k % len(PALETTE)],
                },
            )
        )
        out.append(_el("text", {"x": f"{x + 14:.0f}", "y": f"{y:.0f}"}, name))
        x += item_w + 10
    return out, (y - 30 + 15) if series else 0.0


def _frame(title: str, plot_w: float, series: list[str], left: int = 48):
    """Width, legend elements and the plot's top edge for a chart of ``plot_w`` drawing width."""
    width = max(left + plot_w + 16, _text_w(title, 7.0) + 24, 220)
    legend, legend_h = _legend(series, left, width) if len(series) > 1 else ([], 0.0)
    top = 24 + legend_h + 12  # title, legend, then room for the value labels
    return int(width), legend, top


def _svg(plot_id: str, width: int, height: float, title: str, elements: list[dict]) -> Markup:
    # Safe as Markup: chart.html is autoescaped, so the labels in it are escaped already.
    return Markup(
        _env()
        .get_template("chart.html")
        .render(
            id=plot_id,
            width=width,
            height=f"{height:.0f}",
            centre=f"{width / 2:.0f}",
            title=title,
            elements=elements,
        )
    )


def _y_scale(lo: float, hi: float, top: float, plot_h: float):
    return lambda v: top + plot_h * (hi - v) / (hi - lo)


def _y_axis(lo, hi, y_of, left, right, percent) -> list[dict]:
    out = []
    for t in _ticks(lo, hi):
        y = f"{y_of(t):.1f}"
        out.append(
            _el("line", {"class": "grid", "x1": f"{left}", "x2": f"{right:.0f}", "y1": y, "y2": y})
        )
        out.append(
            _el(
                "text",
                {"x": f"{left - 4}", "y": f"{y_of(t) + 3.5:.1f}", "text-anchor": "end"},
                _tick_label(t, percent),
            )
        )
    y0 = f"{y_of(0.0) if lo <= 0 <= hi else y_of(lo):.1f}"
    out.append(
        _el("line", {"class": "axis", "x1": f"{left}", "x2": f"{right:.0f}", "y1": y0, "y2": y0})
    )
    return out


@dataclass(frozen=True)
class _BarLayout:
    bar: int  # one bar's width
    group_w: float  # one group's width
    longest: float  # the longest group label's width
    rotate: bool  # group labels at -45°
    show_values: bool  # values printed on the bars


def _bar_layout(labels: list[str], n_series: int) -> _BarLayout:
    n_bars = len(labels) * n_series
    show_values = n_bars <= 12
    bar = 28 if show_values else (16 if n_bars <= 40 else max(3, 480 // max(n_bars, 1)))
    longest = max((_text_w(g) for g in labels), default=0)
    group_w = n_series * bar + max(10, bar // 2)
    if len(labels) <= 8:  # room for the labels to stay horizontal
        group_w = max(group_w, min(longest + 12, 140))
    return _BarLayout(bar, group_w, longest, longest + 4 > group_w, show_values)


def _bars(
    label: str,
    values: list,
    series: list[str],
    gx: float,
    lay: _BarLayout,
    y_of,
    y0: float,
    percent: bool,
) -> list[dict]:
    """One group's bars from x = ``gx``: n/a for a missing value, the value on the bar when
    there are few, its value in the tooltip."""
    out, bar = [], lay.bar
    for k, v in enumerate(values):
        x, v = gx + k * bar, _num(v)
        if v is None:
            out.append(
                _el(
                    "text",
                    {
                        "class": "na",
                        "x": f"{x + bar / 2:.1f}",
                        "y": f"{y0 - 3:.1f}",
                        "text-anchor": "middle",
                    },
                    "n/a",
                )
            )
            continue
        y1, y2 = sorted((y_of(v), y0))
        out.append(
            _el(
                "rect",
                {
                    "class": "bar",
                    "x": f"{x + 1:.1f}",
                    "y": f"{y1:.1f}",
                    "width": f"{bar - 2}",
                    "height": f"{max(y2 - y1, 0.5):.1f}",
                    "fill": PALETTE[k % len(PALETTE)],
                },
                title=f"{label} · {series[k]}: {_fmt(v, percent)}",
            )
        )
        if lay.show_values:
            ty = y1 - 3 if v >= 0 else y2 + 10
            out.append(
                _el(
                    "text",
                    {
                        "class": "value",
                        "x": f"{x + bar / 2:.1f}",
                        "y": f"{ty:.1f}",
                        "text-anchor": "middle",
                    },
                    _fmt(v, percent),
                )
            )
    return out


def _group_label(label: str, cx: float, y: float, rotate: bool) -> dict:
    if rotate:
        return _el(
            "text",
            {
                "x": f"{cx + 3:.1f}",
                "y": f"{y:.1f}",
                "text-anchor": "end",
                "transform": f"rotate(-45 {cx + 3:.1f} {y:.1f})",
            },
            label,
        )
    return _el("text", {"x": f"{cx:.1f}", "y": f"{y:.1f}", "text-anchor": "middle"}, label)


def bar_chart(
    plot_id: str,
    title: str,
    groups: list[tuple[str, list]],
    series: list[str],
    percent: bool = False,
    ceil: float | None = None,
) -> Markup:
    """Grouped bars: ``groups`` = [(label, [value per series])]; None values are left out
    (marked n/a). Negative values go below the zero line. Values are printed on the bars
    when there are few; each bar's tooltip has its value."""
    lo, hi = _range([_num(v) for _, vs in groups for v in vs], ceil=ceil)
    lay = _bar_layout([g for g, _ in groups], len(series))
    left, plot_h = 48, 150
    width, legend, top = _frame(title, len(groups) * lay.group_w, series, left)
    if lo < 0 and lay.show_values:
        lo -= 0.12 * (hi - lo)  # room for the value label under a negative bar
    bottom = (min(lay.longest, 110) * 0.72 + 16) if lay.rotate else 24
    y_of = _y_scale(lo, hi, top, plot_h)
    out = legend + _y_axis(lo, hi, y_of, left, left + len(groups) * lay.group_w, percent)
    y0 = y_of(min(max(0.0, lo), hi))
    for g, (label, vs) in enumerate(groups):
        gx = left + g * lay.group_w + (lay.group_w - len(series) * lay.bar) / 2
        out += _bars(label, vs, series, gx, lay, y_of, y0, percent)
        cx = left + g * lay.group_w + lay.group_w / 2
        out.append(_group_label(label, cx, top + plot_h + 14, lay.rotate))
    return _svg(plot_id, width, top + plot_h + bottom, title, out)


def _lines(series: dict[str, list], xs: list, x_of, y_of, percent: bool) -> list[dict]:
    """One polyline per series, with markers (value tooltips) when there are few points."""
    out = []
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [
            (x_of(a), y_of(_num(b)), a, b)
            for a, b in zip(xs, vs, strict=False)
            if a is not None and _num(b) is not None
        ]
        if len(pts) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in pts)
            out.append(
                _el(
                    "polyline",
                    {
                        "class": "line",
                        "points": path,
                        "fill": "none",
                        "stroke": colour,
                        "stroke-width": "2",
                    },
                )
            )
        if len(pts) <= 40:
            out += [
                _el(
                    "circle",
                    {"cx": f"{px:.1f}", "cy": f"{py:.1f}", "r": "3", "fill": colour},
                    title=f"{name} at {a:.3g}: {_fmt(b, percent)}",
                )
                for px, py, a, b in pts
            ]
    return out


def line_chart(
    plot_id: str,
    title: str,
    x: list,
    series: dict[str, list],
    xlabel: str = "",
    percent: bool = False,
    ceil: float | None = None,
) -> Markup:
    """Lines with markers over numeric x; None points are skipped."""
    xs = [_num(v) for v in x]
    lo, hi = _range([_num(v) for vs in series.values() for v in vs], ceil=ceil)
    known = [v for v in xs if v is not None] or [0.0, 1.0]
    x_lo, x_hi = min(known), max(known)
    if x_hi - x_lo < 1e-12:
        x_hi = x_lo + 1
    left, plot_w, plot_h = 48, 300, 150
    width, legend, top = _frame(title, plot_w, list(series), left)
    y_of = _y_scale(lo, hi, top, plot_h)

    def x_of(v):
        return left + plot_w * (v - x_lo) / (x_hi - x_lo)

    out = legend + _y_axis(lo, hi, y_of, left, left + plot_w, percent)
    x_ticks = sorted(set(v for v in xs if v is not None)) if len(xs) <= 10 else None
    for t in x_ticks or _ticks(x_lo, x_hi, 6):
        out.append(
            _el(
                "text",
                {"x": f"{x_of(t):.1f}", "y": f"{top + plot_h + 14:.0f}", "text-anchor": "middle"},
                f"{t:.3g}",
            )
        )
    if xlabel:
        out.append(
            _el(
                "text",
                {
                    "x": f"{left + plot_w / 2:.0f}",
                    "y": f"{top + plot_h + 30:.0f}",
                    "text-anchor": "middle",
                },
                xlabel,
            )
        )
    out += _lines(series, xs, x_of, y_of, percent)
    return _svg(plot_id, width, top + plot_h + 36, title, out)


# ----------------------------------------------------------------------- exemplars

# Heat colours for the presence maps: blue (low) → yellow → red (the strip's peak); low
# presence is also nearly transparent, so the image shows through where the prototype is not.
_STOPS = np.array(
    [[49, 54, 149], [116, 173, 209], [254, 224, 144], [244, 109, 67], [165, 0, 38]], np.float64
)
_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, k])
        for k in range(3)
    ],
    1,
).astype(np.uint8)
CSS_GRADIENT = ",".join("#" + "".join(f"{int(x):02x}" for x in c) for c in _STOPS)


def overlay_png(thumb: np.ndarray, presence: np.ndarray, vmax: float) -> str:
    """uint8 crop (h, w[, 3]) + presence map (H, W) → data: URI of a PNG: the map,
    upsampled bilinearly, over the crop; colour and opacity grow with presence / vmax.
    Negative presence (Eq. 9's least squares allows it) is left uncoloured."""
    from PIL import Image

    img = Image.fromarray(thumb).convert("RGB")
    if max(img.size) > THUMB_MAX:
        scale = THUMB_MAX / max(img.size)
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS
        )
    level = np.clip(np.nan_to_num(presence, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0)
    heat = Image.fromarray(level.astype(np.float32), mode="F").resize(
        img.size, Image.Resampling.BILINEAR
    )
    level = np.clip(np.asarray(heat), 0.0, 1.0)
    colour = _LUT[(level * 255).astype(np.uint8)].astype(np.float32)
    alpha = (0.75 * level**1.5)[..., None]
    out = np.asarray(img, np.float32) * 0.85 * (1 - alpha) + colour * alpha
    buf = io.BytesIO()
    Image.fromarray(out.round().astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def exemplar_strip(ex, c: int, i: int, kind: str) -> dict:
    """One prototype's exemplars of one kind, for atlas.html's ``strip``: one cell per
    non-empty slot, the maps on one scale (the strip's peak) so the images compare."""
    slots = ex.index[kind][c, i]
    scores = ex.score[kind][c, i]
    maps = ex.maps[kind][c, i]
    used = [s for s in range(len(slots)) if slots[s] >= 0]
    vmax = max([float(np.nanmax(maps[s])) for s in used if np.isfinite(maps[s]).any()] or [1.0])
    cells = []
    for s in used:
        u = int(slots[s])
        source = ex.sources[u] if u < len(ex.sources) else f"#{u}"
        cells.append(
            {
                "slot": s,
                "src": overlay_png(ex.thumbnails[u], maps[s], vmax),
                "tip": f"{source} — peak presence {_fmt(scores[s])}",
                "score": _fmt(scores[s]),
                "name": Path(source).name,
            }
        )
    return {"kind": kind, "c": c, "i": i, "scale": f"{vmax:.6g}", "cells": cells}


# ---------------------------------------------------------------------- evaluation
# Each block is {key, title, state, reason, parts}; a part is a chart (Markup) or a dict
# with a "kind" that templates/evaluation.html knows (plots, kv, grid, caption, unavailable).

_PERCENT_KEYS = ("accuracy", "top1", "top5", "top2", "share", "energy", "norm_ratio")


def _is_percent(key: str) -> bool:
    return any(k in key for k in _PERCENT_KEYS) and "n_" not in key


def _cell(key, v):
    """A key/value table cell: text, or {"pre": JSON} for nested values."""
    if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
        return " · ".join(f"{a} {_fmt(b)}" for a, b in v.items())
    if isinstance(v, (dict, list)):
        return {"pre": json.dumps(v, indent=1, default=str)[:4000]}
    x = _num(v)
    return _fmt(v, _is_percent(str(key)) and x is not None and abs(x) <= 1.5)


def _kv(d: dict, cls: str = "kv") -> dict:
    return {"kind": "kv", "cls": cls, "rows": [(str(k), _cell(k, v)) for k, v in d.items()]}


def _plots(*children) -> dict:
    return {"kind": "plots", "children": [c for c in children if c]}


def _block(key: str, title: str, parts=(), state: str = "ok", reason: str | None = None) -> dict:
    return {"key": key, "title": title, "state": state, "reason": reason, "parts": list(parts)}


def _guarded(key: str, title: str, value, render) -> dict:
    """An evaluation block: the reason if unavailable, a note if absent, else ``render``;
    a value of an unexpected shape falls back to its JSON, so the page is always written."""
    reason = _unavailable(value)
    if reason is not None:
        return _block(key, title, state="unavailable", reason=reason)
    if value is None:
        return _block(key, title, state="absent")
    try:
        return _block(key, title, render(value))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        return _block(key, title, [_kv({key: value})], state="odd", reason=str(e))


def _render_ablation(v: dict) -> list:
    names = ["black_box", "augmented", "nmf_only", "residual_only"]
    labels = ["black box V", "augmented Σa·b′", "NMF only a·B", "residual only R"]
    groups = [(lab, [v.get(k)]) for k, lab in zip(names, labels, strict=True)]
    extra = {k: x for k, x in v.items() if k not in names}
    n = f" on {_fmt(v.get('n_images'))} images" if "n_images" in v else ""
    plot = bar_chart(
        "plot-ablation",
        f"Top-1 with part of the head{n}",
        groups,
        ["top-1"],
        percent=True,
        ceil=1.0,
    )
    return [_plots(plot)] + ([_kv(extra)] if extra else [])


def _render_explained_share(v: dict, source: str = "evaluation") -> list:
    per_class = v.get("per_class") or {}
    groups = [
        (name, [d.get("energy"), d.get("norm_ratio")])
        for name, d in per_class.items()
        if isinstance(d, dict)
    ]
    chart = None
    if len(groups) > 60:  # one bar per class stops being readable: the sorted distribution
        energy = sorted((_num(e) for _, (e, _n) in groups if _num(e) is not None), reverse=True)
        chart = line_chart(
            "plot-explained-share",
            "NMF share of V's energy, classes sorted",
            list(range(1, len(energy) + 1)),
            {"energy": energy},
            xlabel="class rank",
            percent=True,
            ceil=1.0,
        )
    elif groups:
        chart = bar_chart(
            "plot-explained-share",
            "NMF share of the class vector, per class",
            groups,
            ["energy 1−‖R‖²/‖V‖²", "norm ‖aB‖/‖V‖"],
            percent=True,
            ceil=1.0,
        )
    table = _kv({k: x for k, x in v.items() if k != "per_class"})
    return [_plots(table, chart, {"kind": "caption", "text": f"from {source}"})]


def _render_residual_share(v: dict) -> list:
    keys = ["logit_mean", "logit_median", "margin_mean", "margin_median"]
    groups = [(k.replace("_", " "), [v.get(k)]) for k in keys]
    plot = bar_chart(
        "plot-residual-share",
        "Residual share of the predicted class",
        groups,
        ["share"],
        percent=True,
    )
    extra = {k: x for k, x in v.items() if k not in keys}
    return [_plots(plot, _kv(extra) if extra else None)]


def _render_intervention(v: dict) -> list:
    rates = [
        ("top-1", v.get("top1")),
        ("oracle top-1", v.get("oracle_top1")),
        ("top-2", v.get("top2_accuracy")),
    ]
    counts = ["errors", "oracle_fixes", "heaviest_fixes", "true_runner_up_among_heaviest_fixes"]
    plots = [
        bar_chart(
            "plot-intervention",
            "Test-time intervention: accuracy",
            [(k, [x]) for k, x in rates],
            ["accuracy"],
            percent=True,
            ceil=1.0,
        )
    ]
    if any(_num(v.get(k)) is not None for k in counts):
        plots.append(
            bar_chart(
                "plot-intervention-counts",
                "Wrong predictions and fixes",
                [(k.replace("_", " "), [v.get(k)]) for k in counts[:3]],
                ["images"],
            )
        )
    return [_plots(*plots, _kv(v))]


def _faithfulness_curves(baseline: str, methods: dict) -> list[Markup]:
    """Where the evaluation gives curves (lists of numbers, e.g. ``deletion_curve``): one
    plot per curve kind with the methods as lines, so they compare at a glance."""
    kinds: dict[str, dict[str, list]] = {}
    for m, d in methods.items():
        for k, x in d.items() if isinstance(d, dict) else []:
            if isinstance(x, list) and x and all(_num(y) is not None for y in x):
                kinds.setdefault(k, {})[m] = x
    plots = []
    for k, lines in kinds.items():
        n = max(len(x) for x in lines.values())
        plots.append(
            line_chart(
                f"plot-faithfulness-{baseline}-{k}",
                f"{k.replace('_', ' ')}, {baseline} baseline",
                [j / max(n - 1, 1) for j in range(n)],
                lines,
                xlabel="fraction of pixels",
            )
        )
    return plots


def _render_faithfulness(v: dict) -> list:
    baselines = v.get("baselines") or {}
    plots, curves = [], []
    for b, methods in baselines.items():
        reason = _unavailable(methods)
        if reason is not None:
            plots.append({"kind": "unavailable", "text": f"baseline {b}: {reason}"})
            continue
        groups = [
            (m, [d.get("deletion_auc"), d.get("insertion_auc")])
            if isinstance(d, dict)
            else (m, [None, None])
            for m, d in methods.items()
        ]
        plots.append(
            bar_chart(
                f"plot-faithfulness-{b}",
                f"Deletion / insertion AUC, {b} baseline",
                groups,
                ["deletion AUC (lower better)", "insertion AUC (higher better)"],
            )
        )
        curves += _faithfulness_curves(b, methods)
    scalars = {k: x for k, x in v.items() if k != "baselines"}
    return [_plots(*plots, *curves)] + ([_kv(scalars)] if scalars else [])


def _render_sweep(v: list) -> list:
    rows = [r for r in v if isinstance(r, dict)]
    ps = [r.get("p") for r in rows]
    errors = {k: [r.get(k) for r in rows] for k in ("feature_rel_error", "head_rel_error")}
    tops = {
        k.replace("_top1", ""): [r.get(k) for r in rows]
        for k in ("nmf_only_top1", "residual_only_top1", "augmented_top1")
    }
    plots = _plots(
        line_chart(
            "plot-sweep-errors",
            "Reconstruction error vs p (Fig. 5)",
            ps,
            errors,
            xlabel="prototypes per class p",
        ),
        line_chart(
            "plot-sweep-top1",
            "Top-1 vs p (Table 3)",
            ps,
            tops,
            xlabel="prototypes per class p",
            percent=True,
            ceil=1.0,
        ),
    )
    if not rows:
        return [plots]
    grid = {
        "kind": "grid",
        "head": [str(k) for k in rows[0]],
        "rows": [[_fmt(x, "top1" in k) for k, x in r.items()] for r in rows],
    }
    return [plots, grid]


def _render_accuracy(ev: dict) -> list:
    scalars = {k: v for k, v in ev.items() if not isinstance(v, (dict, list))}
    out = [_kv(scalars, "eval-scalars")]
    per_class = ev.get("per_class_top1")
    if isinstance(per_class, dict) and per_class and len(per_class) <= 60:
        out.append(
            _plots(
                bar_chart(
                    "plot-per-class-top1",
                    "Top-1 per class",
                    [(k, [x]) for k, x in per_class.items()],
                    ["top-1"],
                    percent=True,
                    ceil=1.0,
                )
            )
        )
    return out


EVAL_BLOCKS = (  # (key, title, renderer)
    ("ablation", "Ablation: top-1 with part of the head (Table 3)", _render_ablation),
    ("explained_share", "Explained share per class", _render_explained_share),
    ("residual_share", "Residual share of the logit and the margin", _render_residual_share),
    ("intervention", "Test-time intervention (App. A.4)", _render_intervention),
    ("faithfulness", "Faithfulness: deletion and insertion", _render_faithfulness),
    ("sweep", "Sweep over p", _render_sweep),
)
_SHOWN = {"per_class_top1", *(k for k, _, _ in EVAL_BLOCKS)}


def _tensor_shares(shares: dict, classes: list[str]) -> dict:
    """The explained share from the artifact's tensors: an evaluation without it still has it."""
    return {
        "per_class": {
            c: {"energy": float(e), "norm_ratio": float(n)}
            for c, e, n in zip(classes, shares["energy"], shares["norm_ratio"], strict=True)
        }
    }


def _eval_block(key: str, title: str, render, value, shares: dict, classes: list[str]) -> dict:
    if key == "explained_share" and value is None:  # the tensors give it without images
        return _guarded(
            key,
            title,
            _tensor_shares(shares, classes),
            lambda v: _render_explained_share(v, "the artifact's tensors"),
        )
    if key == "sweep" and value is None:
        return _block(key, title, state="no_sweep")
    return _guarded(key, title, value, render)


def _evaluation(ev: dict, shares: dict, classes: list[str], notes: list[str]) -> dict:
    """The context of templates/evaluation.html."""
    reason = _unavailable(ev)
    blocks = []
    if reason is None:
        blocks.append(_block("accuracy", "Accuracy", _render_accuracy(ev)))
    else:
        ev = {}
    blocks += [
        _eval_block(key, title, render, ev.get(key), shares, classes)
        for key, title, render in EVAL_BLOCKS
    ]
    other = {k: v for k, v in ev.items() if k not in _SHOWN and isinstance(v, (dict, list))}
    if other:
        blocks.append(_block("other", "Other evaluation keys", [_kv(other)]))
    return {"notes": notes, "reason": reason, "blocks": blocks}


# ------------------------------------------------------------------------- reading
# One small function per topic: a sentence from the numbers, or None when they are missing.


def _read_energy(names: list[str], shares: dict, folds: list) -> str | None:
    explained = [k for k, f in enumerate(folds) if f not in WHOLE_VECTOR_FOLDS]
    if not explained:
        return None
    e = shares["energy"][explained]
    worst = names[explained[int(np.argmin(e))]]
    return (
        f"The NMF prototypes alone carry {_pct(e.mean())} of the class vectors' energy on "
        f"average (1 − ‖R‖²/‖V‖², from {_pct(e.min())} for {worst} to {_pct(e.max())}); "
        "the residual prototype R carries the rest, folded into the served prototypes b′."
    )


def _read_unexplained(names: list[str], folds: list) -> str | None:
    whole = [names[k] for k, f in enumerate(folds) if f in WHOLE_VECTOR_FOLDS]
    if not whole:
        return None
    return (
        f"{len(whole)} class(es) keep their class vector whole (nothing explained by NMF): "
        f"{', '.join(whole[:10])}."
    )


def _read_fold(names: list[str], folds: list) -> str | None:
    guarded = [names[k] for k, f in enumerate(folds) if f == "min_norm"]
    if not guarded:
        return None
    return (
        f"{len(guarded)} of {len(folds)} classes have coefficients that largely cancel "
        "(|Σa|/‖a‖₁ below the guard), so the residual was split by the minimum-norm rule "
        f"instead of Eq. 8's R/Σa: {', '.join(guarded[:10])}"
        f"{'…' if len(guarded) > 10 else ''}."
    )


def _read_ablation(ev: dict) -> str | None:
    ab = _dict_at(ev, "ablation")
    bb, aug = _num(ab.get("black_box")), _num(ab.get("augmented"))
    if bb is None or aug is None:
        return None
    same = "the same top-1 as" if abs(bb - aug) < 1e-9 else "a different top-1 from"
    s = (
        f"On {_fmt(ab.get('n_images', ev.get('n_images')))} images the served model has "
        f"{same} the black box ({_pct(aug)} vs {_pct(bb)})."
    )
    nmf, res = _num(ab.get("nmf_only")), _num(ab.get("residual_only"))
    if nmf is not None and res is not None:
        lead = "the residual R carries" if res > nmf else "the NMF prototypes carry"
        s += (
            f" With only the NMF part of the head (a·B) top-1 is {_pct(nmf)}, with only the "
            f"residual R {_pct(res)}: {lead} most of the decision."
        )
    return s


def _read_residual(rs: dict) -> str | None:
    lm, mm = _num(rs.get("logit_mean")), _num(rs.get("margin_mean"))
    parts = []
    if lm is not None:
        parts.append(
            f"{_pct(lm)} of the predicted class's logit (above its bias; median "
            f"{_fmt(rs.get('logit_median'), True)})"
        )
    if mm is not None:
        parts.append(
            f"{_pct(mm)} of its margin over the runner-up (median "
            f"{_fmt(rs.get('margin_median'), True)})"
        )
    return ("On average the residual supplies " + " and ".join(parts) + ".") if parts else None


def _read_intervention(iv: dict) -> str | None:
    errors = _num(iv.get("errors"))
    if errors is None:
        return None
    s = (
        f"Of {int(errors)} wrong predictions, switching off the predicted class's heaviest "
        f"prototype fixes {_fmt(iv.get('heaviest_fixes'))}"
    )
    if _num(iv.get("oracle_fixes")) is not None:
        s += (
            f"; an oracle picking the best prototype fixes {_fmt(iv.get('oracle_fixes'))}"
            f" (top-1 {_fmt(iv.get('top1'), True)} → {_fmt(iv.get('oracle_top1'), True)})"
        )
    return s + "."


def _aucs(mean: dict, key: str) -> dict[str, float | None]:
    return {m: _num(_dict_at(mean, m).get(key)) for m in ("prototype", "cam", "random")}


def _versus(aucs: dict) -> str:
    return ", ".join(f"{m} {_fmt(aucs[m])}" for m in ("cam", "random") if aucs[m] is not None)


def _read_faithfulness(fa: dict) -> str | None:
    mean = _dict_at(_dict_at(fa, "baselines"), "mean")
    d, i = _aucs(mean, "deletion_auc"), _aucs(mean, "insertion_auc")
    if d["prototype"] is None or i["prototype"] is None:
        return None
    return (
        "Removing pixels in the order the prototype maps rank them (mean baseline) gives a "
        f"deletion AUC of {_fmt(d['prototype'])} ({_versus(d)}; lower is better) and an "
        f"insertion AUC of {_fmt(i['prototype'])} ({_versus(i)}; higher is better)."
    )


def _read_sweep(sweep) -> str | None:
    rows = [r for r in sweep if isinstance(r, dict)] if isinstance(sweep, list) else []
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    return (
        f"From p={a.get('p')} to p={b.get('p')} the feature reconstruction error goes "
        f"{_fmt(a.get('feature_rel_error'))} → {_fmt(b.get('feature_rel_error'))} and "
        f"NMF-only top-1 {_fmt(a.get('nmf_only_top1'), True)} → "
        f"{_fmt(b.get('nmf_only_top1'), True)}."
    )


def reading(ev: dict, manifest: dict, shares: dict, folds: list) -> list[tuple[str, str]]:
    """Plain-language sentences from the values: [(topic, sentence)]; a topic whose
    numbers are missing is left out."""
    names = manifest["classes"]
    sentences = [
        ("energy", _read_energy(names, shares, folds)),
        ("unexplained", _read_unexplained(names, folds)),
        ("fold", _read_fold(names, folds)),
        ("ablation", _read_ablation(ev)),
        ("residual", _read_residual(_dict_at(ev, "residual_share"))),
        ("intervention", _read_intervention(_dict_at(ev, "intervention"))),
        ("faithfulness", _read_faithfulness(_dict_at(ev, "faithfulness"))),
        ("sweep", _read_sweep(ev.get("sweep"))),
    ]
    return [(topic, s) for topic, s in sentences if s]


# --------------------------------------------------------------------------- atlas

_SUMMARY_KEYS = (
    ("n_images", "images"),
    ("sum_a_ratio", "|Σa|/‖a‖₁"),
    ("feature_rel_error", "feature error"),
    ("head_rel_error", "‖R‖/‖V‖"),
)


def _class_summary(d: dict, c: int, shares: dict, bias: float) -> str:
    summary = (
        f"NMF part: {_pct(shares['energy'][c])} of V's energy, ‖aB‖/‖V‖ = "
        f"{shares['norm_ratio'][c]:.3f}; bias {_fmt(float(bias))}"
    )
    for key, label in _SUMMARY_KEYS:
        if key in d:
            summary += f"; {label} {_fmt(d[key])}"
    return summary


def _prototype_meta(t: dict, c: int, i: int, fold: str, share: float) -> list[tuple[str, str]]:
    """The numbers beside one prototype's strips (``t``: the tensors as float64)."""
    a, B, Bp, V, w = t["a"], t["B"], t["Bp"], t["V"], t["w"]
    whole = fold in WHOLE_VECTOR_FOLDS  # b is V itself: no NMF part to compare
    cos = float(
        B[c, i] @ Bp[c, i] / max(np.linalg.norm(B[c, i]) * np.linalg.norm(Bp[c, i]), 1e-300)
    )
    carried = abs(a[c, i]) * np.linalg.norm(B[c, i]) / max(np.linalg.norm(V[c]), 1e-300)
    return [
        ("coefficient a", _fmt(a[c, i])),
        ("fold weight w", _fmt(float(w[c, i])) if w is not None else "—"),
        ("fold", fold),
        ("class NMF share", _pct(share)),
        ("‖a·b‖/‖V‖", "—" if whole else _fmt(carried)),
        ("cos(b, b′)", "—" if whole else _fmt(cos)),
    ]


def _prototype(t: dict, ex, c: int, i: int, fold: str, share: float) -> dict:
    kinds = ex.kinds if ex is not None else ()
    return {
        "i": i,
        "meta": _prototype_meta(t, c, i, fold, share),
        "augmented": exemplar_strip(ex, c, i, "augmented") if "augmented" in kinds else None,
        "nmf": exemplar_strip(ex, c, i, "nmf") if "nmf" in kinds else None,
    }


def _atlas(
    manifest: dict, tensors: dict, ex, shares: dict, folds: list, classes: list[int]
) -> dict:
    """The context of templates/atlas.html: per selected class its summary and prototypes."""
    names = manifest["classes"]
    per_class = manifest.get("diagnostics", {}).get("per_class") or [{}] * len(names)
    t = {
        k: np.asarray(tensors[name], np.float64)
        for k, name in (
            ("a", "coefficients"),
            ("B", "nmf_prototypes"),
            ("Bp", "prototypes"),
            ("V", "class_vectors"),
        )
    }
    t["w"] = tensors.get("fold_weights")
    out = []
    for c in classes:
        fold = folds[c] or "?"
        summary = _class_summary(
            per_class[c] if c < len(per_class) else {}, c, shares, tensors["bias"][c]
        )
        out.append(
            {
                "c": c,
                "name": names[c],
                "fold": fold,
                "summary": summary,
                "prototypes": [
                    _prototype(t, ex, c, i, fold, shares["energy"][c])
                    for i in range(t["a"].shape[1])
                ],
            }
        )
    return {"m": ex.m if ex is not None else None, "gradient": CSS_GRADIENT, "classes": out}


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


def _folds(manifest: dict) -> list[str | None]:
    """Each class's fold from the manifest's diagnostics (None where it says nothing)."""
    per_class = manifest.get("diagnostics", {}).get("per_class") or []
    return [
        (per_class[c].get("fold") if c < len(per_class) else None)
        for c in range(len(manifest["classes"]))
    ]


def _artifact_meta(artifact: Path, manifest: dict, ex) -> list[tuple[str, str]]:
    m = Manifest.of(manifest)
    diag = m.diagnostics
    explained = "?" if diag.classes_explained is None else diag.classes_explained
    meta = {
        "artifact": artifact.resolve(),
        "format": f"v{m.format_version} (protonmf {m.protonmf_version})",
        "created": m.created,
        "backbone": f"{m.backbone.get('architecture')} ({m.backbone.get('model')})",
        "head": m.head.kind,
        "classes": f"{len(m.classes)} ({explained} explained by prototypes)",
        "prototypes": f"p = {m.p} per class, features {m.feature_dim}"
        f" × {'×'.join(map(str, m.feature_grid or ()))}",
        "rebuild": f"max ‖Σa b′ − V‖/‖V‖ = {_fmt(diag.max_rebuild_rel_error)}",
        "exemplars": (
            f"{ex.m} per prototype, kinds {', '.join(ex.kinds)}, {len(ex.thumbnails)} images"
            if ex is not None
            else "none"
        ),
    }
    return [(k, str(v)) for k, v in meta.items()]


def build_report(
    artifact,
    data=None,
    max_images=None,
    evaluation: dict | None = None,
    classes: list[str] | None = None,
    progress: bool = False,
) -> str:
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
    folds = _folds(manifest)
    shares = class_shares(tensors, folds)
    notes = []
    if evaluation is None:
        evaluation, notes = run_evaluation(artifact, data, max_images, progress)
    t_eval = time.perf_counter() - t0
    ev = evaluation if isinstance(evaluation, dict) else {}
    page = {
        "title": f"ProtoNMF report — {artifact.resolve().name}",
        "meta": _artifact_meta(artifact, manifest, ex),
        "reading": reading(ev, manifest, shares, folds),
        "evaluation": _evaluation(ev, shares, names, notes),
        "atlas": _atlas(manifest, tensors, ex, shares, folds, atlas_classes),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "t_eval": t_eval,
    }
    page["t_page"] = time.perf_counter() - t0 - t_eval
    return _env().get_template("report.html").render(page)


def write_report(artifact, out, **kwargs) -> Path:
    """``build_report`` written to ``out`` (parent folders made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(artifact, **kwargs), encoding="utf-8")
    return out
