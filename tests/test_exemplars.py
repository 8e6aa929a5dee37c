"""Exemplars, presence maps and convert's own check of its ONNX graph, against numpy
references computed here from the timm model's features (not from the converter's code)."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from helpers import FASHION_DATA, FASHION_MODEL, REPO, run_cli

from protonmf.artifact import ArtifactError, Preprocessing, load_manifest, load_tensors, preprocess
from protonmf.artifact.exemplars import load_exemplars
from protonmf.data import load_samples

torch = pytest.importorskip("torch")  # the timm model's features: the convert extra
from protonmf.converter.models import ModelSource, load_model  # noqa: E402

PER_CLASS = 12  # a small conversion: 120 images
M = 4


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("exemplars") / "artifact"
    code, _ = run_cli(
        "convert",
        "--quiet",
        "--model",
        FASHION_MODEL,
        "--data",
        FASHION_DATA,
        "--max-per-class",
        PER_CLASS,
        "--exemplars",
        M,
        "--presence",
        "--out",
        out,
    )
    assert code == 0
    return out


def clipped_features(manifest, images) -> np.ndarray:
    """(n, H, W, D) features of the recorded model, clipped at 0 (NMF's matrix A)."""
    model = load_model(ModelSource(str(FASHION_MODEL))).eval()
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    x = torch.from_numpy(np.stack([preprocess(im, prep) for im in images]))
    with torch.no_grad():
        return model.forward_features(x).permute(0, 2, 3, 1).clamp_min(0).double().numpy()


def test_augmented_exemplars_are_the_top_presence_images(small_artifact):
    m = load_manifest(small_artifact)
    t = load_tensors(small_artifact, m)
    ex = load_exemplars(small_artifact, m)
    assert ex is not None and ex.kinds == ("augmented", "nmf") and ex.m == M
    samples = load_samples(FASHION_DATA / "train", m["classes"], PER_CLASS)
    for c in (0, 7):  # two classes, every prototype
        mine = [s for s in samples if s.label == c]
        A = clipped_features(m, [s.open() for s in mine])  # (n, H, W, D)
        n, H, W, D = A.shape
        # Eq. 9 by numpy's least squares: E' = argmin ||A − E' B'||² per position
        E = np.linalg.lstsq(
            t["prototypes"][c].astype(np.float64).T, A.reshape(-1, D).T, rcond=None
        )[0].T.reshape(n, H, W, -1)
        peak = E.reshape(n, H * W, -1).max(1)  # (n, p)
        for i in range(m["p"]):
            want = np.argsort(-peak[:, i], kind="stable")[:M]
            names = [e["source"] for e in ex.entries(c, i)]
            assert names == [str(mine[j].source.relative_to(FASHION_DATA / "train")) for j in want]
            np.testing.assert_allclose(
                [e["presence"] for e in ex.entries(c, i)], peak[want, i], rtol=1e-4, atol=1e-5
            )
            thumbs, maps = ex.strip(c, i)
            np.testing.assert_allclose(maps, E[want, :, :, i], rtol=1e-4, atol=1e-5)
            assert thumbs.shape == (M, 56, 56) and thumbs.dtype == np.uint8
            assert len({e["source"] for e in ex.entries(c, i)}) == M  # one entry per image


def test_nmf_exemplar_maps_are_the_factorisation(small_artifact):
    """The nmf kind's maps are NMF's E: with B they rebuild A to the error NMF reported, and
    each prototype's exemplars are its highest rows of E."""
    m = load_manifest(small_artifact)
    t = load_tensors(small_artifact, m)
    ex = load_exemplars(small_artifact, m)
    c = 3
    thumbs, maps = ex.strip(c, 0, "nmf")
    assert (maps >= 0).all() and len(thumbs) == M
    scores = [e["presence"] for e in ex.entries(c, 0, "nmf")]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(maps.reshape(M, -1).max(1), scores, rtol=1e-6)
    assert t["nmf_prototypes"].shape[1] == m["p"]


def test_presence_output_is_eq9_least_squares(small_artifact):
    m = load_manifest(small_artifact)
    t = load_tensors(small_artifact, m)
    assert m["graph"]["presence"] and "presence" in m["graph"]["outputs"]
    samples = load_samples(FASHION_DATA / "test", m["classes"])[::50][:6]
    images = [s.open() for s in samples]
    prep = Preprocessing.from_dict(m["preprocessing"])
    session = ort.InferenceSession(
        str(small_artifact / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.stack([preprocess(im, prep) for im in images])
    out = dict(zip(m["graph"]["outputs"], session.run(None, {"image": x}), strict=True))
    A = clipped_features(m, images)
    n, H, W, D = A.shape
    for c in range(len(m["classes"])):
        E = np.linalg.lstsq(
            t["prototypes"][c].astype(np.float64).T, A.reshape(-1, D).T, rcond=None
        )[0].T.reshape(n, H, W, -1)
        got = out["presence"][:, c].transpose(0, 2, 3, 1)  # (n, H, W, p)
        scale = np.abs(E).max()
        assert np.abs(got - E).max() <= 1e-4 * scale
    # pooled (format 4, exported as GlobalAveragePool): the features' mean (ReLU features:
    # raw = clipped here)
    np.testing.assert_allclose(out["pooled"], A.mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_no_exemplars_and_corrupt_exemplars(small_artifact, tmp_path, capsys):
    m = load_manifest(small_artifact)
    bare = dict(m)
    bare.pop("exemplars")
    assert load_exemplars(small_artifact, bare) is None  # older formats: no exemplars
    code, out = run_cli("inspect", small_artifact, capsys=capsys)
    assert code == 0 and f"{M} per prototype (augmented, nmf" in out
    # A manifest that disagrees with the file is refused with the reason.
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["exemplars"]["m"] = M + 1
    with pytest.raises(ArtifactError, match=r"augmented.index has shape .* manifest implies"):
        load_exemplars(copy, edited)
    (copy / "exemplars.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="checksum mismatch for exemplars.safetensors"):
        load_manifest(copy)


def test_export_keeps_exemplars(small_artifact, tmp_path):
    out = tmp_path / "topk"
    code, _ = run_cli(
        "export", small_artifact, "--maps", "topk", "--scores", "topk", "--presence", "--out", out
    )
    assert code == 0
    m = load_manifest(out)
    assert "exemplars.safetensors" in m["files"] and load_exemplars(out, m) is not None
    assert m["graph"]["outputs"]["topk_presence"] == ["N", 5, m["p"], 7, 7]


def test_convert_checks_its_onnx_graph(tmp_path, capsys):
    """convert runs the exported graph with onnxruntime against the black box and exits 1
    when it is not within --rtol (0 here: float rounding alone exceeds it)."""
    out = tmp_path / "art"
    code, _ = run_cli(
        "convert",
        "--quiet",
        "--model",
        FASHION_MODEL,
        "--data",
        FASHION_DATA,
        "--max-per-class",
        3,
        "--exemplars",
        0,
        "--rtol",
        0,
        "--out",
        out,
    )
    err = capsys.readouterr().err
    assert code == 1 and "the ONNX graph is not exact" in err and "rtol 0" in err
    onnx = load_manifest(out)["diagnostics"]["onnx_exactness"]
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["n_images"] == 30
    assert 0 < onnx["max_rel_logit_diff"] < 1e-5 and onnx["top1_agreement"] == 1.0
    assert "exemplars" not in load_manifest(out)


def test_streamed_conversion_equals_in_memory(tmp_path, caplog):
    """--memory-budget streams the classes in chunks (features → NMF → exemplar candidates
    → freed): the artifact's tensors and exemplars are the in-memory run's to the bit.
    Both runs factorise one class per NMF batch (nmf_batch_floats), and the streamed one
    holds one class's features at a time; decoding in 1 worker process vs in-process."""
    from protonmf.converter.convert import ConvertConfig, convert

    common = dict(
        model=str(FASHION_MODEL),
        data=str(FASHION_DATA),
        max_per_class=20,
        exemplars=3,
        progress=False,
        nmf_batch_floats=1.0,
    )
    caplog.set_level("INFO", logger="protonmf.converter.convert")
    whole = convert(ConvertConfig(out=str(tmp_path / "whole"), workers=0, **common))
    assert "200 images in 1 chunk(s)" in caplog.text
    streamed = convert(
        ConvertConfig(out=str(tmp_path / "streamed"), workers=1, memory_budget=1, **common)
    )
    assert "200 images in 10 chunk(s)" in caplog.text
    for name in ("prototypes.safetensors", "exemplars.safetensors", "model.onnx"):
        assert (whole / name).read_bytes() == (streamed / name).read_bytes(), name
    m = load_manifest(streamed)
    assert m["diagnostics"]["onnx_exactness"]["top1_agreement"] == 1.0


def test_killed_conversion_resumes_from_finished_batches(tmp_path, caplog):
    """kill -9 after some NMF batches are saved: --resume reuses them (no features are
    extracted for them again) and writes the artifact an uninterrupted run writes, to the
    bit; the parts are gone afterwards."""
    import signal
    import subprocess
    import sys
    import time

    from protonmf.converter.convert import ConvertConfig, convert

    common = dict(
        model=str(FASHION_MODEL),
        data=str(FASHION_DATA),
        max_per_class=20,
        exemplars=2,
        progress=False,
        nmf_batch_floats=1.0,
        memory_budget=1,
        workers=0,
    )
    out = tmp_path / "art"
    parts = tmp_path / ".art.parts"
    script = (
        "import sys; from protonmf.converter.convert import ConvertConfig, convert; "
        f"convert(ConvertConfig(out={str(out)!r}, **{common!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while len(list(parts.glob("*.safetensors"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "the conversion ended before 3 batches were saved"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = len(list(parts.glob("*.safetensors")))
    assert 3 <= saved < 10 and not out.exists()
    caplog.set_level("INFO", logger="protonmf.converter.convert")
    resumed = convert(ConvertConfig(out=str(out), resume=True, **common))
    assert f"resumed {saved} finished NMF batch(es) of 10" in caplog.text
    assert not parts.exists()
    fresh = convert(ConvertConfig(out=str(tmp_path / "fresh"), **common))
    for name in ("prototypes.safetensors", "exemplars.safetensors", "model.onnx"):
        assert (resumed / name).read_bytes() == (fresh / name).read_bytes(), name


def test_sharded_conversion_merges_to_the_single_process_artifact(tmp_path):
    """Two shard processes at once (as a Kubernetes Indexed Job runs them), then --merge:
    the artifact equals the single-process one to the bit. A merge with a shard missing is
    refused; re-running a shard reuses what it had finished."""
    import subprocess
    import sys

    from protonmf.converter.convert import ConvertConfig, convert

    common = dict(
        model=str(FASHION_MODEL),
        data=str(FASHION_DATA),
        max_per_class=20,
        exemplars=2,
        progress=False,
        nmf_batch_floats=1.0,
        workers=0,
    )
    out = tmp_path / "art"

    def shard(i: int) -> subprocess.Popen:
        script = (
            "from protonmf.converter.convert import ConvertConfig, convert; "
            f"convert(ConvertConfig(out={str(out)!r}, shard=({i}, 2), **{common!r}))"
        )
        return subprocess.Popen([sys.executable, "-c", script], cwd=REPO)

    assert shard(0).wait(timeout=300) == 0
    with pytest.raises(ValueError, match="--merge: NMF batch 1 .* no finished part"):
        convert(ConvertConfig(out=str(out), merge=True, **common))
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / ".art.parts").glob("*.safetensors")}
    assert len(first) == 5 and not out.exists()
    procs = [shard(0), shard(1)]  # shard 0 again: all its batches are there already
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert {n: (tmp_path / ".art.parts" / n).stat().st_mtime_ns for n in first} == first
    assert len(list((tmp_path / ".art.parts").glob("*.safetensors"))) == 10
    merged = convert(ConvertConfig(out=str(out), merge=True, **common))
    single = convert(ConvertConfig(out=str(tmp_path / "single"), **common))
    for name in ("prototypes.safetensors", "exemplars.safetensors", "model.onnx"):
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    assert not (tmp_path / ".art.parts").exists()
