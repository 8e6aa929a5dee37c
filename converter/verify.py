"""``protonmf verify``: the artifact's ONNX graph vs the original timm model on images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from protonmf.artifact import preprocess
from protonmf.artifact.manifest import Manifest
from protonmf.converter.convert import exactness
from protonmf.converter.models import recorded_model
from protonmf.data import load_samples
from protonmf.graph import GraphSession

__all__ = ["verify"]


def default_data(manifest: dict) -> str:
    conv = Manifest.of(manifest).conversion
    data = conv.get("heldout") or conv.get("data")
    if not data or not Path(data).exists():
        raise FileNotFoundError(
            f"the images this artifact was built with ({data}) are not here; pass --data DIR"
        )
    return data


def verify(
    artifact, data=None, device="cpu", batch_size=32, max_images=None, progress=True
) -> dict:
    """Run ONNX (onnxruntime) and the original model (torch) on the same preprocessed images."""
    explainer = GraphSession.load(artifact, device=device)
    manifest = explainer.manifest
    data = data or default_data(manifest)
    samples = load_samples(data, explainer.info.classes)[:max_images]
    model = recorded_model(manifest)
    prep = explainer.info.preprocessing
    want, got = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(samples), batch_size), desc="verify", disable=not progress):
            x = np.stack([preprocess(s.open(), prep) for s in samples[i : i + batch_size]])
            want.append(model(torch.from_numpy(x)).double().numpy())
            got.append(explainer.run(x)["logits"].astype(np.float64))
    report = exactness(np.concatenate(want), np.concatenate(got))
    report.update(provider=explainer.provider, data=str(Path(data).resolve()))
    return report
