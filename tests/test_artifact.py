"""The artifact contract: atomic write, checksums, versions, preprocessing (no torch)."""

import json

import numpy as np
import pytest
from PIL import Image

from protonmf.artifact import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ArtifactError,
    Preprocessing,
    load_manifest,
    load_tensors,
    normalize,
    preprocess,
    write_artifact,
)


def tiny(tmp_path, **extra):
    C, p, D = 4, 2, 3
    tensors = {
        "prototypes": np.ones((C, p, D), np.float32),
        "nmf_prototypes": np.ones((C, p, D), np.float32),
        "coefficients": np.ones((C, p), np.float32),
        "residuals": np.zeros((C, D), np.float32),
        "class_vectors": np.ones((C, D), np.float32),
        "bias": np.zeros(C, np.float32),
    }
    manifest = {"classes": list("abcd"), "p": p, "feature_dim": D, **extra}
    return write_artifact(tmp_path / "art", manifest, tensors)


def test_round_trip(tmp_path):
    out = tiny(tmp_path)
    m = load_manifest(out)
    assert m["format_version"] == FORMAT_VERSION
    assert set(m["files"]) == {TENSORS_FILE}
    t = load_tensors(out, m)
    assert t["prototypes"].shape == (4, 2, 3)
    # no temp dirs left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_rewrite_replaces_whole(tmp_path):
    tiny(tmp_path)
    out = tiny(tmp_path, note="second")
    assert load_manifest(out)["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_corrupt_file_refused(tmp_path):
    out = tiny(tmp_path)
    with open(out / TENSORS_FILE, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(ArtifactError, match="checksum mismatch for prototypes.safetensors"):
        load_manifest(out)


def test_other_version_refused(tmp_path):
    out = tiny(tmp_path)
    m = json.loads((out / MANIFEST_FILE).read_text())
    m["format_version"] = 999
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 999"):
        load_manifest(out)


def test_version1_read_as_all_class_scores(tmp_path):
    out = tiny(tmp_path, graph={"outputs": {"logits": ["N", 4]}})
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["format_version"] == FORMAT_VERSION
    m["format_version"] = 1  # version 1 wrote no graph.scores: every class's scores
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    assert load_manifest(out)["graph"]["scores"] == "all"


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a ProtoNMF artifact"):
        load_manifest(tmp_path)


def test_shape_mismatch_refused(tmp_path):
    out = tiny(tmp_path)
    m = load_manifest(out)
    m["p"] = 5
    with pytest.raises(ArtifactError, match="manifest implies"):
        load_tensors(out, m)


def test_missing_tensor_refused(tmp_path):
    with pytest.raises(ArtifactError, match="missing tensors"):
        write_artifact(tmp_path / "x", {}, {"prototypes": np.zeros(1)})


def test_preprocess_resize_crop_normalise():
    spec = Preprocessing(height=4, width=4, resize=4, color_mode="L", mean=(0.5,), std=(0.5,))
    img = Image.fromarray(np.full((8, 16), 255, np.uint8))  # wide, white
    x = preprocess(img, spec)
    assert x.shape == (1, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0)


@pytest.mark.parametrize("shape", [(5, 6, 7), (5, 6, 7, 3)])
def test_normalize_bit_identical_to_plain_expression(shape):
    c = 3 if len(shape) == 4 else 1
    spec = Preprocessing(
        height=6,
        width=7,
        resize=7,
        color_mode="RGB" if c == 3 else "L",
        mean=(0.485, 0.456, 0.406)[:c],
        std=(0.229, 0.224, 0.225)[:c],
    )
    crops = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x = crops.astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    want = (x - np.float32(spec.mean)[:, None, None]) / np.float32(spec.std)[:, None, None]
    got = normalize(crops, spec)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_preprocess_converts_modes():
    spec = Preprocessing(height=2, width=2, resize=2)
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    x = preprocess(rgba, spec)
    assert x.shape == (3, 2, 2)
    assert x[0, 0, 0] > x[1, 0, 0]  # red channel survives the conversion


def test_preprocessing_dict_round_trip():
    spec = Preprocessing(height=56, width=56, resize=64, color_mode="L", mean=(0.3,), std=(0.4,))
    assert Preprocessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_serve_flags_set_workers_and_batch_limit(tmp_path):
    from protonmf.cli import build_parser, serve_command

    parser = build_parser()
    args = parser.parse_args(["serve", str(tmp_path), "--workers", "2", "--max-batch-size", "4"])
    cmd, env = serve_command(args, {"PROTONMF_WORKERS": "5", "OTHER": "x"})
    assert env["PROTONMF_WORKERS"] == "2" and env["PROTONMF_MAX_BATCH_SIZE"] == "4"
    assert env["OTHER"] == "x" and env["PROTONMF_ARTIFACT"] == str(tmp_path.resolve())
    assert cmd[cmd.index("serve") + 1] == "protonmf.service.service:ProtoNMFService"
    # without the flags the environment's settings stand
    _, env = serve_command(parser.parse_args(["serve", str(tmp_path)]), {"PROTONMF_WORKERS": "5"})
    assert env["PROTONMF_WORKERS"] == "5" and "PROTONMF_MAX_BATCH_SIZE" not in env
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", str(tmp_path), "--workers", "0"])


def test_stale_scratch_folders_removed(tmp_path):
    """What a kill -9 left beside an artifact goes at the next write; a live process's
    scratch folder and unrelated names stay."""
    import os

    from protonmf.artifact import scratch_dir

    out = tiny(tmp_path)  # tmp_path / "art"
    dead = tmp_path / ".art.write-999999999-abc"
    dead_export = tmp_path / ".art.export-999999999-x"
    old = tmp_path / ".art.old"
    other = tmp_path / ".artx.write-999999999-abc"
    for d in (dead, dead_export, old, other):
        d.mkdir()
    live = scratch_dir(out, "export")
    assert live.name.startswith(f".art.export-{os.getpid()}-")
    tiny(tmp_path)  # writes art again
    assert not dead.exists() and not dead_export.exists() and not old.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")) == [live.name]


def test_serve_defaults_come_from_the_environment(tmp_path, monkeypatch):
    """A container runs `protonmf serve ARTIFACT` with the pod's PROTONMF_* settings: the
    device, variant and gRPC port it sets are the defaults; flags still win."""
    from protonmf.cli import build_parser, serve_command

    monkeypatch.setenv("PROTONMF_DEVICE", "cuda")
    monkeypatch.setenv("PROTONMF_VARIANT", "int8")
    monkeypatch.setenv("PROTONMF_GRPC_PORT", "0")
    _, env = serve_command(build_parser().parse_args(["serve", str(tmp_path)]), {})
    assert (env["PROTONMF_DEVICE"], env["PROTONMF_VARIANT"], env["PROTONMF_GRPC_PORT"]) == (
        "cuda",
        "int8",
        "0",
    )
    args = build_parser().parse_args(["serve", str(tmp_path), "--device", "cpu"])
    assert serve_command(args, {})[1]["PROTONMF_DEVICE"] == "cpu"
