"""Prometheus metrics of the explanation service (prometheus_client; BentoML merges them
into its /metrics page, across workers). Label values are bounded: classes beyond
``MAX_CLASS_LABELS`` are counted as "other", prototypes by their index within a class."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["METRICS", "class_label", "stage"]

MAX_CLASS_LABELS = 100
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Metrics:
    def __init__(self):
        self.stage_seconds = Histogram(
            "protonmf_stage_duration_seconds",
            "Time spent per pipeline stage (decode, queue, infer, explain, overlay)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.images_per_request = Histogram(
            "protonmf_images_per_request", "Images in one request", buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.batch_size = Histogram(
            "protonmf_inference_batch_size",
            "Images per onnxruntime run (after micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.predictions = Counter(
            "protonmf_predictions_total", "Top-1 predictions by class", ["class_name"]
        )
        self.prototype_usage = Counter(
            "protonmf_prototype_top_contribution_total",
            "Which prototype (index within the predicted class) carried the largest contribution",
            ["prototype"],
        )
        self.interventions = Counter(
            "protonmf_interventions_total", "Prototypes switched off by test-time intervention"
        )
        self.exactness_gap = Gauge(
            "protonmf_exactness_gap_max",
            "Largest |logit − (Σ contributions + bias)| / max|logit| seen by this process",
            multiprocess_mode="max",
        )
        self.queued_images = Gauge(
            "protonmf_batch_queue_images",
            "Images waiting for the model (the micro-batcher's queue), summed over workers",
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "protonmf_requests_total",
            "Requests answered, by transport (rest, grpc), endpoint "
            "and status (HTTP status or gRPC code)",
            ["transport", "endpoint", "status"],
        )
        self.request_seconds = Histogram(
            "protonmf_request_duration_seconds",
            "Request latency by transport and endpoint",
            ["transport", "endpoint"],
            buckets=_LATENCY_BUCKETS,
        )
        self.rejected = Counter(
            "protonmf_rejected_requests_total", "Requests refused, by reason", ["reason"]
        )


METRICS = _Metrics()


def class_label(index: int, names: list[str]) -> str:
    return names[index] if index < MAX_CLASS_LABELS else "other"


@contextmanager
def stage(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        METRICS.stage_seconds.labels(stage=name).observe(time.perf_counter() - start)
