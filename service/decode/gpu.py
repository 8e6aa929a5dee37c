"""JPEG pixels decoded on the GPU (PROTONMF_JPEG_DECODER=nvimgcodec): nvImageCodec, no torch.

Opt-in, as PROTONMF_JPEG_DRAFT is: nvJPEG's inverse DCT and chroma upsampling are not
libjpeg-turbo's, so the pixels, and the logits, are close to timm's but not equal to them.
Pillow still reads and checks the image's header first (limits, geometry, decoding cost:
``imaging.decode_image``); only a JPEG's pixels come from the GPU, and resize and crop run
on the CPU as timm's do. A JPEG that nvImageCodec cannot decode (it answers None) is
decoded by Pillow instead.

Needs ``pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg-cu13`` and a GPU: without them the
service refuses to start with this setting (as with PROTONMF_DEVICE=cuda), rather than
quietly decoding on the CPU.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from protonmf.graph import ProviderError

__all__ = ["GpuJpegDecoder"]

INSTALL = "pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg-cu13 (-cu12 on CUDA 12)"


class GpuJpegDecoder:
    """``decode(data)``: a JPEG's bytes → RGB PIL image (EXIF orientation applied), or None."""

    def __init__(self, device_id: int = 0):
        try:
            from nvidia import nvimgcodec
        except ImportError as e:
            raise ProviderError(
                f"PROTONMF_JPEG_DECODER=nvimgcodec needs nvImageCodec: {INSTALL}"
            ) from e
        self._codec = nvimgcodec
        try:
            # fancy upsampling: libjpeg-turbo's default, so the chroma is interpolated as
            # Pillow's decoder (and timm's loader) does it
            self._decoder = nvimgcodec.Decoder(device_id=device_id, options=":fancy_upsampling=1")
        except RuntimeError as e:  # no GPU, no CUDA runtime
            raise ProviderError(
                f"PROTONMF_JPEG_DECODER=nvimgcodec: nvImageCodec cannot use GPU {device_id}: {e}"
            ) from e
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB
        )
        # one decode at a time: the decoder's thread safety is not documented
        self._lock = threading.Lock()

    def decode(self, data: bytes) -> Image.Image | None:
        with self._lock:
            decoded = self._decoder.decode(self._codec.CodeStream(data), params=self._params)
            host = None if decoded is None else decoded.cpu()
        if host is None:
            return None
        pixels = np.asarray(host)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            return None  # not the 8-bit RGB asked for: Pillow decodes it
        return Image.fromarray(pixels, "RGB")
