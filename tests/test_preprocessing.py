"""Preprocessing equals timm's own eval transform, pixel for pixel.

The reference is ``timm.data.create_transform(**resolve_data_config({}, model=model))``,
run on the same PIL image; ours is ``preprocessing_from_timm(model)`` + ``resize_crop`` /
``preprocess`` (numpy and Pillow only). Models are built with ``pretrained=False``: only
their data config matters here, nothing is downloaded.
"""

import functools
import io

import numpy as np
import pytest
from PIL import Image

from protonmf.artifact import Preprocessing, preprocess, resize_crop

torch = pytest.importorskip("torch")  # timm and the converter: the convert extra
timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

from protonmf.converter.models import preprocessing_from_timm  # noqa: E402

# (width, height): landscape, portrait, odd, square, exactly the crop, very wide, very tall,
# smaller than the crop, one pixel off square.
SIZES = [
    (500, 375),
    (375, 500),
    (333, 251),
    (640, 640),
    (224, 224),
    (1001, 199),
    (97, 403),
    (100, 80),
    (257, 256),
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors: torch's thread hand-offs cost more than they save on busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _model(
    name="resnet10t",
    crop_pct=0.875,
    input_size=(3, 224, 224),
    interpolation="bilinear",
    crop_mode="center",
    **kwargs,
):
    overlay = dict(
        crop_pct=crop_pct, input_size=input_size, interpolation=interpolation, crop_mode=crop_mode
    )
    if input_size[0] == 1:
        overlay.update(mean=(0.45,), std=(0.27,))
        kwargs["in_chans"] = 1
    return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)


@functools.cache  # read-only: resize_crop and timm's transforms return new images
def _image(size, mode, seed=0):
    """Noise with a gradient under it: any shifted offset or resampled pixel shows."""
    w, h = size
    rng = np.random.default_rng(seed + w * 7 + h)
    ramp = np.linspace(0, 120, w)[None, :, None] + np.linspace(0, 80, h)[:, None, None]
    px = np.clip(ramp + rng.integers(0, 56, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(px, "RGB").convert(mode)


def _timm_geometric(model):
    """timm's eval transform without ToTensor / Normalize: PIL in, PIL out."""
    tf = create_transform(**resolve_data_config({}, model=model))
    steps = [t for t in tf.transforms if type(t).__name__ not in ("MaybeToTensor", "Normalize")]
    assert len(steps) == 2, tf  # resize + crop; anything else would go unchecked here
    return steps, tf


def _assert_same_pixels(model, spec, sizes=SIZES):
    steps, full = _timm_geometric(model)
    for size in sizes:
        for image_mode in ("RGB", "L"):
            img = _image(size, image_mode)
            want = img.convert(spec.color_mode)
            for step in steps:
                want = step(want)
            want = np.asarray(want, dtype=np.uint8)
            got = resize_crop(img, spec)
            assert got.shape == want.shape, (size, image_mode, got.shape, want.shape)
            diff = np.abs(got.astype(int) - want.astype(int)).max()
            assert diff == 0, f"{size} {image_mode}: max |Δ| {diff} grey levels"
    # ...and the float tensors after ToTensor + Normalize (one image: the same pixels in)
    x_timm = full(img.convert(spec.color_mode)).numpy()
    np.testing.assert_allclose(preprocess(img, spec), x_timm, rtol=0, atol=1e-6)


CONFIGS = [
    dict(crop_pct=cp, input_size=size, interpolation=interp)
    for cp in (0.875, 0.9, 0.95, 1.0)
    for size in ((3, 224, 224), (3, 160, 224))
    for interp in ("bilinear", "bicubic")
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_resize_crop_equals_timm_eval_transform(cfg):
    model = _model(**{**cfg, "input_size": tuple(cfg["input_size"])})
    spec = preprocessing_from_timm(model)
    _assert_same_pixels(model, spec)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(crop_pct=0.9, input_size=(3, 256, 192)),  # portrait input
        dict(crop_pct=1.15, input_size=(3, 224, 224)),  # resize < crop: zero padding
        dict(crop_pct=0.875, input_size=(1, 224, 224)),  # greyscale model
        dict(crop_pct=0.875, interpolation="nearest"),
        dict(crop_pct=0.9, interpolation="lanczos", input_size=(3, 160, 224)),
        dict(crop_pct=0.9, interpolation="box"),
        dict(crop_pct=0.9, interpolation="hamming"),
        dict(crop_pct=0.9, crop_mode="squash"),
        dict(crop_pct=0.95, crop_mode="squash", input_size=(3, 160, 224)),
        dict(crop_pct=1.0, crop_mode="border"),  # pads with the mean colour
        dict(crop_pct=0.9, crop_mode="border", input_size=(3, 160, 224)),
        dict(crop_pct=0.875, crop_mode="border", input_size=(1, 224, 224)),
    ],
    ids=lambda c: "-".join(map(str, c.values())),
)
def test_resize_crop_equals_timm_other_modes(cfg):
    model = _model(**cfg)
    spec = preprocessing_from_timm(model)
    _assert_same_pixels(model, spec)


def test_vit_non_square_input_equals_timm():
    """A ViT with a fixed non-square input: the size it was built for is the crop."""
    model = _model("test_vit", crop_pct=0.9, input_size=(3, 160, 224))
    spec = preprocessing_from_timm(model)
    assert (spec.height, spec.width) == (160, 224) and spec.resize_hw == (177, 248)
    _assert_same_pixels(model, spec, SIZES[:4])


def test_resize_is_floor_of_size_over_crop_pct():
    """timm's arithmetic, e.g. 248 px (not 249) at 0.9 and 341 (not 342) for 299 at 0.875."""
    assert preprocessing_from_timm(_model(crop_pct=0.9)).resize == 248
    assert preprocessing_from_timm(_model(crop_pct=0.875, input_size=(3, 299, 299))).resize == 341


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(crop_mode="fancy"), "crop_mode 'fancy'"),
        (dict(interpolation="random"), "interpolation 'random'"),
    ],
)
def test_transform_that_cannot_be_reproduced_is_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        preprocessing_from_timm(_model(**cfg))


def test_older_manifests_load_and_default_specs_write_the_old_keys():
    old = {
        "height": 224,
        "width": 224,
        "resize": 256,
        "color_mode": "RGB",
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    spec = Preprocessing.from_dict(old)
    assert spec.crop_mode == "center" and spec.resize_hw is None
    assert spec.to_dict() == old  # an older service can read what we write for square crops
    wide = Preprocessing(160, 224, 248, crop_mode="border", resize_hw=(177, 248))
    assert Preprocessing.from_dict(wide.to_dict()) == wide
    with pytest.raises(ValueError, match="crop_mode"):
        resize_crop(_image((50, 50), "RGB"), Preprocessing(8, 8, 8, crop_mode="fancy"))


def test_older_non_square_artifacts_resize_as_they_were_converted():
    """Older converters wrote no ``resize_hw``; such artifacts clamp each side to the crop."""
    img = _image((500, 500), "RGB")
    legacy = Preprocessing(160, 224, 178)  # (h, w) crop, round(160 / 0.9)
    want = img.resize((224, 178), Image.Resampling.BILINEAR).crop((0, 9, 224, 169))
    np.testing.assert_array_equal(resize_crop(img, legacy), np.asarray(want))
    with pytest.raises(ValueError, match="non-square"):
        preprocessing_from_timm(_model(crop_pct=2.0, input_size=(3, 224, 225)))


@pytest.mark.parametrize("input_size", [(3, 224, 224), (3, 160, 224), (3, 256, 192)])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_jpeg_draft_keeps_enough_pixels(input_size, crop_mode):
    """service.imaging drafts JPEGs to a shorter side of ``spec.resize``: the resize after it
    must still only shrink, for every crop mode and non-square input."""
    from protonmf.artifact.preprocessing import _resized_size
    from protonmf.service.decode.images import Limits, decode_image

    spec = preprocessing_from_timm(_model(crop_pct=0.9, input_size=input_size, crop_mode=crop_mode))
    for size in [(1200, 900), (900, 1200), (2400, 600), (600, 2400)]:
        blob = io.BytesIO()
        _image((size[0] // 8, size[1] // 8), "RGB").resize(size).save(blob, format="JPEG")
        drafted = decode_image(blob.getvalue(), Limits(jpeg_draft=True), spec)
        assert drafted.size[0] < size[0]  # the draft did reduce it
        w, h = _resized_size(*drafted.size, spec)
        assert w <= drafted.size[0] and h <= drafted.size[1], (size, drafted.size, (w, h))


def test_served_decode_is_timms_by_default():
    """The service's default decoding of a JPEG gives timm's transform's pixels exactly (the
    full decode, as timm's loader reads it: no draft), for a JPEG that a draft could shrink."""
    from protonmf.service.decode.images import Limits, decode_image

    model = _model(interpolation="bicubic")
    spec = preprocessing_from_timm(model)
    for size in [(1200, 900), (512, 512), (600, 2400)]:
        blob = io.BytesIO()
        _image(size, "RGB").save(blob, format="JPEG", quality=90)
        served = resize_crop(decode_image(blob.getvalue(), Limits(), spec), spec)
        reference = Image.open(io.BytesIO(blob.getvalue())).convert("RGB")  # timm's loader
        steps, _ = _timm_geometric(model)
        for step in steps:
            reference = step(reference)
        want = np.asarray(reference)
        np.testing.assert_array_equal(served, want)


def test_jpeg_over_the_raster_limit_is_drafted_not_refused(caplog):
    """A JPEG whose full raster is over max_raster_bytes is decoded at reduced scale, and the
    log says its pixels are not timm's."""
    from protonmf.service.decode.images import Limits, decode_image, raster_bytes

    spec = preprocessing_from_timm(_model())
    blob = io.BytesIO()
    _image((150, 100), "RGB").resize((1500, 1000)).save(blob, format="JPEG")
    small = Limits(max_raster_bytes=1500 * 1000 * 4 - 1)
    image = decode_image(blob.getvalue(), small, spec)
    assert image.size[0] < 1500 and raster_bytes(image) <= small.max_raster_bytes
    assert "1500×1000 decoded at reduced scale" in caplog.text
    caplog.clear()
    assert decode_image(blob.getvalue(), Limits(), spec).size == (1500, 1000)
    decode_image(blob.getvalue(), Limits(jpeg_draft=True), spec)  # chosen: nothing to say
    assert "reduced scale" not in caplog.text


# ---- served top-1 equals timm's transform + model on photos ----------------------------


def _photos(root):
    files = sorted(root.glob("*/*.jpg"))
    return [Image.open(f) for f in files], np.array([int(f.parent.name) for f in files])


def _assert_same_logits(model, photos):
    spec = preprocessing_from_timm(model)
    tf = create_transform(**resolve_data_config({}, model=model))
    ours = torch.from_numpy(np.stack([preprocess(im, spec) for im in photos]))
    theirs = torch.stack([tf(im.convert("RGB")) for im in photos])
    with torch.no_grad():
        a, b = model(ours), model(theirs)
    assert torch.equal(a.argmax(1), b.argmax(1))
    rel = (a - b).abs().max() / b.abs().max()
    assert rel <= 1e-4, f"logits differ by {rel:.2e} relative"
    return b


def test_random_model_logits_equal_timm_on_photos(imagenet_photos):
    torch.manual_seed(0)
    overlay = dict(crop_pct=0.9, input_size=(3, 224, 224), interpolation="bilinear")
    model = timm.create_model(
        "test_efficientnet", pretrained=False, num_classes=50, pretrained_cfg_overlay=overlay
    ).eval()
    assert preprocessing_from_timm(model).resize == 248
    _assert_same_logits(model, _photos(imagenet_photos)[0])


def test_lite0_top1_equals_timm_on_photos(imagenet_photos):
    from protonmf.converter.models import ModelSource, load_model
    from protonmf.sample_data import lite0_checkpoint

    model = load_model(ModelSource("tf_efficientnet_lite0", str(lite0_checkpoint())))
    assert resolve_data_config({}, model=model)["crop_pct"] == 0.875
    photos, labels = _photos(imagenet_photos)
    logits = _assert_same_logits(model, photos)
    # real weights on real photos (folders are ImageNet classes): most are right
    assert (logits.argmax(1).numpy() == labels).mean() >= 0.7
