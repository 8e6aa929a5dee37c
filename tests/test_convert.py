"""End-to-end conversion on real models and real images; exactness against the original."""

import json

import numpy as np
import pytest
from helpers import (
    FASHION_DATA,
    FASHION_MODEL,
    manifest_of,
    proto_model_from_artifact,
    run_cli,
    run_images,
)
from PIL import Image

from protonmf.analysis.evaluate import explanation_residual
from protonmf.artifact import load_tensors
from protonmf.data import load_image_folder
from protonmf.graph import GraphSession
from protonmf.sample_data import lite0_checkpoint

# the converter's tests: skipped where only the serving extra is installed (no torch)
torch = pytest.importorskip("torch")

from protonmf.converter.convert import ConvertConfig, convert, exactness, logits_of  # noqa: E402
from protonmf.converter.models import (  # noqa: E402
    ModelSource,
    UnsupportedModelError,
    analyse_head,
    load_model,
)
from protonmf.converter.reexport import reexport  # noqa: E402
from protonmf.converter.verify import verify  # noqa: E402


def torch_parity(artifact, data):
    model, proto, prep, m = proto_model_from_artifact(artifact)
    samples = load_image_folder(data, m["classes"])
    want = logits_of(model, samples, prep).double().numpy()
    got = logits_of(proto, samples, prep).double().numpy()
    return exactness(want, got)


def test_fashion_default_is_exact_in_torch(fashion_artifact):
    report = torch_parity(fashion_artifact, FASHION_DATA / "test")
    assert report["n_images"] == 500
    assert report["top1_agreement"] == 1.0
    assert report["max_rel_logit_diff"] <= 1e-5


def test_lite0_is_exact_in_torch_on_photos(lite0_artifact, imagenet_photos):
    report = torch_parity(lite0_artifact, imagenet_photos)
    assert report["n_images"] == 20
    assert report["top1_agreement"] == 1.0
    assert report["max_rel_logit_diff"] <= 1e-5


def test_fashion_manifest_diagnostics(fashion_artifact):
    m = manifest_of(fashion_artifact)
    d = m["diagnostics"]
    assert m["classes"][0] == "tshirt_top" and m["p"] == 3 and m["feature_grid"] == [7, 7]
    assert d["classes_explained"] == d["classes_total"] == 10
    for c in d["per_class"]:
        assert c["n_images"] == 200
        assert 1 <= c["nmf_iterations"] <= 200
        assert 0 < c["feature_rel_error"] < 1
        assert c["rebuild_rel_error"] < 1e-5
        assert c["fold"] in ("sum", "min_norm")
        assert (c["fold"] == "min_norm") == (c["sum_a_ratio"] < 0.5)
    assert m["conversion"]["heldout"].endswith("fashion-mnist/test")


def test_prototypes_rebuild_class_vectors(fashion_artifact, lite0_artifact):
    for artifact in (fashion_artifact, lite0_artifact):
        t = load_tensors(artifact)
        rebuilt = np.einsum(
            "cp,cpd->cd", t["coefficients"].astype(np.float64), t["prototypes"].astype(np.float64)
        )
        V = t["class_vectors"].astype(np.float64)
        rel = np.linalg.norm(rebuilt - V, axis=1) / np.linalg.norm(V, axis=1)
        assert rel.max() < 1e-5


def test_classes_without_images_are_flagged(lite0_artifact):
    m = manifest_of(lite0_artifact)
    d = m["diagnostics"]
    assert d["classes_total"] == 1000
    assert d["classes_explained"] == 19  # 20 photos, two of class 609
    flagged = [c for c in d["per_class"] if not c["explained"]]
    assert len(flagged) == 981 and all(c["fold"] == "no_images" for c in flagged)
    t = load_tensors(lite0_artifact)
    idx = m["classes"].index(flagged[0]["class"])
    np.testing.assert_array_equal(t["coefficients"][idx], [1, 0, 0])
    np.testing.assert_allclose(t["prototypes"][idx, 0], t["class_vectors"][idx])


@pytest.mark.e2e
def test_guard_can_be_switched_off(tmp_path):
    out = convert(
        ConvertConfig(
            model=str(FASHION_MODEL),
            data=str(FASHION_DATA),
            out=str(tmp_path / "a"),
            max_per_class=20,
            min_sum_ratio=0.0,
            maps="none",
            progress=False,
        )
    )
    d = manifest_of(out)["diagnostics"]
    assert d["guarded_classes"] == []
    assert all(c["fold"] == "sum" for c in d["per_class"])
    assert d["torch_exactness"]["max_rel_logit_diff"] <= 1e-5


@pytest.mark.e2e
def test_nonneg_hals_variant(tmp_path):
    out = convert(
        ConvertConfig(
            model=str(FASHION_MODEL),
            data=str(FASHION_DATA),
            out=str(tmp_path / "a"),
            max_per_class=20,
            nonneg=True,
            solver="hals",
            maps="none",
            progress=False,
        )
    )
    t = load_tensors(out)
    m = manifest_of(out)
    assert (t["coefficients"] >= 0).all()
    assert m["conversion"]["solver"] == "hals" and m["conversion"]["nonneg"] is True
    assert m["diagnostics"]["torch_exactness"]["max_rel_logit_diff"] <= 1e-5


def test_inspect_json(fashion_artifact, capsys):
    code, out = run_cli("inspect", fashion_artifact, "--json", capsys=capsys)
    assert code == 0
    assert json.loads(out)["classes"] == manifest_of(fashion_artifact)["classes"]
    code, out = run_cli("inspect", fashion_artifact, capsys=capsys)
    assert "10 (10 explained by prototypes)" in out


def test_cli_reports_bad_paths(tmp_path, capsys):
    code, _ = run_cli("inspect", tmp_path)
    assert code == 2
    assert "not a ProtoNMF artifact" in capsys.readouterr().err
    code, _ = run_cli("convert", "--quiet", "--data", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_defaults_exist_only_in_a_source_checkout(tmp_path, monkeypatch, capsys):
    """Without --model/--data, convert takes the checkout's Fashion-MNIST model and data;
    where they are not there (an installed wheel) it says what to pass: exit 2, one line.
    tests/test_packaging.py runs the installed wheel itself."""
    from protonmf import cli

    assert cli.checkout_defaults(None, None) == (str(FASHION_MODEL), str(FASHION_DATA))
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "models" / "fashion-resnet")
    monkeypatch.setattr(cli, "DEFAULT_DATA", tmp_path / "data" / "fashion-mnist")
    for args, flags, where in (
        ((), "--model and --data", "defaults (models/fashion-resnet, data/fashion-mnist) exist"),
        (("--data", tmp_path), "--model", "default (models/fashion-resnet) exists"),
        (("--model", "resnet18"), "--data", "default (data/fashion-mnist) exists"),
    ):
        code, _ = run_cli("convert", "--quiet", "--out", tmp_path / "o", *args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err == (
            f"protonmf convert: error: no {flags} given and the embedded {where} "
            "only in a source checkout; pass --model DIR|NAME and --data DIR\n"
        )
    assert cli.checkout_defaults("resnet18", "imgs") == ("resnet18", "imgs")
    assert not (tmp_path / "o").exists()


def test_a_missing_extra_is_one_line_a_missing_module_of_ours_a_traceback(monkeypatch, capsys):
    from protonmf import cli

    def missing(name):
        def command(args):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        return command

    monkeypatch.setattr(cli, "_cmd_inspect", missing("onnxruntime"))
    code, _ = run_cli("inspect", "x")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No module named 'onnxruntime'" in err
    assert "pip install 'protonmf[convert]' or 'protonmf[serve]'" in err
    monkeypatch.setattr(cli, "_cmd_inspect", missing("protonmf.gone"))
    with pytest.raises(ModuleNotFoundError):
        run_cli("inspect", "x")


def test_wrong_folders_refused(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="match neither the model's class names"):
        load_image_folder(tmp_path, ["tshirt_top", "trouser"])


# --- heads: supported kinds are exact, the rest are refused with a reason ---------


def random_model(name, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vit_tiny_patch16_224", dict(img_size=64), "pools the class token"),
        ("mobilenetv3_small_050", {}, "conv_head"),
    ],
)
def test_unsupported_heads_are_refused(name, kwargs, match):
    model = random_model(name, **kwargs)
    size = kwargs.get("img_size", 64)
    with pytest.raises(UnsupportedModelError, match=match):
        analyse_head(model, torch.randn(2, 3, size, size))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "name, kwargs, kind",
    [
        ("convnext_atto", {}, "avg_norm_linear"),
        ("vit_tiny_patch16_224", dict(img_size=64, global_pool="avg"), "avg_norm_linear"),
        ("resnet18", {}, "avg_linear"),
    ],
)
def test_supported_heads_convert_exactly(name, kwargs, kind, tmp_path, imagenet_photos):
    """Random weights through the real checkpoint path, then parity on the photos."""
    from safetensors.torch import save_file

    model = random_model(name, **kwargs)
    ckpt = tmp_path / "w.safetensors"
    save_file(model.state_dict(), ckpt)
    out = convert(
        ConvertConfig(
            model=name,
            checkpoint=str(ckpt),
            model_kwargs=kwargs,
            data=str(imagenet_photos),
            out=str(tmp_path / "a"),
            p=2,
            k=3,
            progress=False,
        )
    )
    m = manifest_of(out)
    assert m["head"]["kind"] == kind
    report = torch_parity(out, imagenet_photos)
    assert report["top1_agreement"] == 1.0
    assert report["max_rel_logit_diff"] <= 1e-5
    outside_topk_terms_match_torch(out, next(imagenet_photos.glob("*/*.jpg")).read_bytes())
    # the all-class head (one C·p-filter conv; image-dependent bias for LayerNorm heads)
    every = reexport(out, tmp_path / "all", maps="all", scores="all")
    assert ("bias" in manifest_of(every)["graph"]["outputs"]) == (kind == "avg_norm_linear")
    report = verify(every, data=imagenet_photos, progress=False)
    assert report["top1_agreement"] == 1.0 and report["max_rel_logit_diff"] <= 1e-5
    ex = GraphSession.load(every)
    x = ex.preprocess([Image.open(p) for p in sorted(imagenet_photos.glob("*/*.jpg"))[:4]])
    assert explanation_residual(ex.run(x)).max() <= 1e-5


def outside_topk_terms_match_torch(artifact, image: bytes):
    """The service's terms of a class outside the graph's top-k (computed from the pooled
    features, LayerNorm heads included) == the all-scores prototype model in torch."""
    from protonmf.artifact import normalize
    from protonmf.service.engine.explanations import Explanations
    from protonmf.service.engine.model import Model

    model = Model.load(artifact)
    crop = model.prepare(image)
    (out,) = run_images(model, [image])
    _, proto, _, _ = proto_model_from_artifact(artifact, scores="all")
    with torch.no_grad():
        outputs = proto(torch.from_numpy(normalize(crop[None], model.spec)))
    want = {n: t[0].double().numpy() for n, t in zip(proto.output_names, outputs, strict=True)}
    logits, scores, contributions = want["logits"], want["scores"], want["contributions"]
    bias = want.get("bias", model.tensors["bias"])  # constant: not a graph output
    outside = [c for c in range(len(model.classes)) if c not in out["topk_classes"]]
    assert outside and out["topk_classes"].shape == (model.graph_k,)
    scale = np.abs(logits).max()
    for c in (outside[0], outside[-1]):
        s, contrib, b = Explanations(model).terms(out, c)
        np.testing.assert_allclose(s, scores[c], rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(contrib, contributions[c], rtol=1e-4, atol=1e-5 * scale)
        assert abs(b - bias[c]) <= 1e-5 * scale
        assert abs(out["logits"][c] - contrib.sum() - b) <= 1e-5 * scale


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="do not align"):
        load_model(ModelSource("resnet18", str(tmp_path / "w.safetensors")))


def test_no_weights_refused():
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_model(ModelSource("resnet18"))


def test_lite0_weights_load_by_order():
    model = load_model(ModelSource("tf_efficientnet_lite0", str(lite0_checkpoint())))
    assert model.get_classifier().out_features == 1000


def write_idx(folder, prefix, images, labels):
    import gzip
    import struct

    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, *images.shape) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, len(labels)) + labels.tobytes())


@pytest.mark.e2e
def test_convert_from_idx_files(tmp_path, capsys):
    """Fashion-MNIST's own IDX format: train-* for prototypes, t10k-* held out."""
    from PIL import Image

    m = manifest_of_model_classes()
    for prefix, split, n in (("train", "train", 20), ("t10k", "test", 5)):
        images, labels = [], []
        for c, name in enumerate(m):
            for f in sorted((FASHION_DATA / split / name).glob("*.png"))[:n]:
                images.append(np.asarray(Image.open(f)))
                labels.append(c)
        write_idx(tmp_path, prefix, images, labels)
    out = convert(
        ConvertConfig(
            model=str(FASHION_MODEL),
            data=str(tmp_path),
            out=str(tmp_path / "a"),
            maps="none",
            progress=False,
        )
    )
    man = manifest_of(out)
    assert man["conversion"]["n_images"] == 200
    assert man["conversion"]["heldout"].endswith("t10k-images-idx3-ubyte.gz")
    code, text = run_cli("verify", out, "--json", capsys=capsys)
    r = json.loads(text)
    assert code == 0 and r["n_images"] == 50 and r["top1_agreement"] == 1.0


def manifest_of_model_classes():
    return json.loads((FASHION_MODEL / "config.json").read_text())["label_names"]
