"""Converter inputs, good and bad: every one ends exact (exit 0, the ONNX graph checked by
convert itself) or refused in one line (exit 2, no traceback). Random weights, tiny data."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from protonmf.cli import main

torch = pytest.importorskip("torch")  # the convert extra: timm checkpoints are torch files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 class folders ("0", "1", "2": class indices) of 2 odd-sized random images each."""
    root = tmp_path_factory.mktemp("zoo-data")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir()
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40 + j, 48, 3), np.uint8)).save(
                root / str(c) / f"{j}.png"
            )
    return root


def convert(capsys, tmp_path, data, *args) -> tuple[int, str]:
    code = main(
        [
            "convert",
            "--quiet",
            "--exemplars",
            "2",
            "-p",
            "2",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            *map(str, args),
        ]
    )
    return code, capsys.readouterr().err


def refused(code: int, err: str, reason: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("protonmf convert: error:") and reason in err, err


def saved(tmp_path, arch: str, **kwargs) -> str:
    import timm

    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pth"
    torch.save(timm.create_model(arch, pretrained=False, **kwargs).state_dict(), path)
    return str(path)


KW3 = '{"num_classes": 3}'


def test_unreadable_checkpoints(tmp_path, capsys, data):
    (tmp_path / "random.pth").write_bytes(os.urandom(2000))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(2000))
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, reason in (
        ("random.pth", "not a readable PyTorch checkpoint"),
        ("random.safetensors", "not a readable safetensors checkpoint"),
        ("text.pth", "not a readable PyTorch checkpoint"),
        ("tensor.pth", "holds a Tensor, not a state dict"),
    ):
        code, err = convert(
            capsys,
            tmp_path,
            data,
            "--model",
            "resnet10t",
            "--checkpoint",
            tmp_path / name,
            "--model-kwargs",
            KW3,
        )
        refused(code, err, reason)


def test_wrong_model_settings(tmp_path, capsys, data):
    ckpt = saved(tmp_path, "resnet10t", num_classes=5)
    cases = [
        (["--model", "resnet10t", "--model-kwargs", KW3], "fc.weight has shape (5, 512)"),
        (["--model", "no_such_net"], "Unknown model"),
        (
            ["--model", "resnet10t", "--model-kwargs", '{"num_classes": 5, "bogus": 1}'],
            "unexpected keyword argument 'bogus'",
        ),
        (
            ["--model", "resnet10t", "--model-kwargs", '{"num_classes": 5}', "-p", "1000"],
            "-p 1000 exceeds the feature dimension D = 512",
        ),
        (
            [
                "--model",
                "deit_tiny_distilled_patch16_224",
                "--model-kwargs",
                '{"num_classes": 3, "global_pool": "avg"}',
            ],
            "timm cannot create",
        ),
    ]
    for args, reason in cases:
        code, err = convert(capsys, tmp_path, data, "--checkpoint", ckpt, *args)
        refused(code, err, reason)


# (architecture, timm kwargs, None if exact else the refusal's reason)
ZOO = [
    ("resnet10t", {"in_chans": 1}, None),  # greyscale model, cfg says RGB
    ("test_efficientnet", {}, None),
    ("test_convnext", {}, None),  # pool → LayerNorm → linear
    ("test_vit", {"global_pool": "avg", "img_size": 64}, None),  # built for another size
    ("mixer_s16_224", {"img_size": 64}, None),  # patch grid kept in `stem`
    ("test_vit", {}, "pools the class token"),
    ("test_mambaout", {}, "non-linear"),
    ("twins_svt_small", {"img_size": 64}, "without a patch grid"),
    ("inception_v3", {"aux_logits": True}, "returned a tuple"),
    ("vgg11", {}, "classifier reads 4096 features"),
    ("hiera_tiny_224", {"img_size": [64, 64]}, "fails on a (3, 224, 224) input"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("arch", "kwargs", "reason"),
    ZOO,
    ids=[f"{a}-{'-'.join(map(str, k.values())) or 'default'}" for a, k, _ in ZOO],
)
def test_timm_zoo_exact_or_refused(arch, kwargs, reason, tmp_path, capsys, data):
    kwargs = {"num_classes": 3, **kwargs}
    code, err = convert(
        capsys,
        tmp_path,
        data,
        "--model",
        arch,
        "--checkpoint",
        saved(tmp_path, arch, **kwargs),
        "--model-kwargs",
        json.dumps(kwargs),
    )
    if reason is not None:
        refused(code, err, reason)
        return
    assert code == 0, err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    onnx = m["diagnostics"]["onnx_exactness"]
    assert onnx["top1_agreement"] == 1.0 and onnx["max_rel_logit_diff"] <= 1e-5
