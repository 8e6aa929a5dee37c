"""Train the embedded default: a small timm ResNet on Fashion-MNIST (CPU, a few minutes).

    python scripts/train_fashion.py [--idx-dir /usr/share/datasets/fashion-mnist] \
        [--out models/fashion-resnet] [--epochs 3]

Writes a timm ``local-dir`` model folder (config.json + model.safetensors) that
``timm.create_model("local-dir:models/fashion-resnet", pretrained=True)`` loads, and a
committed subset of the images (``--subset-out``) for conversion and verification.
The model is a ResNet with one basic block per stage and output stride 8, so a 56-px
input (28-px images upsampled) ends in a 7×7 feature map: heatmaps with some detail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from protonmf.artifact import Preprocessing, preprocess
from protonmf.data import read_idx

CLASS_NAMES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
ARCH = "resnet18"
MODEL_ARGS = dict(
    layers=[1, 1, 1, 1],
    channels=[32, 64, 96, 128],
    stem_width=32,
    output_stride=8,
    in_chans=1,
    num_classes=10,
)
PREP = Preprocessing(
    height=56,
    width=56,
    resize=56,
    color_mode="L",
    interpolation="bilinear",
    mean=(0.2860,),
    std=(0.3530,),
)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = np.stack([preprocess(Image.fromarray(im), PREP) for im in tqdm(images, "preprocess")])
    return torch.from_numpy(x)


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def save_subset(images, labels, out: Path, per_class: int, offset: int = 0):
    for c, name in enumerate(CLASS_NAMES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == c)[offset : offset + per_class]
        for i in idx:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png", optimize=True)


def _clean_config(path: Path):
    cfg = json.loads(path.read_text())
    for key in ("tag", "origin_url", "paper_ids"):
        cfg["pretrained_cfg"].pop(key, None)
    cfg["pretrained_cfg"]["description"] = "ProtoNMF Serve default: ResNet on Fashion-MNIST"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="models/fashion-resnet")
    ap.add_argument("--subset-out", default="data/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    d = Path(args.idx_dir)
    xtr_raw = read_idx(d / "train-images-idx3-ubyte.gz")
    ytr_raw = read_idx(d / "train-labels-idx1-ubyte.gz")
    xte_raw = read_idx(d / "t10k-images-idx3-ubyte.gz")
    yte_raw = read_idx(d / "t10k-labels-idx1-ubyte.gz")
    xtr, xte = to_tensor(xtr_raw), to_tensor(xte_raw)
    ytr, yte = (
        torch.from_numpy(ytr_raw.astype(np.int64)),
        torch.from_numpy(yte_raw.astype(np.int64)),
    )

    model = timm.create_model(ARCH, **MODEL_ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * (len(xtr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        bar = tqdm(range(len(xtr) // args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}")
        for b in bar:
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            xb = xtr[idx]
            flip = torch.rand(len(xb)) < 0.5  # horizontal flips: garments are symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"epoch {epoch + 1}: test accuracy {evaluate(model, xte, yte):.4f}", flush=True)
    train_s = time.time() - t0
    acc = evaluate(model, xte, yte)

    model.eval()
    timm.models.save_for_hf(
        model,
        args.out,
        model_config={"label_names": CLASS_NAMES},
        model_args=MODEL_ARGS,
        safe_serialization=True,
        data_config=dict(
            input_size=(1, PREP.height, PREP.width),
            interpolation=PREP.interpolation,
            mean=PREP.mean,
            std=PREP.std,
            crop_pct=1.0,
            crop_mode="center",
        ),
    )
    # save_for_hf inherits resnet18's ImageNet provenance (tag, paper, url): not ours.
    _clean_config(Path(args.out) / "config.json")
    (Path(args.out) / "model.safetensors").chmod(0o644)
    record = {
        "command": " ".join(["python"] + sys.argv),
        "epochs": args.epochs,
        "train_seconds": round(train_s, 1),
        "test_accuracy": round(acc, 4),
        "test_images": len(xte),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    Path(args.out, "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))

    # The committed subset: 200 train images per class for conversion and 50 test
    # images per class held out for verification.
    out = Path(args.subset_out)
    save_subset(xtr_raw, ytr_raw, out / "train", per_class=200)
    save_subset(xte_raw, yte_raw, out / "test", per_class=50)


if __name__ == "__main__":
    main()
