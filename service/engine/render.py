"""Pictures of explanations as PNG: an image's prototype overlay (/overlay) and a
prototype's exemplar strip (/prototype_image), drawn with Pillow."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["render_exemplar_strip", "render_overlay"]

# diverging colours: red = for the class (positive), blue = against (negative)
FOR, AGAINST = (214, 39, 40), (31, 119, 180)
MAX_ALPHA = 0.8
PAD = 8


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _upscaled(crop: np.ndarray, min_side: int) -> Image.Image:
    """The crop as RGB, enlarged by an integer factor to at least ``min_side`` pixels."""
    image = Image.fromarray(crop).convert("RGB")
    scale = max(1, math.ceil(min_side / min(image.size)))
    return image.resize((image.size[0] * scale, image.size[1] * scale), Image.Resampling.BILINEAR)


def _diverging(base: Image.Image, m: np.ndarray, vmax: float) -> Image.Image:
    """``m`` (H, W) upsampled (bilinear, signed) over ``base``: red where > 0, blue where
    < 0, opacity |m| / vmax — the same vmax for every map that is to be compared."""
    up = np.asarray(
        Image.fromarray(np.asarray(m, np.float32), "F").resize(base.size, Image.Resampling.BILINEAR)
    )
    strength = np.clip(np.abs(up) / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(up)
    layer = np.empty(up.shape + (4,), np.uint8)
    layer[...] = (*FOR, 0)
    layer[up < 0, :3] = AGAINST
    layer[..., 3] = np.round(strength * MAX_ALPHA * 255).astype(np.uint8)
    return Image.alpha_composite(base.convert("RGBA"), Image.fromarray(layer, "RGBA"))


def _colour_bar(
    draw: ImageDraw.ImageDraw, x: int, y: int, vmax: float, low: str, high: str, font
) -> int:
    """A −vmax … +vmax bar (blue → white → red) with its ends named; returns its height."""
    width, height = 240, 12
    for j in range(width):
        t = 2.0 * j / (width - 1) - 1.0  # −1 … +1
        colour = AGAINST if t < 0 else FOR
        a = abs(t) * MAX_ALPHA
        draw.line(
            (x + j, y, x + j, y + height),
            fill=tuple(round(255 * (1 - a) + ch * a) for ch in colour),
        )
    draw.rectangle((x, y, x + width, y + height), outline=(120, 120, 120))
    draw.text((x, y + height + 2), f"{-vmax:+.3g}  {low}", fill=(0, 0, 0), font=font)
    right = f"{high}  {vmax:+.3g}"
    draw.text(
        (x + width - draw.textlength(right, font=font), y + height + 2),
        right,
        fill=(0, 0, 0),
        font=font,
    )
    draw.text((x + width / 2 - 3, y + height + 2), "0", fill=(0, 0, 0), font=font)
    return height + 20


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut from the left ("…" + its end) to fit ``width`` pixels: a long source
    path keeps its file name."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def _grid(
    panels: list[Image.Image],
    captions: list[list[str]],
    title: list[str],
    footer: list[str],
    vmax: float,
    low: str,
    high: str,
    columns: int,
) -> bytes:
    """Panels with captions under them, a title above, a colour bar and notes below → PNG."""
    title_font, font = _font(15), _font(12)
    line = 15
    w, h = panels[0].size
    cell_w = max(w, 150)
    rows = math.ceil(len(panels) / columns)
    cap_h = line * max(len(c) for c in captions) + 4
    top = PAD + 19 * len(title)
    width = max(PAD + columns * (cell_w + PAD), 520)
    height = top + rows * (h + cap_h + PAD) + 40 + line * len(footer) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title):
        draw.text((PAD, PAD + 19 * k), text, fill=(0, 0, 0), font=title_font)
    for n, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        x = PAD + (n % columns) * (cell_w + PAD)
        y = top + (n // columns) * (h + cap_h + PAD)
        canvas.paste(panel.convert("RGB"), (x, y))
        for k, text in enumerate(caption):
            draw.text(
                (x, y + h + 2 + line * k), _fit(draw, text, cell_w, font), fill=(0, 0, 0), font=font
            )
    y = top + rows * (h + cap_h + PAD)
    y += _colour_bar(draw, PAD, y, vmax, low, high, font)
    for k, text in enumerate(footer):
        draw.text((PAD, y + line * k), text, fill=(60, 60, 60), font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def render_overlay(
    crop: np.ndarray,
    maps: np.ndarray,
    captions: list[list[str]],
    title: list[str],
    for_label: str = "the class",
    min_side: int = 224,
    columns: int = 4,
    kind: str = "contribution",
) -> bytes:
    """PNG of signed contribution maps over the model's input crop, one panel per map.

    crop : uint8 (h, w) or (h, w, 3), the image as the model saw it
    maps : (n, H, W) signed maps (contribution maps: their spatial mean is the
           contribution); all on ONE scale, the largest |value| of any of them, so panels
           compare: red = for ``for_label``, blue = against, opacity ∝ |value|
    captions : lines under each panel; title : lines above the panels
    """
    maps = np.asarray(maps, np.float64)
    vmax = float(np.abs(maps).max()) if maps.size else 0.0
    base = _upscaled(crop, min_side)
    panels = [_diverging(base, m, vmax) for m in maps]
    if kind == "contribution":
        footer = [
            f"red: for {for_label}, blue: against; opacity ~ |contribution per position|, "
            "one scale for every panel",
            "each map's mean over the positions is the contribution written under it",
        ]
        ends = ("against", "for")
    else:  # similarity F·b' or presence E' (Eq. 9): where the prototype is, not how it votes
        footer = [
            f"{kind} maps: red > 0, blue < 0; opacity ~ |value|, one scale for every panel",
            "contributions and the residual share: as written",
        ]
        ends = ("< 0", "> 0")
    return _grid(panels, captions, title, footer, vmax, *ends, min(columns, len(panels)))


def render_exemplar_strip(
    thumbnails: np.ndarray,
    maps: np.ndarray,
    captions: list[list[str]],
    title: list[str],
    min_side: int = 112,
) -> bytes:
    """PNG: a row of exemplar thumbnails (n, h, w[, 3]) uint8, each with its presence map
    (n, H, W) over it on one scale for the strip (red > 0, blue < 0), captions under."""
    maps = np.asarray(maps, np.float64)
    vmax = float(np.abs(maps).max()) if maps.size else 0.0
    panels = [
        _diverging(_upscaled(t, min_side), m, vmax) for t, m in zip(thumbnails, maps, strict=True)
    ]
    footer = ["opacity ~ |presence| on one scale for the strip; presence = the map's peak"]
    return _grid(panels, captions, title, footer, vmax, "absent", "present", len(panels))
