"""Tier 1: the transport-free core, called directly (no BentoML, no torch in service/)."""

import io
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    FASHION_DATA,
    animated,
    bomb_png,
    jpeg_bytes,
    png_bytes,
    proto_model_from_artifact,
    run_images,
)
from PIL import Image

from protonmf.service.decode.images import Limits, decode_image
from protonmf.service.engine.explanations import heatmap_entries
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import ExplainOptions, Intervention
from protonmf.service.engine.pipeline import Engine
from protonmf.service.engine.render import render_overlay
from protonmf.service.ops.errors import (
    InvalidInput,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
)


@pytest.fixture(scope="module")
def core(core_topk):
    """The top-k graph: maps and terms of the k predicted classes, the rest from pooled
    (``core_all``, conftest: the Fashion default with every class's maps)."""
    return core_topk


@pytest.fixture(scope="module")
def bag_png():
    return next((FASHION_DATA / "test" / "bag").glob("*.png")).read_bytes()


def test_service_does_not_import_torch():
    code = "import protonmf.service.service, protonmf.service.engine.pipeline, sys; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_explanation_adds_up_and_names_classes(core, bag_png):
    (out,) = run_images(core, [bag_png])
    exp = core.explanations.explanation(out, ExplainOptions(top_k=3))
    assert exp["top_k"][0]["class"] == "bag"
    assert exp["exactness"] <= 1e-4
    for entry in exp["top_k"]:
        total = sum(p["contribution"] for p in entry["prototypes"]) + entry["bias"]
        assert total == pytest.approx(entry["logit"], abs=1e-4 * abs(entry["logit"]) + 1e-6)
        assert len(entry["prototypes"]) == core.model.p
        hm = entry["prototypes"][0]["heatmap"]
        assert hm["shape"] == [7, 7] and len(hm["values"]) == 7
        assert 0 <= hm["peak"]["row"] < 7
        box = hm["box"]["feature"]
        assert box["top"] < box["bottom"] <= 7 and box["left"] < box["right"] <= 7
    probs = [e["probability"] for e in exp["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_intervention_equals_recomputed_logits(core, bag_png):
    (out,) = run_images(core, [bag_png])
    top = int(np.argmax(out["logits"]))
    assert top == out["topk_classes"][0]
    contributions = out["topk_contributions"][0]  # the graph's own, rank 0
    best = int(np.argmax(contributions))
    opts = ExplainOptions(top_k=3, interventions=(Intervention(core.model.classes[top], best),))
    iv = core.explanations.explanation(out, opts)["intervention"]
    want = out["logits"][top] - contributions[best]
    assert iv["logits"][core.model.classes[top]] == pytest.approx(float(want), rel=1e-6)
    logits = out["logits"].astype(np.float64).copy()
    logits[top] = want
    assert iv["prediction_after"] == core.model.classes[int(np.argmax(logits))]
    assert iv["prediction_changed"] == (int(np.argmax(logits)) != top)
    assert iv["switched_off"] == [{"class": core.model.classes[top], "prototype": best}]


def test_exactness_metric_keeps_the_largest_gap(core, bag_png):
    from protonmf.service.ops.metrics import METRICS

    out = run_images(core, [bag_png])[0]
    broken = dict(out, topk_bias=out["topk_bias"] + 1.0)  # logit ≠ Σ contributions + bias
    assert core.explanations.explanation(broken, ExplainOptions(heatmaps=False))["exactness"] > 1e-3
    breach = METRICS.exactness_gap._value.get()
    assert breach > 1e-3
    core.explanations.explanation(
        out, ExplainOptions(heatmaps=False)
    )  # a good one after the breach
    assert METRICS.exactness_gap._value.get() == breach


def scores_all_v1_copy(artifact, dst):
    """The artifact as format version 1 wrote it: all-class scores, no ``graph.scores``."""
    import json
    import shutil

    from protonmf.artifact import sha256_file
    from protonmf.converter.export import export_onnx, graph_spec

    shutil.copytree(artifact, dst)
    _, proto, prep, m = proto_model_from_artifact(artifact, maps="topk", scores="all")
    export_onnx(proto, (prep.channels, prep.height, prep.width), dst / "model.onnx")
    m["graph"] = graph_spec(proto, (prep.channels, prep.height, prep.width), m["feature_grid"])
    del m["graph"]["scores"]
    m["format_version"] = 1
    m["files"]["model.onnx"] = sha256_file(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_version1_all_scores_artifact_explains_the_same(
    core, fashion_topk_artifact, bag_png, tmp_path
):
    """Both scores modes give the same explanation and interventions, in the top-k and
    outside it (computed from the pooled features in the top-k mode)."""
    old = Engine.from_artifact(scores_all_v1_copy(fashion_topk_artifact, tmp_path / "v1"))
    assert old.model.scores_mode == "all" and core.model.scores_mode == "topk"
    (new_out,) = run_images(core, [bag_png])
    (old_out,) = run_images(old, [bag_png])
    assert "contributions" in old_out and "contributions" not in new_out
    outside = [c for c in range(len(core.model.classes)) if c not in new_out["topk_classes"]]
    pairs = (
        Intervention(core.model.classes[int(new_out["topk_classes"][0])], 0),
        Intervention(core.model.classes[outside[0]], 1),
        Intervention(outside[-1], 2),
    )
    opts = ExplainOptions(top_k=3, interventions=pairs)
    new, old_exp = (
        core.explanations.explanation(new_out, opts),
        old.explanations.explanation(old_out, opts),
    )
    assert new["intervention"]["switched_off"] == old_exp["intervention"]["switched_off"]
    for c, v in old_exp["intervention"]["logits"].items():
        assert new["intervention"]["logits"][c] == pytest.approx(v, rel=1e-5, abs=1e-5)
    for a, b in zip(new["top_k"], old_exp["top_k"], strict=True):
        assert a["class"] == b["class"] and a["bias"] == pytest.approx(b["bias"], abs=1e-6)
        for pa, pb in zip(a["prototypes"], b["prototypes"], strict=True):
            assert pa["contribution"] == pytest.approx(pb["contribution"], rel=1e-5, abs=1e-5)
            np.testing.assert_allclose(pa["heatmap"]["values"], pb["heatmap"]["values"], atol=1e-4)
    for c in outside:  # the service's pooled-feature terms == the all-scores graph's outputs
        scores, contributions, bias = core.explanations.terms(new_out, c)
        np.testing.assert_allclose(contributions, old_out["contributions"][c], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores, old_out["scores"][c], rtol=1e-5, atol=1e-5)
        assert bias == pytest.approx(float(old_out["bias"][c]), abs=1e-6)
    assert old.listings.model_info()["scores"] == "all"


def test_explanation_beyond_the_graph_top_k(core, bag_png):
    """top_k over the graph's k without heatmaps: classes k+1… come from the pooled
    features and still add up to their logits."""
    (out,) = run_images(core, [bag_png])
    exp = core.explanations.explanation(out, ExplainOptions(top_k=10, heatmaps=False))
    assert [e["index"] for e in exp["top_k"]] == core.explanations.top_classes(out["logits"], 10)
    assert exp["exactness"] <= 1e-5 and core.model.graph_k < 10
    for e in exp["top_k"]:
        total = sum(p["contribution"] for p in e["prototypes"]) + e["bias"]
        assert total == pytest.approx(e["logit"], abs=1e-5 * float(np.abs(out["logits"]).max()))


def test_intervention_by_index_and_unknowns(core):
    assert core.model.resolve([Intervention(3, 0), Intervention("3", 2)]) == [(3, 0), (3, 2)]
    with pytest.raises(Unprocessable, match="unknown class 'zebra'"):
        core.model.resolve([Intervention("zebra", 0)])
    with pytest.raises(Unprocessable, match="has prototypes 0..2, got 7"):
        core.model.resolve([Intervention("bag", 7)])


def test_request_checks(core):
    with pytest.raises(PayloadTooLarge, match="the limit is 16"):
        core.model.check_request(17)
    with pytest.raises(Unprocessable, match="no images"):
        core.model.check_request(0)
    with pytest.raises(Unprocessable, match="heatmaps are computed for the top 5"):
        core.model.check_request(1, ExplainOptions(top_k=6))
    core.model.check_request(1, ExplainOptions(top_k=10, heatmaps=False))


def test_batch_equals_single(core, bag_png):
    blobs = [p.read_bytes() for p in sorted((FASHION_DATA / "test" / "coat").glob("*.png"))[:5]]
    batch = run_images(core, blobs + [bag_png])
    single = run_images(core, [bag_png])[0]
    np.testing.assert_allclose(batch[-1]["logits"], single["logits"], rtol=1e-5, atol=1e-5)


def test_overlay_png(core, bag_png):
    crop = core.model.prepare(bag_png)
    (out,) = run_images(core, [bag_png])
    im = Image.open(io.BytesIO(core.listings.overlay(crop, out)))
    assert im.format == "PNG" and min(im.size) >= 256


def test_model_info(core):
    info = core.listings.model_info()
    assert info["p"] == 3 and len(info["coefficients"]) == 10
    assert info["provider"] == "CPUExecutionProvider"
    assert info["artifact"]["model_sha256"] == core.model.manifest["files"]["model.onnx"]
    assert info["maps"] == "topk" and info["heatmap_classes"] == 5


def test_all_classes_graph_explains_like_the_topk_graph(core, core_all, bag_png):
    """The default all-class head gives the top-k head's explanation, and maps for every
    class; its bias (constant, not a graph output in format 3) is the artifact's tensor."""
    assert (core_all.model.scores_mode, core_all.model.maps_mode) == ("all", "all")
    assert "bias" not in core_all.model.manifest["graph"]["outputs"]
    (out,) = run_images(core_all, [bag_png])
    (topk_out,) = run_images(core, [bag_png])
    np.testing.assert_array_equal(out["bias"], core_all.model.graph.tensors["bias"])
    ivs = (Intervention("bag", 0), Intervention("coat", 2))  # coat: outside the top-k graph's k
    opts = ExplainOptions(top_k=5, interventions=ivs)
    got, want = (
        core_all.explanations.explanation(out, opts),
        core.explanations.explanation(topk_out, opts),
    )
    assert got["exactness"] <= 1e-5
    assert [e["class"] for e in got["top_k"]] == [e["class"] for e in want["top_k"]]
    for a, b in zip(got["top_k"], want["top_k"], strict=True):
        assert a["bias"] == pytest.approx(b["bias"], abs=1e-6)
        for pa, pb in zip(a["prototypes"], b["prototypes"], strict=True):
            assert pa["contribution"] == pytest.approx(pb["contribution"], rel=1e-5, abs=1e-5)
            np.testing.assert_allclose(pa["heatmap"]["values"], pb["heatmap"]["values"], atol=1e-4)
    for c, v in want["intervention"]["logits"].items():
        assert got["intervention"]["logits"][c] == pytest.approx(v, rel=1e-5, abs=1e-5)
    # every class has maps: heatmaps for all 10, an overlay of the last-ranked class
    core_all.model.check_request(1, ExplainOptions(top_k=10))
    every = core_all.explanations.explanation(out, ExplainOptions(top_k=10))
    last = every["top_k"][-1]
    np.testing.assert_allclose(
        [p["heatmap"]["values"] for p in last["prototypes"]], out["maps"][last["index"]], atol=1e-5
    )
    png = core_all.listings.overlay(core_all.model.prepare(bag_png), out, rank=9)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    info = core_all.listings.model_info()
    assert (info["maps"], info["scores"], info["heatmap_classes"]) == ("all", "all", 10)


def test_graph_without_maps_refuses_heatmaps(fashion_artifact, tmp_path, bag_png):
    from helpers import run_cli

    out = tmp_path / "nomaps"
    assert run_cli("export", fashion_artifact, "--maps", "none", "--out", out)[0] == 0
    nomaps = Engine.from_artifact(out)
    with pytest.raises(Unprocessable, match="no similarity maps") as e:
        nomaps.model.check_request(1, ExplainOptions(top_k=3))
    assert e.value.reason == "no_maps"
    (res,) = run_images(nomaps, [bag_png])
    exp = nomaps.explanations.explanation(res, ExplainOptions(top_k=3, heatmaps=False))
    assert exp["top_k"][0]["class"] == "bag" and exp["exactness"] <= 1e-5
    with pytest.raises(Unprocessable, match="no similarity maps"):
        nomaps.listings.overlay(nomaps.model.prepare(bag_png), res)


# --- hostile and unusual images -----------------------------------------------------


HOSTILE = [
    ("zero bytes", lambda j: b"", InvalidInput, "empty"),
    ("text file", lambda j: b"hello, this is text\n" * 10, UnsupportedMediaType, "not a decodable"),
    ("truncated JPEG", lambda j: j[: len(j) // 2], InvalidInput, "cannot decode"),
    ("1x1 image", lambda j: png_bytes(Image.new("L", (1, 1))), Unprocessable, "at least 8"),
    ("decompression bomb", lambda j: bomb_png(), PayloadTooLarge, "pixels"),
    (
        "over pixel limit",
        lambda j: png_bytes(Image.new("L", (5000, 5000))),
        PayloadTooLarge,
        "limit is 24000000",
    ),
    ("animated GIF", lambda j: animated("GIF"), UnsupportedMediaType, "not a decodable"),
    ("animated PNG", lambda j: animated("PNG"), UnsupportedMediaType, "animated"),
    ("over byte limit", lambda j: j + b"\0" * (9 * 2**20), PayloadTooLarge, "bytes"),
]


@pytest.mark.parametrize("name, make, error, match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_images_are_refused(core, name, make, error, match):
    jpeg = jpeg_bytes(Image.new("RGB", (64, 64), "gray"))
    with pytest.raises(error, match=match):
        core.model.prepare(make(jpeg))


def test_modes_users_send(core):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    arr16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    cases = {
        "palette": rgb.convert("P"),
        "rgba": rgb.convert("RGBA"),
        "la": rgb.convert("LA"),
        "grey16": Image.fromarray(arr16),
        "cmyk-jpeg": rgb.convert("CMYK"),
    }
    for name, im in cases.items():
        blob = jpeg_bytes(im) if name.endswith("jpeg") else png_bytes(im)
        crop = core.model.prepare(blob)
        assert crop.shape == core.model.crop_shape and crop.dtype == np.uint8, name
    # 16-bit is scaled by range, not clipped: the brightest pixel stays bright.
    assert core.model.prepare(png_bytes(Image.fromarray(arr16))).max() > 200


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 30), "white")
    im.paste((0, 0, 0), (0, 0, 30, 30))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    blob = jpeg_bytes(im, exif=exif)
    upright = decode_image(blob, Limits(jpeg_draft=False))
    assert upright.size == (30, 60)
    assert np.asarray(upright.convert("L"))[5, 15] < 60  # black half now on top


def test_jpeg_draft_decodes_smaller_but_close(core):
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).resize((448, 448))
    blob = jpeg_bytes(big)
    drafted = decode_image(blob, Limits(jpeg_draft=True), core.model.spec)
    full = decode_image(blob, Limits(jpeg_draft=False), core.model.spec)
    assert drafted.size[0] < full.size[0] and min(drafted.size) >= core.model.spec.resize
    from protonmf.artifact import resize_crop

    a = resize_crop(drafted, core.model.spec).astype(int)
    b = resize_crop(full, core.model.spec).astype(int)
    assert np.abs(a - b).mean() < 4  # grey levels out of 255


def test_warm_up_runs_every_batch_size_on_cuda(core, monkeypatch):
    """CPU: largest batch and one image. CUDA (provider faked, runs stay on CPU): every size,
    since the CUDA provider prepares convolutions per input shape."""
    seen = []
    run = core.model.graph.run
    monkeypatch.setattr(core.model.graph, "run", lambda x: seen.append(len(x)) or run(x))
    assert core.model.warm_up(4) == [4, 1] and seen == [4, 1]
    seen.clear()
    monkeypatch.setattr(core.model.graph, "provider", "CUDAExecutionProvider")
    assert core.model.warm_up(4) == [4, 3, 2, 1] and seen == [4, 3, 2, 1]


def _heatmap_reference(m, percentile, height, width):
    """One map the plain way: peak by argmax, box around the cells ≥ the percentile."""
    H, W = m.shape
    peak = np.unravel_index(int(m.argmax()), m.shape)
    rows, cols = np.nonzero(m >= np.percentile(m, percentile))
    box = [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]
    sy, sx = height / H, width / W
    return {
        "kind": "similarity",
        "shape": [H, W],
        "values": np.round(m, 5).tolist(),
        "peak": {"row": int(peak[0]), "col": int(peak[1])},
        "box": {
            "percentile": percentile,
            "feature": {"top": box[0], "left": box[1], "bottom": box[2], "right": box[3]},
            "input": {
                "top": box[0] * sy,
                "left": box[1] * sx,
                "bottom": box[2] * sy,
                "right": box[3] * sx,
            },
        },
    }


@pytest.mark.parametrize("percentile", [0.0, 50.0, 90.0, 100.0])
def test_heatmaps_equal_the_per_map_reference(core, percentile):
    rng = np.random.default_rng(0)
    maps = rng.random((4, 7, 5)).astype(np.float32)
    maps[1] = 0.25  # constant map: every cell is hot
    maps[2, 3:, :] = 0.0  # ties at the bottom
    maps[3] = np.round(maps[3], 1)  # many ties
    got = heatmap_entries(maps, percentile, (core.model.spec.height, core.model.spec.width))
    want = [
        _heatmap_reference(m, percentile, core.model.spec.height, core.model.spec.width)
        for m in maps
    ]
    assert got == want


# --- residual accounting, map kinds, exemplars, prototypes (format 4) ---------------------


def old_format_copy(artifact, dst):
    """The artifact as format 3 wrote an all-scores graph: no ``pooled`` output, no
    exemplars (the graph is the same ONNX model with that output dropped)."""
    import json
    import shutil

    import onnx

    from protonmf.artifact import sha256_file

    shutil.copytree(artifact, dst)
    model = onnx.load(dst / "model.onnx")
    kept = [o for o in model.graph.output if o.name != "pooled"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, dst / "model.onnx")
    m = json.loads((dst / "manifest.json").read_text())
    del m["graph"]["outputs"]["pooled"]
    m["graph"].pop("presence", None)
    m.pop("exemplars", None)
    m["files"].pop("exemplars.safetensors", None)
    (dst / "exemplars.safetensors").unlink(missing_ok=True)
    m["format_version"] = 3
    m["files"]["model.onnx"] = sha256_file(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def core_old(fashion_artifact, tmp_path_factory):
    return Engine.from_artifact(
        old_format_copy(fashion_artifact, tmp_path_factory.mktemp("v3") / "a")
    )


def _export(artifact, out, *args):
    from helpers import run_cli

    assert run_cli("export", artifact, *args, "--out", out)[0] == 0
    return out


@pytest.fixture(scope="module")
def presence_cores(fashion_artifact, tmp_path_factory):
    """(all classes, top-k) graphs with presence maps, exported from the Fashion artifact."""
    root = tmp_path_factory.mktemp("presence")
    every = _export(fashion_artifact, root / "all", "--presence")
    topk = _export(
        fashion_artifact, root / "topk", "--maps", "topk", "--scores", "topk", "--presence"
    )
    return Engine.from_artifact(every), Engine.from_artifact(topk)


def numpy_split(artifact, c: int, pooled: np.ndarray):
    """Independent reference: class c's NMF and residual parts a(b·f), a((b' − b)·f) [/σ]
    straight from the artifact's files (the fold decides what is residual), plus the
    float32 scale |a|·Σ_d|b'_d f_d| of the graph's rounding."""
    from protonmf.artifact import load_manifest, load_tensors

    m = load_manifest(artifact)
    t = load_tensors(artifact, m)
    f = pooled.astype(np.float64)
    a = t["coefficients"][c].astype(np.float64)
    served, nmf = t["prototypes"][c].astype(np.float64), t["nmf_prototypes"][c].astype(np.float64)
    if m["diagnostics"]["per_class"][c]["fold"] in ("class_vector", "no_images"):
        nmf = np.zeros_like(nmf)
    inv_sigma = 1.0
    if m["head"]["kind"] == "avg_norm_linear":
        inv_sigma = 1.0 / np.sqrt(f.var() + m["head"]["norm_eps"])
    return (
        a * (nmf @ f) * inv_sigma,
        a * ((served - nmf) @ f) * inv_sigma,
        np.abs(a) * (np.abs(served) @ np.abs(f)) * inv_sigma,
    )


def fashion_blobs(n_per_class=2):
    return [
        f.read_bytes()
        for cls in ("bag", "coat", "shirt", "sneaker", "dress")
        for f in sorted((FASHION_DATA / "test" / cls).glob("*.png"))[:n_per_class]
    ]


@pytest.mark.parametrize("which", ["all", "topk"])
def test_residual_split_adds_up_and_equals_numpy(
    which, core, core_all, fashion_artifact, fashion_topk_artifact
):
    """Every explained prototype: nmf + residual = contribution (exactly: the split is of
    the reported number), each part equal to the numpy reference from the artifact's
    tensors and the pooled features within float32 rounding (1e-6 of the dot product's
    magnitude); top_k=10 covers classes the top-k graph leaves to the pooled features."""
    served, artifact = (
        (core_all, fashion_artifact) if which == "all" else (core, fashion_topk_artifact)
    )
    seen_residual = seen_nmf = 0
    for blob in fashion_blobs():
        (out,) = run_images(served, [blob])
        for entry in served.explanations.explanation(out, ExplainOptions(top_k=10, heatmaps=False))[
            "top_k"
        ]:
            nmf_ref, residual_ref, scale = numpy_split(artifact, entry["index"], out["pooled"])
            for i, proto in enumerate(entry["prototypes"]):
                nmf, residual = proto["nmf_contribution"], proto["residual_contribution"]
                assert abs(nmf + residual - proto["contribution"]) <= 1e-12 * scale[i] + 1e-300
                assert abs(nmf - nmf_ref[i]) <= 1e-6 * scale[i]
                assert abs(residual - residual_ref[i]) <= 1e-6 * scale[i]
                assert abs(nmf_ref[i] + residual_ref[i] - proto["contribution"]) <= 1e-6 * scale[i]
                seen_residual += abs(residual) > 1e-3
                seen_nmf += abs(nmf) > 1e-3
    assert seen_residual and seen_nmf  # both parts carry weight: the test can tell them apart


def test_residual_share_of_logit_and_margin(core_all, fashion_artifact):
    """logit share r_c/(logit_c − bias_c); margin share (r_c − r_o)/(logit_c − logit_o)
    against the best other class o (runner-up for the top class, the top class else)."""
    for blob in fashion_blobs(1):
        (out,) = run_images(core_all, [blob])
        logits = out["logits"].astype(np.float64)
        order = np.argsort(-logits)
        exp = core_all.explanations.explanation(out, ExplainOptions(top_k=4, heatmaps=False))
        for rank, entry in enumerate(exp["top_k"]):
            c = entry["index"]
            o = int(order[1] if rank == 0 else order[0])
            r_c = numpy_split(fashion_artifact, c, out["pooled"])[1].sum()
            r_o = numpy_split(fashion_artifact, o, out["pooled"])[1].sum()
            share = entry["residual_share"]
            assert share["versus"] == core_all.model.classes[o]
            assert share["logit"] == pytest.approx(r_c / (logits[c] - entry["bias"]), rel=1e-5)
            assert share["margin"] == pytest.approx((r_c - r_o) / (logits[c] - logits[o]), rel=1e-5)


def test_residual_split_of_a_class_that_is_all_residual(core_all, bag_png, monkeypatch):
    """A class whose prototype 0 is V itself (fold class_vector / no_images): all of its
    contribution is residual, the NMF part exactly 0."""
    (out,) = run_images(core_all, [bag_png])
    c = int(np.argmax(out["logits"]))
    folds = list(core_all.explanations.folds)
    folds[c] = "class_vector"
    monkeypatch.setattr(core_all.explanations, "folds", folds)
    entry = core_all.explanations.explanation(out, ExplainOptions(top_k=1, heatmaps=False))[
        "top_k"
    ][0]
    for proto in entry["prototypes"]:
        assert proto["nmf_contribution"] == 0.0
        assert proto["residual_contribution"] == proto["contribution"]


def test_graph_without_pooled_gives_null_split(core_old, bag_png):
    """Format 3 all-class graphs have no pooled features: the split and the residual
    share are null, the rest of the explanation unchanged; no exemplars: []."""
    assert not core_old.model.has_pooled and core_old.model.exemplars is None
    (out,) = run_images(core_old, [bag_png])
    assert "pooled" not in out
    exp = core_old.explanations.explanation(out, ExplainOptions(top_k=3))
    assert exp["top_k"][0]["class"] == "bag" and exp["exactness"] <= 1e-5
    for entry in exp["top_k"]:
        assert entry["residual_share"] is None
        for proto in entry["prototypes"]:
            assert proto["nmf_contribution"] is None and proto["residual_contribution"] is None
            assert proto["exemplars"] == []
    png = core_old.listings.overlay(core_old.model.prepare(bag_png), out)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    with pytest.raises(Unprocessable) as e:
        core_old.listings.prototype_image("bag", 0)
    assert e.value.reason == "no_exemplars"
    assert core_old.listings.prototypes()["exemplar_kinds"] == []


@pytest.mark.parametrize("which", ["all", "topk"])
def test_map_kinds(which, core, core_all, bag_png):
    """similarity = the graph's maps (unchanged), contribution = a·maps whose mean is the
    contribution, each heatmap names its kind; presence refused without presence maps."""
    served = core_all if which == "all" else core
    (out,) = run_images(served, [bag_png])
    plain = served.explanations.explanation(out, ExplainOptions(top_k=3))
    similarity = served.explanations.explanation(
        out, ExplainOptions(top_k=3, map_kind="similarity")
    )
    assert plain == similarity
    contribution = served.explanations.explanation(
        out, ExplainOptions(top_k=3, map_kind="contribution")
    )
    for rank, (s, c) in enumerate(zip(similarity["top_k"], contribution["top_k"], strict=True)):
        graph_maps = out["maps"][s["index"]] if which == "all" else out["topk_maps"][rank]
        for i, (ps, pc) in enumerate(zip(s["prototypes"], c["prototypes"], strict=True)):
            assert ps["heatmap"]["kind"] == "similarity" and pc["heatmap"]["kind"] == "contribution"
            np.testing.assert_allclose(ps["heatmap"]["values"], graph_maps[i], atol=1e-5)
            values = np.array(pc["heatmap"]["values"])
            np.testing.assert_allclose(values, graph_maps[i] * ps["coefficient"], atol=1e-5)
            assert values.mean() == pytest.approx(pc["contribution"], rel=1e-4, abs=1e-5)
    with pytest.raises(Unprocessable) as e:
        served.model.check_request(1, ExplainOptions(map_kind="presence"))
    assert e.value.reason == "no_presence_maps"
    with pytest.raises(Unprocessable) as e:
        served.model.check_request(1, ExplainOptions(map_kind="saliency"))
    assert e.value.reason == "unknown_map_kind"
    served.model.check_request(1, ExplainOptions(map_kind="presence", heatmaps=False))


def test_presence_maps_from_both_graph_kinds(presence_cores, bag_png):
    """presence heatmaps are the graph's presence output of the right class: the all-class
    graph's presence[c] and the top-k graph's topk_presence[rank] agree class by class."""
    every, topk = presence_cores
    assert every.model.has_presence and topk.model.has_presence
    assert "presence" in every.listings.model_info()["map_kinds"]
    (out_all,) = run_images(every, [bag_png])
    (out_topk,) = run_images(topk, [bag_png])
    opts = ExplainOptions(top_k=3, map_kind="presence")
    every.model.check_request(1, opts)
    a, b = (
        every.explanations.explanation(out_all, opts),
        topk.explanations.explanation(out_topk, opts),
    )
    assert [e["class"] for e in a["top_k"]] == [e["class"] for e in b["top_k"]]
    for ea, eb in zip(a["top_k"], b["top_k"], strict=True):
        for i, (pa, pb) in enumerate(zip(ea["prototypes"], eb["prototypes"], strict=True)):
            assert pa["heatmap"]["kind"] == "presence"
            np.testing.assert_allclose(
                pa["heatmap"]["values"], out_all["presence"][ea["index"], i], atol=1e-5
            )
            np.testing.assert_allclose(pa["heatmap"]["values"], pb["heatmap"]["values"], atol=1e-4)
        assert not np.allclose(out_all["presence"][ea["index"]], out_all["maps"][ea["index"]])


def test_explanation_names_each_prototypes_exemplars(core_all, fashion_artifact, bag_png):
    from protonmf.artifact import load_manifest
    from protonmf.artifact.exemplars import load_exemplars

    ex = load_exemplars(fashion_artifact, load_manifest(fashion_artifact))
    assert ex is not None and core_all.model.exemplars is not None
    (out,) = run_images(core_all, [bag_png])
    for entry in core_all.explanations.explanation(out, ExplainOptions(top_k=2))["top_k"]:
        for proto in entry["prototypes"]:
            want = ex.entries(entry["index"], proto["prototype"], "augmented")
            assert proto["exemplars"] == want and want
            assert all(set(x) == {"image", "source", "presence"} for x in want)


def test_prototypes_listing(core_all, fashion_artifact):
    from protonmf.artifact import load_tensors

    t = load_tensors(fashion_artifact)
    body = core_all.listings.prototypes()
    assert body["p"] == 3 and body["exemplar_kinds"] == ["augmented", "nmf"]
    assert [c["class"] for c in body["classes"]] == core_all.model.classes
    for c, entry in enumerate(body["classes"]):
        V, R = t["class_vectors"][c].astype(np.float64), t["residuals"][c].astype(np.float64)
        aB = t["coefficients"][c].astype(np.float64) @ t["nmf_prototypes"][c].astype(np.float64)
        share = entry["explained_share"]
        assert share["energy"] == pytest.approx(1 - (R @ R) / (V @ V), rel=1e-6, abs=1e-9)
        assert share["norm_ratio"] == pytest.approx(
            np.linalg.norm(aB) / np.linalg.norm(V), rel=1e-6
        )
        assert 0 < share["energy"] < 1
        assert entry["fold"] == core_all.model.manifest["diagnostics"]["per_class"][c]["fold"]
        for i, proto in enumerate(entry["prototypes"]):
            assert proto["coefficient"] == pytest.approx(float(t["coefficients"][c, i]))
            assert proto["fold_weight"] == pytest.approx(float(t["fold_weights"][c, i]))
            for kind in ("augmented", "nmf"):
                assert proto["exemplars"][kind] == core_all.model.exemplars.entries(c, i, kind)
    subset = core_all.listings.prototypes(["bag", 0, "3"])
    assert [c["class"] for c in subset["classes"]] == ["bag", "tshirt_top", "dress"]
    with pytest.raises(Unprocessable) as e:
        core_all.listings.prototypes(["zebra"])
    assert e.value.reason == "unknown_class"


def test_prototype_image(core_all):
    png = core_all.listings.prototype_image("bag", 1)
    im = Image.open(io.BytesIO(png))
    m = len(core_all.model.exemplars.entries(8, 1))
    assert im.format == "PNG" and im.size[0] >= m * 112 and im.size[1] >= 112
    assert core_all.listings.prototype_image(8, 1, "nmf") != png
    for args, reason in (
        (("bag", 3), "unknown_prototype"),
        (("zebra", 0), "unknown_class"),
        (("bag", 0, "best"), "unknown_exemplar_kind"),
    ):
        with pytest.raises(Unprocessable) as e:
            core_all.listings.prototype_image(*args)
        assert e.value.reason == reason


def test_overlay_colours_by_sign_on_one_scale():
    """Red where a map is positive, blue where negative, opacity by |value| on one scale
    for all panels: a weak map stays faint next to a strong one (per-map scaling would
    paint both at full strength)."""
    crop = np.full((28, 28), 128, np.uint8)
    strong = np.zeros((7, 7))
    strong[:, :3], strong[:, 4:] = 2.0, -1.0
    weak = np.full((7, 7), 0.5)
    png = render_overlay(crop, np.stack([strong, weak]), [["a"], ["b"]], ["title"], min_side=112)
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    # panels: 112×112 at x = 8 and x = 8 + 150 + 8, below the one title line
    y = 8 + 19 + 56
    left, right, faint = im[y, 8 + 10], im[y, 8 + 100], im[y, 166 + 56]
    assert left[0] > left[2] + 80  # red: for
    assert right[2] > right[0] + 40  # blue: against
    assert left[0] - left[2] > right[2] - right[0]  # |2| more opaque than |−1|
    assert 0 < faint[0] - faint[2] < (left[0] - left[2]) / 2  # 0.5 on the scale of 2: faint


def test_overlay_map_kinds(core, presence_cores, bag_png):
    """The overlay draws the kind asked for: presence maps need a graph with them (422
    no_presence_maps otherwise); an unknown kind is refused; each kind's PNG differs."""
    every, _ = presence_cores
    crop = every.model.prepare(bag_png)
    (out,) = run_images(every, [bag_png])
    pngs = {
        k: every.listings.overlay(crop, out, 0, k)
        for k in ("contribution", "similarity", "presence")
    }
    assert len(set(pngs.values())) == 3
    assert all(Image.open(io.BytesIO(p)).format == "PNG" for p in pngs.values())
    (plain,) = run_images(core, [bag_png])
    with pytest.raises(Unprocessable, match="no presence maps") as e:
        core.listings.overlay(core.model.prepare(bag_png), plain, 0, "presence")
    assert e.value.reason == "no_presence_maps"
    with pytest.raises(Unprocessable, match="map_kind must be one of"):
        core.listings.overlay(core.model.prepare(bag_png), plain, 0, "saliency")


def test_bucketed_batches_and_fewer_outputs_give_the_same_answers(fashion_artifact):
    """A batch of 3 padded to a bucket of 4, and /classify fetching no maps: the same
    answers as the unpadded, every-output run, up to float32 round-off (onnxruntime may
    pick other kernels for another batch size): same classes, values within 1e-5."""
    import asyncio

    from protonmf.service.engine.pipeline import Engine
    from protonmf.service.ops.settings import Settings

    blobs = [p.read_bytes() for p in sorted((FASHION_DATA / "test" / "bag").glob("*.png"))[:3]]

    async def answers(buckets: str):
        plane = Engine(
            Model.load(fashion_artifact), Settings.from_env({"PROTONMF_BATCH_BUCKETS": buckets})
        )
        await plane.start()
        try:
            options = ExplainOptions(top_k=3, map_kind="contribution")
            classified = await plane.classify(blobs, 3)
            explained = await plane.explain(blobs, options)
            _, outs = await plane.run(blobs)  # every output
            return classified, explained, outs, plane.batcher.buckets
        finally:
            await plane.stop()

    plain, padded = asyncio.run(answers("off")), asyncio.run(answers("1,2,4,8,16,32"))
    assert plain[3] is None and padded[3] == (1, 2, 4, 8, 16, 32)
    classes = lambda body, key: [[e["class"] for e in x["top_k"]] for x in body[key]]  # noqa: E731
    assert classes(plain[0], "predictions") == classes(padded[0], "predictions")
    assert classes(plain[1], "explanations") == classes(padded[1], "explanations")
    for a, b in zip(plain[2], padded[2], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
    for ea, eb in zip(plain[1]["explanations"], padded[1]["explanations"], strict=True):
        for ca, cb in zip(ea["top_k"], eb["top_k"], strict=True):
            assert ca["logit"] == pytest.approx(cb["logit"], rel=1e-5, abs=1e-5)
            for pa, pb in zip(ca["prototypes"], cb["prototypes"], strict=True):
                assert pa["contribution"] == pytest.approx(pb["contribution"], rel=1e-5, abs=1e-5)
                np.testing.assert_allclose(
                    pa["heatmap"]["values"], pb["heatmap"]["values"], rtol=1e-4, atol=1e-4
                )
    core = Engine.from_artifact(fashion_artifact)
    assert "maps" in core.model.outputs_for("similarity") and "maps" not in core.model.outputs_for(
        None
    )
    assert core.model.outputs_for(None) | {"maps"} == core.model.outputs_for("contribution")
