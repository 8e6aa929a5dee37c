"""Untrusted image bytes → checked, upright PIL image; and prototype overlays as PNG.

Every check happens before the pixels are decoded (bytes, format, declared size), so a
decompression bomb or an oversized image costs a header read, not its memory.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from protonmf.artifact import Preprocessing

from .errors import InvalidInput, PayloadTooLarge, Unprocessable, UnsupportedMediaType

__all__ = ["Limits", "decode_image", "render_overlay"]

FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class Limits:
    """Request limits; each can be set by an environment variable PROTONMF_<NAME>."""

    max_bytes: int = 8 * 1024 * 1024  # one encoded image
    max_pixels: int = 24_000_000  # declared width × height, checked before decoding
    min_side: int = 8  # smaller images carry no usable detail
    max_images: int = 16  # images in one request
    max_interventions: int = 64  # (class, prototype) pairs switched off in one request
    jpeg_draft: bool = True  # decode JPEGs at reduced size when the model's resize allows

    @classmethod
    def from_env(cls, env=os.environ) -> Limits:
        values = {}
        for f in fields(cls):
            raw = env.get(f"PROTONMF_{f.name.upper()}")
            if raw is None:
                continue
            if f.type in ("bool", bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = int(raw)
                if values[f.name] < 1:
                    raise ValueError(f"PROTONMF_{f.name.upper()} must be >= 1, got {raw!r}")
        return cls(**values)


def _open(data: bytes, limits: Limits) -> Image.Image:
    if not data:
        raise InvalidInput("empty image: the request carried zero bytes", "empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        raise UnsupportedMediaType(
            f"not a decodable {'/'.join(FORMATS)} image", "unsupported_format"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image declares too many pixels: {e}", "too_many_pixels") from e
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise InvalidInput(f"cannot decode image: {e}", "corrupt") from e
    return image


def _check_geometry(image: Image.Image, limits: Limits) -> None:
    w, h = image.size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {w}×{h} = {w * h} pixels; the limit is {limits.max_pixels}",
            "too_many_pixels",
        )
    if min(w, h) < limits.min_side:
        raise Unprocessable(
            f"image is {w}×{h}; both sides must be at least {limits.min_side} pixels",
            "too_small",
        )
    if getattr(image, "n_frames", 1) > 1:
        raise UnsupportedMediaType(
            f"animated image with {image.n_frames} frames; send a single frame", "animated"
        )


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale → 8-bit by range, not by clipping at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as a viewer would show them on a page.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def decode_image(data: bytes, limits: Limits, spec: Preprocessing | None = None) -> Image.Image:
    """Checked, decoded, upright image. Raises the ``InvalidInput`` family with a reason.

    With ``spec`` and ``limits.jpeg_draft``, a large JPEG is decoded directly at a reduced
    scale (1/2, 1/4, 1/8) that still leaves at least the model's resize target.
    """
    image = _open(data, limits)
    _check_geometry(image, limits)
    if spec is not None and limits.jpeg_draft and image.format == "JPEG":
        w, h = image.size
        scale = spec.resize / min(w, h)  # rotation (EXIF) keeps the shorter side's length
        image.draft(spec.color_mode, (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"cannot decode image: {e}", "corrupt") from e
    return _to_8bit(image)


_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]  # fmt: skip


def render_overlay(
    crop: np.ndarray, maps: np.ndarray, labels: list[str], title: str, min_side: int = 256
) -> bytes:
    """PNG of the model's input crop with each prototype's map drawn over it.

    crop : uint8 (h, w) or (h, w, 3), the image as the model saw it
    maps : (p, H, W) similarity maps of one class; each is scaled to [0, 1] over its own
           positive range, upsampled bilinearly and drawn in its own colour
    labels : one legend line per prototype
    """
    base = Image.fromarray(crop).convert("RGB")
    scale = max(1, math.ceil(min_side / min(base.size)))
    size = (base.size[0] * scale, base.size[1] * scale)
    base = base.resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    layer = np.zeros((size[1], size[0], 4), np.float64)
    for i, m in enumerate(maps):
        m = np.maximum(m, 0)
        m = m / m.max() if m.max() > 0 else m
        up = Image.fromarray((m * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        alpha = np.asarray(up, np.float64) / 255.0 * 0.6
        colour = np.array(_PALETTE[i % len(_PALETTE)], np.float64)
        mask = alpha > layer[..., 3]  # strongest prototype wins each pixel
        layer[mask, :3] = colour
        layer[mask, 3] = alpha[mask]
    overlay = Image.fromarray((layer * [1, 1, 1, 255]).astype(np.uint8), "RGBA")
    image = Image.alpha_composite(base, overlay)
    legend_h = 14 * (len(labels) + 1) + 6
    canvas = Image.new("RGBA", (size[0], size[1] + legend_h), (255, 255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, size[1] + 3), title, fill=(0, 0, 0, 255))
    for i, text in enumerate(labels):
        y = size[1] + 3 + 14 * (i + 1)
        draw.rectangle((4, y + 2, 12, y + 10), fill=_PALETTE[i % len(_PALETTE)])
        draw.text((16, y), text, fill=(0, 0, 0, 255))
    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="PNG")
    return out.getvalue()
