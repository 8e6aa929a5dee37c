"""JPEG pixels from the GPU (PROTONMF_JPEG_DECODER=nvimgcodec, service/gpu_decode.py).

Without a GPU: the wiring (only JPEGs, only after Pillow's header checks, Pillow when the
GPU decoder declines), the refusals (no nvImageCodec, no GPU, with decode processes), and
the nvImageCodec calls against a stand-in module. On a GPU (gpu mark): the pixels and the
logits against Pillow's, the figures printed for benchmarks/gpu_checks.sh's log."""

import io
import sys
import types

import numpy as np
import pytest
from PIL import Image

from protonmf.artifact import Preprocessing, resize_crop
from protonmf.graph import ProviderError
from protonmf.service.decode.gpu import GpuJpegDecoder
from protonmf.service.decode.images import Limits, decode_image
from protonmf.service.ops.errors import PayloadTooLarge
from protonmf.service.ops.settings import Settings, SettingsError

SPEC = Preprocessing(height=224, width=224, resize=256, interpolation="bicubic")


def _encoded(fmt: str, size=(300, 200)) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(out, format=fmt)
    return out.getvalue()


def test_only_jpegs_go_to_the_other_decoder_and_none_falls_back_to_pillow():
    calls = []
    marker = Image.new("RGB", (300, 200), (1, 2, 3))

    def gpu(data):
        calls.append(data)
        return marker

    jpeg, png = _encoded("JPEG"), _encoded("PNG")
    assert decode_image(jpeg, Limits(), SPEC, gpu) is marker and calls == [jpeg]
    assert decode_image(png, Limits(), SPEC, gpu) is not marker and calls == [jpeg]
    pillow = decode_image(jpeg, Limits(), SPEC)
    declined = decode_image(jpeg, Limits(), SPEC, lambda data: None)
    np.testing.assert_array_equal(np.asarray(declined), np.asarray(pillow))


def test_the_header_is_checked_before_the_gpu_sees_the_image():
    def gpu(data):
        raise AssertionError("an image over the limits reached the GPU decoder")

    with pytest.raises(PayloadTooLarge):
        decode_image(_encoded("JPEG"), Limits(max_pixels=1000), SPEC, gpu)
    # a drafted JPEG (draft mode, or over the raster limit) stays with Pillow
    decode_image(_encoded("JPEG", (600, 600)), Limits(jpeg_draft=True), SPEC, gpu)


def _fake_nvimgcodec(monkeypatch, decoder_error=None, answer="rgb"):
    """A stand-in for nvidia.nvimgcodec with the calls GpuJpegDecoder makes."""
    seen = {}

    class Host:
        def __init__(self, pixels):
            self.pixels = pixels

        def __array__(self, dtype=None, copy=None):
            return self.pixels

    class Decoded:
        def __init__(self, pixels):
            self.pixels = pixels

        def cpu(self):
            return Host(self.pixels)

    class Decoder:
        def __init__(self, device_id=-1, options=""):
            if decoder_error:
                raise RuntimeError(decoder_error)
            seen["decoder"] = (device_id, options)

        def decode(self, stream, params=None):
            seen["params"] = params
            if answer is None:
                return None
            pixels = np.asarray(Image.open(io.BytesIO(stream.data)).convert("RGB"))
            return Decoded(pixels if answer == "rgb" else pixels[..., 0])

    module = types.SimpleNamespace(
        Decoder=Decoder,
        CodeStream=lambda data: types.SimpleNamespace(data=data),
        DecodeParams=lambda **kw: kw,
        ColorSpec=types.SimpleNamespace(SRGB="srgb"),
    )
    package = types.ModuleType("nvidia")
    package.nvimgcodec = module
    monkeypatch.setitem(sys.modules, "nvidia", package)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    return seen


def test_decoder_calls_nvimgcodec_as_documented(monkeypatch):
    seen = _fake_nvimgcodec(monkeypatch)
    decoder = GpuJpegDecoder(device_id=0)
    jpeg = _encoded("JPEG")
    image = decoder.decode(jpeg)
    assert image.mode == "RGB" and image.size == (300, 200)
    assert seen["decoder"] == (0, ":fancy_upsampling=1")
    assert seen["params"] == {"apply_exif_orientation": True, "color_spec": "srgb"}
    want = resize_crop(decode_image(jpeg, Limits(), SPEC), SPEC)
    np.testing.assert_array_equal(resize_crop(image, SPEC), want)


@pytest.mark.parametrize("answer", [None, "grey"])
def test_an_answer_that_is_not_8bit_rgb_goes_back_to_pillow(monkeypatch, answer):
    _fake_nvimgcodec(monkeypatch, answer=answer)
    assert GpuJpegDecoder().decode(_encoded("JPEG")) is None


def test_refused_without_nvimgcodec_or_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia", None)  # import fails
    with pytest.raises(ProviderError, match="pip install nvidia-nvimgcodec-cu13"):
        GpuJpegDecoder()
    _fake_nvimgcodec(monkeypatch, decoder_error="CUDA Runtime failure: '#35'")
    with pytest.raises(ProviderError, match="cannot use GPU 0: CUDA Runtime failure"):
        GpuJpegDecoder()


def test_setting_refused_with_decode_processes():
    with pytest.raises(SettingsError, match="PROTONMF_DECODE_PROCESSES=0"):
        Settings.from_env({"PROTONMF_JPEG_DECODER": "nvimgcodec", "PROTONMF_DECODE_PROCESSES": "2"})
    assert Settings.from_env({"PROTONMF_JPEG_DECODER": "nvimgcodec"}).jpeg_decoder == "nvimgcodec"


@pytest.mark.gpu
def test_gpu_jpeg_pixels_and_logits_close_to_pillows(lite0_artifact):
    """On a GPU with nvImageCodec: crops within a few grey levels of Pillow's, top-1 the same;
    the figures go to the log (benchmarks/gpu_checks.sh run)."""
    pytest.importorskip("nvidia.nvimgcodec")
    from protonmf.sample_data import imagenet_photo_files
    from protonmf.service.engine.model import Model

    model = Model.load(lite0_artifact)
    gpu = GpuJpegDecoder()
    blobs = [f.read_bytes() for f in imagenet_photo_files()]
    pillow = np.stack([model.prepare(b) for b in blobs])
    model.jpeg_decoder = gpu.decode
    nvjpeg = np.stack([model.prepare(b) for b in blobs])
    diff = np.abs(pillow.astype(int) - nvjpeg.astype(int))
    a = model.infer(pillow, {"logits"})["logits"]
    b = model.infer(nvjpeg, {"logits"})["logits"]
    print(
        f"\nnvImageCodec vs Pillow on {len(blobs)} photos: pixels max |Δ| {diff.max()}, mean "
        f"{diff.mean():.3f}; logits max |Δ| {np.abs(a - b).max():.4f}; top-1 agree "
        f"{(a.argmax(1) == b.argmax(1)).sum()}/{len(blobs)}"
    )
    assert diff.mean() < 2 and (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_data_plane_refuses_to_start_without_nvimgcodec(fashion_artifact, monkeypatch):
    """The setting is not ignored where it cannot work: Engine.load fails, naming it."""
    from protonmf.service.engine.pipeline import Engine

    monkeypatch.setitem(sys.modules, "nvidia", None)
    env = {"PROTONMF_ARTIFACT": str(fashion_artifact), "PROTONMF_JPEG_DECODER": "nvimgcodec"}
    with pytest.raises(ProviderError, match="PROTONMF_JPEG_DECODER=nvimgcodec needs"):
        Engine.load(Settings.from_env(env))
    _fake_nvimgcodec(monkeypatch)
    plane = Engine.load(Settings.from_env(env))
    assert plane.model.jpeg_decoder is not None
    jpeg = _encoded("JPEG")
    np.testing.assert_array_equal(
        plane.model.prepare(jpeg),
        resize_crop(decode_image(jpeg, Limits(), plane.model.spec), plane.model.spec),
    )
