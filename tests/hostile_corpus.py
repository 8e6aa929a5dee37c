"""The hostile corpus: requests an attacker (or a careless client) sends, each with the
answer the service owes it. Deterministic; a few seconds to generate.

    .venv/bin/python tests/hostile_corpus.py OUT_DIR

(test data beside the tests: the test modules import it as ``hostile_corpus``)

writes one file per case and OUT_DIR/index.json:

    {"version": 1, "cases": [{"name", "kind", "file", "expect", "reason", "content_type"}]}

kind       what the file is and how it is sent
  image      one image: REST multipart ``images``, REST JSON ``images_base64``, gRPC Explain
  class      a UTF-8 class name: an intervention {"class": name, "prototype": 0} on a valid
             image, REST JSON and gRPC Explain
  base64     the text sent as ``images_base64[0]`` (REST JSON)
  multipart  a raw HTTP body for POST /explain, sent with ``content_type`` (REST)
  protobuf   raw request bytes for gRPC Explain (gRPC)
expect     "2xx" or "4xx" (gRPC: OK or INVALID_ARGUMENT)
reason     the reason a refusal must name (REST: in the body, gRPC: in the details), or null

tests/test_hostile.py runs it through the core and against a served REST + gRPC server.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Case", "cases", "write"]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # image | class | base64 | multipart | protobuf
    data: bytes
    expect: str  # 2xx | 4xx
    reason: str | None = None
    content_type: str | None = None  # multipart only


# --- image builders ---------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel


ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)  # (x0, y0, dx, dy) of each interlace pass


def png_flat(
    width: int, height: int, colour: int = 0, depth: int = 8, extra: bytes = b"", interlace: int = 0
) -> bytes:
    """A PNG of zeros of any declared size, compressed as it streams: an 8 × 3,000,000
    grey one is 26 KB. ``extra``: chunks between IHDR and IDAT; ``interlace`` 1: Adam7."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    passes = (
        [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in ADAM7]
        if interlace
        else [(width, height)]
    )
    z = zlib.compressobj(9)
    idat = bytearray()
    for w, h in passes:
        if w <= 0 or h <= 0:
            continue
        row = b"\0" * (1 + (w * PNG_CHANNELS[colour] * depth + 7) // 8)  # filter + samples
        rows_per_piece = max(1, (1 << 20) // len(row))
        for _ in range(h // rows_per_piece):
            idat += z.compress(row * rows_per_piece)
        idat += z.compress(row * (h % rows_per_piece))
    idat += z.flush()
    plte = _chunk(b"PLTE", b"\0\0\0") if colour == 3 else b""
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + plte
        + extra
        + _chunk(b"IDAT", bytes(idat))
        + _chunk(b"IEND", b"")
    )


def png_declaring(width: int, height: int) -> bytes:
    """A tiny 8 × 8 PNG whose IHDR says ``width`` × ``height``."""
    data = _save(Image.new("L", (8, 8)), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; an SOS segment's end includes its scan data."""
    import re

    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        out.append((marker, pos, end))
        pos = end
    return out


def jpeg_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A flat progressive JPEG whose last scan (14 bytes, an AC refinement) is repeated:
    every copy makes the decoder walk every block again."""
    data = _save(Image.new("L", (width, height), 128), "JPEG", progressive=True, quality=90)
    segs = jpeg_segments(data)
    first = [s for s in segs if s[0] == 0xDA]
    last = data[first[-1][1] : first[-1][2]]
    eoi = segs[-1][1]
    return data[:eoi] + last * (scans - len(first)) + data[eoi:]


def jpeg_with_segments(base: bytes, segment: bytes, count: int) -> bytes:
    """``base`` with ``count`` copies of ``segment`` right after SOI."""
    return base[:2] + segment * count + base[2:]


def exif_block(entries: int, orientation: int = 1, loop: bool = False) -> bytes:
    """A little-endian TIFF/EXIF block: the orientation and ``entries`` − 1 more ASCII tags
    (or an IFD whose next-IFD offset points back at itself)."""
    n = max(1, entries)
    ifd = struct.pack("<H", n) + struct.pack("<HHII", 0x0112, 3, 1, orientation)
    for i in range(n - 1):
        ifd += struct.pack("<HHI4s", 0x9000 + i % 4096, 2, 4, b"abc\0")
    ifd += struct.pack("<I", 8 if loop else 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd


def jpeg_with_exif(image: Image.Image, exif: bytes) -> bytes:
    base = _save(image, "JPEG", quality=90)
    app1 = b"Exif\0\0" + exif
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + base[2:]


def webp_with_size(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header declares ``width`` × ``height`` (≤ 16384)."""
    data = bytearray(_save(Image.new("RGB", (16, 16), "red"), "WEBP", lossless=True))
    i = data.index(b"VP8L") + 8 + 1  # chunk header, then the 0x2f signature byte
    bits = int.from_bytes(data[i : i + 4], "little")
    bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[i : i + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def webp_vp8x_canvas(width: int, height: int) -> bytes:
    """An extended-format WebP (VP8X) whose canvas is ``width`` × ``height`` around a
    16 × 16 image."""
    data = _save(Image.new("RGBA", (16, 16), (0, 0, 255, 128)), "WEBP", lossless=True)
    body = data[12:]  # after RIFF size WEBP
    vp8x = _riff_chunk(
        b"VP8X",
        bytes([0x10, 0, 0, 0])
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little"),
    )
    payload = b"WEBP" + vp8x + body
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, 0, 0, 0, 0, 0)  # RLE8
    pixels = b"\0\1" * 64
    return (
        b"BM"
        + struct.pack("<IHHI", 14 + 40 + 1024 + len(pixels), 0, 0, 14 + 40 + 1024)
        + header
        + b"\0" * 1024
        + pixels
    )


def tiff_declaring(width: int, height: int) -> bytes:
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 7 + 4),
        (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + zlib.compress(b"\0" * 64)


def animated(fmt: str, frames: int, size: int = 32) -> bytes:
    palette = [
        Image.new("RGB", (size, size), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
        for i in range(frames)
    ]
    return _save(palette[0], fmt, save_all=True, append_images=palette[1:], duration=10)


def palette_out_of_range() -> bytes:
    """A palette PNG with a 1-entry PLTE whose pixels use index 255."""
    data = png_flat(64, 64, colour=3)
    raw = zlib.compress((b"\0" + b"\xff" * 64) * 64)
    start = data.index(b"IDAT") - 4
    end = start + 12 + int.from_bytes(data[start : start + 4], "big")
    return data[:start] + _chunk(b"IDAT", raw) + data[end:]


def _photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def image_cases() -> list[Case]:
    photo = _photo()
    png, jpeg = _save(photo, "PNG"), _save(photo, "JPEG", quality=90)
    webp = _save(photo, "WEBP", quality=80)
    arr16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    exif_rotated = Image.Exif()
    exif_rotated[0x0112] = 6
    c = [
        # decompression-shaped: few bytes, huge or extreme declared sizes
        Case("png_8x3000000", "image", png_flat(8, 3_000_000), "4xx", "side_too_long"),
        Case("png_3000000x8", "image", png_flat(3_000_000, 8), "4xx", "side_too_long"),
        Case("png_8x16384_aspect", "image", png_flat(8, 16384), "4xx", "aspect_ratio"),
        Case("png_16384x8_aspect", "image", png_flat(16384, 8), "4xx", "aspect_ratio"),
        Case("png_256x8448_aspect_33", "image", png_flat(256, 8448), "4xx", "aspect_ratio"),
        Case("png_256x8192_aspect_32", "image", png_flat(256, 8192), "2xx"),
        Case("png_16385x1024_side", "image", png_flat(16385, 1024), "4xx", "side_too_long"),
        Case(
            "png_declares_1e10_pixels",
            "image",
            png_declaring(100_000, 100_000),
            "4xx",
            "too_many_pixels",
        ),
        Case("png_5000x5000_pixels", "image", png_flat(5000, 5000), "4xx", "too_many_pixels"),
        Case(
            "png_rgba_4097x4096_raster",
            "image",
            png_flat(4097, 4096, colour=6),
            "4xx",
            "raster_too_large",
        ),
        Case("png_rgba_4096x4096", "image", png_flat(4096, 4096, colour=6), "2xx"),
        Case("png_grey_4000x6000", "image", png_flat(4000, 6000), "2xx"),
        Case("png_interlaced_4000x4000", "image", png_flat(4000, 4000, interlace=1), "2xx"),
        Case("png_rgb16_2048x2048", "image", png_flat(2048, 2048, colour=2, depth=16), "2xx"),
        Case(
            "gif_8x65535",
            "image",
            _save(Image.new("P", (8, 65535)), "GIF"),
            "4xx",
            "unsupported_format",
        ),
        Case("tiff_8x3000000", "image", tiff_declaring(8, 3_000_000), "4xx", "unsupported_format"),
        Case("bmp_8x3000000", "image", bmp_declaring(8, 3_000_000), "4xx", "unsupported_format"),
        Case("webp_16383x8_aspect", "image", webp_with_size(16383, 8), "4xx"),
        Case("webp_16383x16383", "image", webp_with_size(16383, 16383), "4xx"),
        Case("webp_vp8x_canvas_3000000x8", "image", webp_vp8x_canvas(3_000_000, 8), "4xx"),
        Case("webp_vp8x_canvas_16384x16384", "image", webp_vp8x_canvas(16384, 16384), "4xx"),
        # JPEG scan bombs
        Case(
            "jpeg_scans_1500_24mp",
            "image",
            jpeg_scan_bomb(4000, 6000, 1500),
            "4xx",
            "too_many_scans",
        ),
        Case(
            "jpeg_scans_20000_1mp",
            "image",
            jpeg_scan_bomb(1000, 1000, 20000),
            "4xx",
            "too_many_scans",
        ),
        Case("jpeg_scans_65", "image", jpeg_scan_bomb(2000, 2000, 65), "4xx", "too_many_scans"),
        Case("jpeg_scans_64_24mp", "image", jpeg_scan_bomb(4000, 6000, 64), "2xx"),
        Case("jpeg_declares_65500x65500", "image", _jpeg_declaring(jpeg, 65500, 65500), "4xx"),
        Case(
            "jpeg_200k_comments",
            "image",
            jpeg_with_segments(jpeg, b"\xff\xfe\x00\x02", 200_000),
            "2xx",
        ),
        # truncated and wrong magic
        Case("png_truncated_half", "image", png[: len(png) // 2], "4xx"),
        Case("png_signature_only", "image", PNG_SIGNATURE, "4xx"),
        Case("jpeg_truncated_half", "image", jpeg[: len(jpeg) // 2], "4xx", "corrupt"),
        Case("jpeg_soi_only", "image", b"\xff\xd8", "4xx"),
        Case("webp_truncated_half", "image", webp[: len(webp) // 2], "4xx"),
        Case("png_body_jpeg_magic", "image", b"\xff\xd8\xff\xe0" + png[4:], "4xx"),
        Case("jpeg_body_png_magic", "image", PNG_SIGNATURE + jpeg[8:], "4xx"),
        Case(
            "random_bytes",
            "image",
            np.random.default_rng(1).bytes(4096),
            "4xx",
            "unsupported_format",
        ),
        Case(
            "html_text",
            "image",
            b"<html><script>alert(1)</script></html>" * 20,
            "4xx",
            "unsupported_format",
        ),
        Case("zero_bytes", "image", b"", "4xx", "empty"),
        Case("one_byte", "image", b"\x89", "4xx", "unsupported_format"),
        # metadata
        Case("jpeg_exif_4000_entries", "image", jpeg_with_exif(photo, exif_block(4000)), "2xx"),
        Case("jpeg_exif_ifd_loop", "image", jpeg_with_exif(photo, exif_block(3, loop=True)), "2xx"),
        Case("jpeg_exif_orientation_9", "image", jpeg_with_exif(photo, exif_block(1, 9)), "2xx"),
        Case("jpeg_exif_rotated", "image", _save(photo, "JPEG", exif=exif_rotated), "2xx"),
        Case(
            "png_exif_7mb",
            "image",
            png_flat(64, 64, extra=_chunk(b"eXIf", exif_block(1) + b"\0" * (7 << 20))),
            "2xx",
        ),
        Case(
            "png_ztxt_bomb",
            "image",
            png_flat(
                64, 64, extra=_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
            ),
            "4xx",
        ),
        Case(
            "png_iccp_bomb",
            "image",
            png_flat(
                64, 64, extra=_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
            ),
            "4xx",
        ),
        Case(
            "png_100k_unknown_chunks",
            "image",
            png_flat(64, 64, extra=_chunk(b"abCd", b"") * 100_000),
            "2xx",
        ),
        # palettes
        Case("png_palette_index_out_of_range", "image", palette_out_of_range(), "2xx"),
        Case(
            "png_palette_transparency",
            "image",
            _save(photo.convert("P"), "PNG", transparency=0),
            "2xx",
        ),
        # sizes at the edges
        Case("png_0x0", "image", png_declaring(0, 0), "4xx"),
        Case("png_1x1", "image", _save(Image.new("L", (1, 1)), "PNG"), "4xx", "too_small"),
        Case("png_7x7", "image", _save(Image.new("L", (7, 7)), "PNG"), "4xx", "too_small"),
        Case("png_1x16384", "image", png_flat(1, 16384), "4xx", "too_small"),
        Case("png_16384x1", "image", png_flat(16384, 1), "4xx", "too_small"),
        Case("png_8x8", "image", _save(Image.new("L", (8, 8), 200), "PNG"), "2xx"),
        # modes users send
        Case("jpeg_cmyk", "image", _save(photo.convert("CMYK"), "JPEG"), "2xx"),
        Case(
            "jpeg_grey_progressive",
            "image",
            _save(photo.convert("L"), "JPEG", progressive=True),
            "2xx",
        ),
        Case("png_grey16", "image", _save(Image.fromarray(arr16), "PNG"), "2xx"),
        Case("png_la", "image", _save(photo.convert("LA"), "PNG"), "2xx"),
        Case("png_rgba", "image", _save(photo.convert("RGBA"), "PNG"), "2xx"),
        Case("png_1bit", "image", _save(photo.convert("1"), "PNG"), "2xx"),
        Case("webp_rgba", "image", _save(photo.convert("RGBA"), "WEBP"), "2xx"),
        # animations
        Case("gif_300_frames", "image", animated("GIF", 300), "4xx", "unsupported_format"),
        Case("png_apng_300_frames", "image", animated("PNG", 300), "4xx", "animated"),
        Case("webp_200_frames", "image", animated("WEBP", 200), "4xx", "animated"),
        # polyglots
        Case("png_then_zip", "image", png + _zip_bytes(), "2xx"),
        Case("jpeg_then_php", "image", jpeg + b"<?php system($_GET['c']); ?>", "2xx"),
        Case(
            "gif_js_polyglot",
            "image",
            b"GIF89a/*\x08\x00\x08\x00\x00\x00\x00*/=alert(1);",
            "4xx",
            "unsupported_format",
        ),
        Case("pdf_header_then_jpeg", "image", b"%PDF-1.4\n" + jpeg, "4xx", "unsupported_format"),
        Case("html_then_png", "image", b"<html>" + png, "4xx", "unsupported_format"),
    ]
    return c


def _jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    data = bytearray(jpeg)
    sof = next(s for s in jpeg_segments(jpeg) if s[0] in (0xC0, 0xC2))[1]
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _zip_bytes() -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("payload.txt", "hello")
    return out.getvalue()


# --- other fields -------------------------------------------------------------------------


CLASS_NAMES = {
    "superscript_two": "²",
    "circled_one": "①",
    "arabic_indic_three": "٣",
    "superscript_ten": "¹⁰",
    "fullwidth_one": "１",
    "hex": "0x1",
    "negative": "-1",
    "space_padded": " 1",
    "exponent": "1e0",
    "digits_5000": "9" * 5000,
    "empty": "",
    "nul": "\0",
    "name_then_nul": "bag\0",
    "rtl_override": "\u202ebag",
}

BASE64 = {
    "stars": "***",
    "bad_padding": "iVBORw0KGgo",
    "data_url": "data:image/png;base64,iVBORw0KGgo=",
    "newlines": "iVBO\nRw0K\nGgo=",
    "non_ascii": "iVBORw0KGgo=é",
    "url": "http://127.0.0.1/a.png",
}


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "hostile") -> bytes:
    """A multipart/form-data body; a part with a filename is a file, without one a text value."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


FORM = "multipart/form-data; boundary=hostile"


def request_cases() -> list[Case]:
    c = [
        Case(f"class_{k}", "class", v.encode(), "4xx", "unknown_class")
        for k, v in CLASS_NAMES.items()
    ]
    c += [Case(f"base64_{k}", "base64", v.encode(), "4xx", "bad_base64") for k, v in BASE64.items()]
    c += [
        Case(
            "base64_of_text",
            "base64",
            base64.b64encode(b"hello world"),
            "4xx",
            "unsupported_format",
        )
    ]
    for name, value in (
        ("file_url", b"file:///etc/passwd"),
        ("path", b"/etc/passwd"),
        ("loopback_url", b"http://127.0.0.1:1/x.png"),
        ("metadata_url", b"http://169.254.169.254/latest/meta-data/"),
    ):
        c.append(
            Case(
                f"multipart_text_images_{name}",
                "multipart",
                _multipart([("images", value, None)]),
                "4xx",
                "not_a_file",
                FORM,
            )
        )
    c += [
        Case(
            "multipart_no_boundary",
            "multipart",
            _multipart([("images", b"x", "a.png")]),
            "4xx",
            "malformed_multipart",
            "multipart/form-data",
        ),
        Case(
            "multipart_1001_parts",
            "multipart",
            _multipart([("top_k", b"1", None)] * 1001),
            "4xx",
            "malformed_multipart",
            FORM,
        ),
        Case(
            "multipart_field_over_1mib",
            "multipart",
            _multipart([("top_k", b"1" * (1 << 20 | 1), None)]),
            "4xx",
            "malformed_multipart",
            FORM,
        ),
        Case(
            "multipart_non_utf8_file_for_top_k",
            "multipart",
            _multipart([("top_k", b"\xff\xfe\x00", "top_k.bin")]),
            "4xx",
            None,
            FORM,
        ),
        Case(
            "multipart_unterminated",
            "multipart",
            b"--hostile\r\nContent-Disposition: form-da",
            "4xx",
            None,
            FORM,
        ),
        Case(
            "urlencoded_images_path",
            "multipart",
            b"images=%2Fetc%2Fpasswd",
            "4xx",
            "not_a_file",
            "application/x-www-form-urlencoded",
        ),
        Case(
            "json_body_is_a_url",
            "multipart",
            b"http://127.0.0.1:1/x.json",
            "4xx",
            None,
            "application/json",
        ),
        Case(
            "json_not_utf8",
            "multipart",
            b'{"images_base64": ["\xff"]}',
            "4xx",
            None,
            "application/json",
        ),
    ]
    c += [
        Case("protobuf_garbage", "protobuf", b"\xff\xff\xff\xff", "4xx", "malformed_message"),
        Case("protobuf_truncated_length", "protobuf", b"\x0a\x05ab", "4xx", "malformed_message"),
        Case("protobuf_truncated_varint", "protobuf", b"\x10\xff\xff", "4xx", "malformed_message"),
        Case("protobuf_bad_wire_type", "protobuf", b"\x0f\x00", "4xx", "malformed_message"),
        Case("protobuf_deep_groups", "protobuf", b"\x0b" * 200_000, "4xx", "malformed_message"),
        Case(
            "protobuf_bad_utf8_string", "protobuf", _bad_utf8_map_kind(), "4xx", "malformed_message"
        ),
    ]
    return c


def _bad_utf8_map_kind() -> bytes:
    """An ExplainRequest whose string field map_kind holds bytes that are not UTF-8."""
    from protonmf.service.grpc.server import pb

    field = pb.ExplainRequest.DESCRIPTOR.fields_by_name["map_kind"].number
    return bytes([field << 3 | 2, 2]) + b"\xc3\x28"


def cases() -> list[Case]:
    return image_cases() + request_cases()


SUFFIX = {
    "image": ".bin",
    "class": ".txt",
    "base64": ".txt",
    "multipart": ".body",
    "protobuf": ".pb",
}


def write(folder: Path) -> list[dict]:
    """Write every case's file and index.json into ``folder``; returns the index entries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for case in cases():
        entry = asdict(case)
        del entry["data"]
        entry["file"] = case.name + SUFFIX[case.kind]
        (folder / entry["file"]).write_bytes(case.data)
        index.append(entry)
    names = [e["name"] for e in index]
    assert len(set(names)) == len(names), "case names must be unique"
    (folder / "index.json").write_text(json.dumps({"version": 1, "cases": index}, indent=1))
    return index


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            __doc__.strip().splitlines()[0], "\nusage: hostile_corpus.py OUT_DIR", file=sys.stderr
        )
        return 2
    index = write(Path(argv[0]))
    print(f"{len(index)} cases in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
