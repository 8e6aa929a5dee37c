"""How an image becomes the graph's input: timm's eval transform, pixel for pixel, without
torch. The converter records a ``Preprocessing`` in the manifest; the service, the analysis
and the tests apply it with ``resize_crop`` + ``normalize`` (or ``preprocess``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["INTERPOLATIONS", "Preprocessing", "normalize", "preprocess", "resize_crop"]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the graph's input tensor (N, channels, height, width).

    Reproduces timm's eval transform (``timm.data.create_transform`` of the model's resolved
    data config) pixel for pixel on PIL images: convert to ``color_mode``, resize, centre-crop
    to ``height`` x ``width``, scale to [0, 1], then ``(x - mean) / std`` per channel.

    ``crop_mode`` (added; default ``"center"``, the only mode older manifests knew) picks
    the resize, as timm's ``crop_mode`` does:

    - ``"center"``: aspect kept. Without ``resize_hw`` the shorter side becomes ``resize`` and
      the longer ``int(resize * long / short)`` (torchvision ``Resize(int)``). With
      ``resize_hw`` = (h, w) the image is scaled by ``min(H / h, W / w)``, each side rounded
      (timm ``ResizeKeepRatio``); timm does this when a non-square input's two resize targets
      differ.
    - ``"squash"``: to exactly ``resize_hw`` (or ``resize`` x ``resize``), aspect not kept.
    - ``"border"``: aspect kept, the longer side fits (``max`` instead of ``min``); the crop
      pads with ``round(255 * mean)``.

    The crop is torchvision's ``CenterCrop``: offset ``int(round((side - crop) / 2))``; an
    image smaller than the crop is padded (zeros; the mean colour in ``"border"`` mode).
    ``resize`` is always a shorter side that is enough for the resize to only shrink (JPEG
    draft decoding relies on it): the target itself for square centre resizes, otherwise
    ``max(resize_hw)``. ``resize_hw`` (added; default None) is written only where set.
    Older artifacts with a non-square crop (no ``resize_hw``) keep their conversion's
    resize: shorter side to ``resize``, then each side at least the crop's.
    """

    height: int
    width: int
    resize: int
    color_mode: str = "RGB"  # "RGB" (3 channels) or "L" (1 channel)
    interpolation: str = "bilinear"  # a key of INTERPOLATIONS
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_mode: str = "center"  # "center" | "squash" | "border"
    resize_hw: tuple[int, int] | None = None  # (h, w) resize target where not square

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # Defaults left out: a square centre crop stays readable by older services.
        if d["crop_mode"] == "center":
            del d["crop_mode"]
        if d["resize_hw"] is None:
            del d["resize_hw"]
        else:
            d["resize_hw"] = list(d["resize_hw"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        if d.get("resize_hw") is not None:
            d["resize_hw"] = tuple(d["resize_hw"])
        return cls(**d)


# PIL enum values; the names are timm's, the numbers torchvision's pil_modes_mapping.
# timm interpolation names → PIL resampling filters (the converter checks against it)
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_CROP_MODES = ("center", "squash", "border")


def _resized_size(w: int, h: int, spec: Preprocessing) -> tuple[int, int]:
    """(width, height) after timm's resize step; same arithmetic, so the same pixels."""
    th, tw = spec.resize_hw or (spec.resize, spec.resize)
    if spec.crop_mode == "squash":  # torchvision Resize((h, w))
        return tw, th
    if spec.crop_mode == "center" and spec.resize_hw is None:  # torchvision Resize(int)
        short, long = (w, h) if w <= h else (h, w)
        long = int(spec.resize * long / short)
        new_w, new_h = (spec.resize, long) if w <= h else (long, spec.resize)
        if spec.height != spec.width:  # only older artifacts: each side clamped to the crop
            new_w, new_h = max(spec.width, new_w), max(spec.height, new_h)  # as converted
        return new_w, new_h
    # timm ResizeKeepRatio: longest=0 ("center") or 1 ("border"), Python's round
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if spec.crop_mode == "border" else min(ratio_h, ratio_w)
    return round(w / ratio), round(h / ratio)


def _crop_offset(side: int, crop: int) -> int:
    """torchvision CenterCrop: pad a short side by (crop - side) // 2 first, else round."""
    if crop > side:
        return -((crop - side) // 2)
    return int(round((side - crop) / 2.0))


def resize_crop(image, spec: Preprocessing) -> np.ndarray:
    """PIL image -> uint8 array (height, width) for "L" or (height, width, 3) for "RGB".

    The geometric half of preprocessing: colour conversion, resize, centre crop, as
    ``Preprocessing`` describes (timm's eval transform, exactly). Kept apart from
    ``normalize`` so a server can move compact uint8 crops around and normalise whole
    batches at once.
    """
    from PIL import Image

    if spec.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {spec.interpolation!r}")
    if spec.crop_mode not in _CROP_MODES:
        raise ValueError(f"unknown crop_mode {spec.crop_mode!r}; known: {', '.join(_CROP_MODES)}")
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    new_size = _resized_size(*image.size, spec)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling(INTERPOLATIONS[spec.interpolation]))
    w, h = image.size
    left, top = _crop_offset(w, spec.width), _crop_offset(h, spec.height)
    if spec.width <= w and spec.height <= h:  # inside the image: the usual case
        image = image.crop((left, top, left + spec.width, top + spec.height))
    else:  # smaller than the crop: pad, as torchvision's CenterCrop / timm's CenterCropOrPad
        fill = [round(255 * m) for m in spec.mean] if spec.crop_mode == "border" else [0]
        fill = fill[0] if spec.color_mode == "L" else tuple(fill * (3 // len(fill)))
        canvas = Image.new(spec.color_mode, (spec.width, spec.height), fill)
        canvas.paste(image, (-left, -top))
        image = canvas
    return np.asarray(image, dtype=np.uint8)


def normalize(crops: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 crops (N, h, w) or (N, h, w, 3) -> float32 (N, channels, h, w), normalised.

    (x / 255 − mean) / std in float32, in place on one contiguous buffer: the same operations
    in the same order as the plain expression (bit-identical), without its temporaries and
    strided passes — 7× less time at 32 × 224² (it was most of a GPU batch's host time).
    """
    src = crops[:, None] if crops.ndim == 3 else crops.transpose(0, 3, 1, 2)  # (N, c, h, w)
    x = np.empty(src.shape, np.float32)
    np.copyto(x, src, casting="unsafe")
    x /= np.float32(255.0)
    x -= np.asarray(spec.mean, np.float32)[:, None, None]
    x /= np.asarray(spec.std, np.float32)[:, None, None]
    return x


def preprocess(image, spec: Preprocessing) -> np.ndarray:
    """PIL image -> float32 array of shape (channels, height, width), normalised."""
    return normalize(resize_crop(image, spec)[None], spec)[0]
