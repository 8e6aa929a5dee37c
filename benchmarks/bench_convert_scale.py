"""Conversion at scale: feature extraction images/s vs decoding workers, and an ImageNet-1k
projection for EfficientNet-Lite0 from measured per-image and per-class costs.

Measured here, in one process (CPU, this machine): the converter's own ``extract_features``
on the 20 bundled ImageNet photos repeated to ``--images`` (JPEG decode + resize + crop +
Lite0 forward) with 0, 1, … decoding workers; Lite0's forward alone on a preprocessed batch
(so decode is what the workers take off the model's path); and one class's NMF (p = 3,
the converter's ``nmf``) on a synthetic non-negative (n × 49, 1280) matrix of ImageNet's
class size, timed for a few iterations and scaled to the iterations Fashion's classes took.
The projection multiplies these by ImageNet-1k's 1.28 M images and 1,000 classes; it is an
estimate from measured parts, not a measured run (no GPU was at hand for one).

    .venv/bin/python benchmarks/bench_convert_scale.py [--images 160] [--workers 0 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import RESULTS, machine_info

from protonmf.artifact import preprocess
from protonmf.converter.convert import extract_features
from protonmf.converter.models import ModelSource, analyse_head, load_model, preprocessing_from_timm
from protonmf.converter.nmf import nmf
from protonmf.data import load_image_folder
from protonmf.sample_data import imagenet_photo_folder, lite0_checkpoint

IMAGENET_IMAGES, IMAGENET_CLASSES = 1_281_167, 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--nmf-iters", type=int, default=5, help="NMF iterations timed")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_convert_scale.json")
    args = ap.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    model = load_model(ModelSource("tf_efficientnet_lite0", str(lite0_checkpoint())))
    prep = preprocessing_from_timm(model)
    head = analyse_head(model, torch.randn(2, 3, prep.height, prep.width))
    with tempfile.TemporaryDirectory() as tmp:
        photos = load_image_folder(imagenet_photo_folder(Path(tmp)), [str(i) for i in range(1000)])
        samples = [photos[i % len(photos)] for i in range(args.images)]
        rows = []
        for workers in args.workers:
            extract_features(model, head, samples[:32], prep, 32, "cpu", False, workers)  # warm
            t0 = time.perf_counter()
            extract_features(model, head, samples, prep, 32, "cpu", False, workers)
            seconds = time.perf_counter() - t0
            rows.append({"workers": workers, "images_per_s": args.images / seconds})
            print(f"workers {workers}: {args.images / seconds:.1f} img/s", flush=True)
        x = torch.from_numpy(np.stack([preprocess(s.open(), prep) for s in samples[:32]]))
        t0 = time.perf_counter()
        for s in samples[:40]:
            preprocess(s.open(), prep)
        decode_ms = (time.perf_counter() - t0) / 40 * 1e3
    with torch.no_grad():
        model.forward_features(x)
        t0 = time.perf_counter()
        model.forward_features(x)
        forward_ms = (time.perf_counter() - t0) / len(x) * 1e3
    n = IMAGENET_IMAGES // IMAGENET_CLASSES * 49  # one class's rows: ~1,281 images × 7×7
    A = torch.rand(1, n, 1280) * (torch.rand(1, n, 1280) > 0.5)  # ReLU-like: half zeros
    t0 = time.perf_counter()
    res = nmf(A, 3, tol=0.0, max_iter=args.nmf_iters)
    per_iter = (time.perf_counter() - t0) / int(res.n_iter[0])
    iters = 50  # Fashion's classes stopped after 35–58 iterations (manifest diagnostics)
    projection = {
        "decode_and_preprocess_ms_per_image_one_core": decode_ms,
        "lite0_forward_ms_per_image_cpu": forward_ms,
        "nmf_s_per_class_at_50_iterations_cpu": per_iter * iters,
        "imagenet_hours_features_cpu_one_process": IMAGENET_IMAGES * forward_ms / 3.6e6,
        "imagenet_hours_decode_one_core": IMAGENET_IMAGES * decode_ms / 3.6e6,
        "imagenet_hours_nmf_cpu": IMAGENET_CLASSES * per_iter * iters / 3600,
    }
    for k, v in projection.items():
        print(f"{k}: {v:.2f}")
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "images": args.images,
                "workers": rows,
                "projection": projection,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
