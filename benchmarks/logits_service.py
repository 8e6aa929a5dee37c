"""Baseline for bench_service.py: a minimal logits-only BentoML + onnxruntime service.

Written the naive way on purpose: one batchable endpoint takes the images as PIL images
(multipart ``images`` files); the worker decodes, resizes, crops and normalises each one
serially (``protonmf.artifact.preprocess`` with the artifact manifest's preprocessing),
runs the plain black-box ONNX graph of the same timm model, and returns the top-5
classes and logits per image. No explanation, no heatmaps, no decode thread pool.

    POST /classify   images → [{"classes": [5 ints], "logits": [5 floats]}, ...]

Environment: LOGITS_ONNX (black-box graph, required), LOGITS_ARTIFACT (artifact whose
manifest gives the preprocessing, required), LOGITS_ORT_THREADS, LOGITS_MAX_BATCH_SIZE
(32), LOGITS_MAX_LATENCY_MS (10000), LOGITS_WORKERS (1), LOGITS_DEVICE (cpu|cuda).

Serve from the repository root:

    bentoml serve benchmarks.logits_service:LogitsService --working-dir .
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL import Image

from protonmf.artifact import Preprocessing, load_manifest, preprocess
from protonmf.graph import create_session

MAX_BATCH_SIZE = int(os.environ.get("LOGITS_MAX_BATCH_SIZE", "32"))
MAX_LATENCY_MS = int(os.environ.get("LOGITS_MAX_LATENCY_MS", "10000"))
TOP_K = 5


@bentoml.service(
    name="logits_only",
    workers=int(os.environ.get("LOGITS_WORKERS", "1")),
    traffic={"timeout": 60, "max_concurrency": 128},
)
class LogitsService:
    def __init__(self) -> None:
        manifest = load_manifest(os.environ["LOGITS_ARTIFACT"])
        self.spec = Preprocessing.from_dict(manifest["preprocessing"])
        threads = os.environ.get("LOGITS_ORT_THREADS")
        self.session, self.provider = create_session(
            os.environ["LOGITS_ONNX"],
            os.environ.get("LOGITS_DEVICE", "cpu"),
            int(threads) if threads else None,
        )
        self.input = self.session.get_inputs()[0].name
        shape = (self.spec.channels, self.spec.height, self.spec.width)
        for n in (MAX_BATCH_SIZE, 1):  # warm-up before /readyz, as the real service does
            self.session.run(None, {self.input: np.zeros((n, *shape), np.float32)})
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image.Image]) -> list[dict]:
        x = np.stack([preprocess(im, self.spec) for im in images])  # (N, c, h, w)
        logits = self.session.run(None, {self.input: x})[0]  # (N, C)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]  # (N, 5)
        return [
            {"classes": t.tolist(), "logits": row[t].astype(float).tolist()}
            for t, row in zip(top, logits, strict=True)
        ]
