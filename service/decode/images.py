"""Untrusted image bytes → checked, upright PIL image.

Every check that bounds the cost of an image happens before its pixels are decoded (bytes,
format, declared size, sides and their ratio, the raster's bytes, a JPEG's scans), so a
decompression bomb or an oversized image costs a header read, not its memory or its time.
What an allowed image may cost is bounded too: its raster by ``max_raster_bytes``, its
decoding time by ``max_decode_ms`` (checked in the decoding thread itself, between chunks).
"""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import math
import os
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from protonmf.artifact import Preprocessing
from protonmf.service.ops.errors import (
    InvalidInput,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
)

log = logging.getLogger("protonmf.decode")

__all__ = ["Limits", "count_jpeg_scans", "decode_image"]

FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class Limits:
    """Request limits; the service sets each from PROTONMF_<NAME> (settings.py)."""

    max_bytes: int = 8 * 1024 * 1024  # one encoded image
    max_pixels: int = 24_000_000  # declared width × height, checked before decoding
    min_side: int = 8  # smaller images carry no usable detail
    max_side: int = 16384  # the longer side, checked before decoding
    # longer / shorter side: an 8 × 3,000,000 strip is resized to 56 × 21,000,000 (and a
    # 224-pixel model's 224 × 84,000,000) before the centre crop
    max_aspect: int = 32
    # bytes of the decoded raster as Pillow holds it (after a JPEG's draft): 64 MiB is an
    # RGB(A) 4096 × 4096 or an 8-bit grey 24 M; the decoding path peaks at up to ~4× this
    max_raster_bytes: int = 64 * 1024 * 1024
    max_scans: int = 64  # a JPEG's scans (SOS markers); progressive encoders write ≤ ~20
    max_decode_ms: int = 3000  # one image's header reading and decoding (see _Timed)
    max_images: int = 16  # images in one request
    max_interventions: int = 64  # (class, prototype) pairs switched off in one request
    # decode JPEGs at reduced scale when the resize allows: faster, not timm's pixels
    jpeg_draft: bool = False


class _TooSlow(Exception):
    """Raised by ``_Timed.read`` inside Pillow (header reading or decoding)."""


class _Timed(io.BytesIO):
    """The image's bytes with a deadline. Pillow reads the header segment by segment and
    the decoders pull their input 64 KiB at a time, all through ``read``: a read after the
    deadline stops the work in the thread doing it, so nothing goes on decoding after the
    request has been answered. The work between two reads is bounded by the other limits
    (raster bytes, a JPEG's scans)."""

    def __init__(self, data: bytes, seconds: float):
        super().__init__(data)
        self.deadline = time.monotonic() + seconds

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise _TooSlow
        return super().read(size)


def _too_slow(limits: Limits) -> PayloadTooLarge:
    return PayloadTooLarge(f"image took over {limits.max_decode_ms} ms to decode", "decode_timeout")


def count_jpeg_scans(data: bytes) -> int:
    """An upper bound on a JPEG's scans: its SOS markers (FF DA), counted without decoding.

    Entropy-coded data never holds FF DA (an FF there is followed by 00 or a restart
    marker), so every scan a decoder can see is counted; an embedded thumbnail's scans and
    an FF DA inside metadata count too, which only errs on the safe side."""
    return data.count(b"\xff\xda")


def _open(data: bytes, limits: Limits, source: _Timed) -> Image.Image:
    """``source`` holds ``data``: what the decoder will read (with its deadline)."""
    if not data:
        raise InvalidInput("empty image: the request carried zero bytes", "empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=FORMATS)
    except UnidentifiedImageError as e:
        raise UnsupportedMediaType(
            f"not a decodable {'/'.join(FORMATS)} image", "unsupported_format"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image declares too many pixels: {e}", "too_many_pixels") from e
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise InvalidInput(f"cannot decode image: {e}", "corrupt") from e
    return image


def _check_geometry(image: Image.Image, limits: Limits) -> None:
    """Declared size (the header's, nothing decoded yet) against the limits."""
    w, h = image.size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {w}×{h} = {w * h} pixels; the limit is {limits.max_pixels}",
            "too_many_pixels",
        )
    if max(w, h) > limits.max_side:
        raise PayloadTooLarge(
            f"image is {w}×{h}; the longer side may be at most {limits.max_side} pixels",
            "side_too_long",
        )
    if min(w, h) < limits.min_side:
        raise Unprocessable(
            f"image is {w}×{h}; both sides must be at least {limits.min_side} pixels",
            "too_small",
        )
    if max(w, h) > limits.max_aspect * min(w, h):
        raise Unprocessable(
            f"image is {w}×{h}; the longer side may be at most {limits.max_aspect}× the shorter",
            "aspect_ratio",
        )
    if getattr(image, "n_frames", 1) > 1:
        raise UnsupportedMediaType(
            f"animated image with {image.n_frames} frames; send a single frame", "animated"
        )


def raster_bytes(image: Image.Image) -> int:
    """Bytes Pillow allocates for ``image``'s pixels: 1, 2 or 4 per pixel (every mode
    of more than one band is stored in 4)."""
    mode = ImageMode.getmode(image.mode)
    per_pixel = 4 if len(mode.bands) > 1 else int(mode.typestr[-1])
    return image.size[0] * image.size[1] * per_pixel


def _check_cost(image: Image.Image, data: bytes, limits: Limits) -> None:
    """What decoding will cost (the raster, a JPEG's scans), before it starts."""
    if raster_bytes(image) > limits.max_raster_bytes:
        raise PayloadTooLarge(
            f"image is {image.size[0]}×{image.size[1]} {image.mode}: {raster_bytes(image)} "
            f"bytes decoded; the limit is {limits.max_raster_bytes}",
            "raster_too_large",
        )
    if image.format == "JPEG" and (scans := count_jpeg_scans(data)) > limits.max_scans:
        raise PayloadTooLarge(
            f"JPEG with {scans} scans; the limit is {limits.max_scans}", "too_many_scans"
        )


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale → 8-bit by range, not by clipping at 255."""
    if image.mode.startswith("I;16"):  # a table lookup: 1 byte per pixel, no float copies
        table = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(table[np.asarray(image)], "L")
    if image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr *= 255.0 / top
        arr += 0.5
        return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as a viewer would show them on a page: the same
        # pixels as alpha-compositing over white, with two rasters fewer alive at the peak.
        if image.mode not in ("RGBA", "LA"):
            image = image.convert("RGBA")
        page = Image.new("RGB", image.size, (255, 255, 255))
        page.paste(image, mask=image)
        return page
    return image


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def _large_buffers_from_mmap() -> bool:
    """Rasters of up to ``max_raster_bytes`` come and go with every large image. glibc
    serves an allocation from mmap (returned to the system on free) only above a threshold
    it raises to the size of each such block freed, up to 32 MiB; after a few large images
    their rasters come from the heap instead, whose freed pages stay resident (worker RSS
    170 → 313 MB after the hostile corpus). A fixed 1 MiB threshold, which also stops the
    raising, keeps it at +14%. Left alone where the operator set MALLOC_MMAP_THRESHOLD_
    or the C library is not glibc; True if set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1
    except (OSError, AttributeError):
        return False


def decode_image(
    data: bytes,
    limits: Limits,
    spec: Preprocessing | None = None,
    jpeg: Callable[[bytes], Image.Image | None] | None = None,
) -> Image.Image:
    """Checked, decoded, upright image. Raises the ``InvalidInput`` family with a reason.

    ``jpeg``: another JPEG decoder (gpu_decode.GpuJpegDecoder.decode): bytes → upright RGB
    image, or None to leave the image to Pillow. It gets a JPEG only once Pillow has read and
    checked its header, and not one that is drafted.

    With ``spec``, a JPEG is decoded directly at a reduced scale (1/2, 1/4, 1/8) that still
    leaves at least the model's resize target when ``limits.jpeg_draft`` asks for it, or when
    its full raster would exceed ``max_raster_bytes`` (a 24 MP photo: served approximately
    rather than refused). Otherwise the pixels are the full decode's, as timm reads them.
    """
    _large_buffers_from_mmap()
    source = _Timed(data, limits.max_decode_ms / 1000)
    try:
        image = _open(data, limits, source)
    except _TooSlow as e:
        raise _too_slow(limits) from e
    _check_geometry(image, limits)
    too_big = raster_bytes(image) > limits.max_raster_bytes
    drafted = spec is not None and image.format == "JPEG" and (limits.jpeg_draft or too_big)
    if drafted:
        w, h = image.size
        if too_big and not limits.jpeg_draft:  # the operator did not choose it: say so
            log.warning(
                "JPEG of %d×%d decoded at reduced scale (its raster is over "
                "PROTONMF_MAX_RASTER_BYTES): not timm's exact pixels",
                w,
                h,
            )
        scale = spec.resize / min(w, h)  # rotation (EXIF) keeps the shorter side's length
        image.draft(spec.color_mode, (math.ceil(w * scale), math.ceil(h * scale)))
    _check_cost(image, data, limits)
    if jpeg is not None and image.format == "JPEG" and not drafted:
        decoded = jpeg(data)
        if decoded is not None:
            image.close()
            return decoded
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the raster
    except _TooSlow as e:
        raise _too_slow(limits) from e
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise InvalidInput(f"cannot decode image: {e}", "corrupt") from e
    return _to_8bit(image)
