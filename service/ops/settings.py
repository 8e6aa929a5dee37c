"""Every setting of the service, read once from the environment (``PROTONMF_<NAME>``).

One typed class: docs/configuration.md is generated from it (``python -m
protonmf.service.ops.settings --markdown``; a test checks the file is current). Unknown
``PROTONMF_*`` variables are refused at start-up, so a typo does not silently keep a default.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protonmf.service.decode.images import Limits

__all__ = ["PREFIX", "REMOVED", "Settings", "SettingsError", "available_cpus", "markdown_table"]

PREFIX = "PROTONMF_"
# Variables of earlier versions that no longer do anything: a warning, not a refusal.
REMOVED = {"BATCH_PATH": "batching is in-process always (docs/architecture.md)"}
log = logging.getLogger("protonmf.settings")


CGROUP = Path("/sys/fs/cgroup")


def _cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """The container's CPU limit in CPUs (cgroup v2 ``cpu.max``, else v1 CFS quota), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU limit rounded up.
    ``os.cpu_count()`` counts the node's: a pod limited to 2 CPUs on a 64-core node would
    start 64 decoding threads (each holding up to a raster's worth of memory) and an
    onnxruntime pool of one thread per physical core, throttled by the limit."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota(root)
    return min(cpus, max(1, math.ceil(quota))) if quota else cpus


class SettingsError(ValueError):
    """The environment's PROTONMF_* variables are unknown or out of bounds."""


class Settings(BaseSettings):
    """The service's configuration. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # --- the model ---------------------------------------------------------------------
    artifact: Path | None = Field(
        None, description="artifact directory (`protonmf convert`); required by the service"
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="onnxruntime device; `cuda` fails unless CUDA really runs the graph"
    )
    variant: str = Field(
        "fp32", description="graph variant: fp32 (exact) or one listed by `protonmf variants`"
    )
    # --- processes and threads -----------------------------------------------------------
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="worker processes (BentoML), each with "
        "its own model, batcher and gRPC server on the shared port",
    )
    ort_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="onnxruntime intra-op "
        "threads per worker; unset: onnxruntime's choice with one "
        "worker and no cgroup CPU limit, else the CPUs available "
        "shared out among the workers",
    )
    ort_spinning: bool = Field(
        False,
        description="let idle onnxruntime threads busy-wait "
        "(faster alone, slower beside decoding and HTTP)",
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="threads decoding "
        "images per worker; unset: the CPUs available (affinity, "
        "capped by a cgroup CPU limit)",
    )
    decode_processes: int = Field(
        0,
        ge=0,
        le=256,
        description="processes decoding images "
        "beside each worker (crops come back through shared memory), "
        "so decoding scales with cores while one worker runs the "
        "model; 0: decode in the worker's threads",
    )
    # --- batching (service/engine/batching.py) ----------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per onnxruntime run")
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long a batch stays "
        "open for more images once the model is free; 0: run what "
        "is queued at once (batches form while the model is busy)",
    )
    batch_buckets: str = Field(
        "auto",
        pattern=r"^(auto|off|\d+(,\d+)*)$",
        description="pad each batch to the next of these sizes (e.g. "
        "`1,2,4,8,16,32`) so the model sees few shapes, each warmed "
        "before ready; `auto`: powers of two up to the batch limit on "
        "CUDA, off on CPU (padding is work there); `off`",
    )
    max_queue: int = Field(
        512,
        ge=1,
        le=100_000,
        description="images waiting for the model "
        "per worker; beyond: 503 overloaded with Retry-After",
    )
    max_latency_ms: int = Field(
        10_000,
        ge=1,
        le=600_000,
        description="longest an image may wait for the model; beyond: 503 overloaded",
    )
    max_concurrency: int = Field(
        256,
        ge=1,
        le=100_000,
        description="REST requests being "
        "served per worker, counted once their body has arrived; "
        "beyond: 429",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="REST requests not answered in time get a 504"
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a REST request's body must arrive within this; beyond: 408 (slow clients)",
    )
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="largest REST request body; "
        "unset: max_images base64-encoded images of max_bytes "
        "+ 1 MiB",
    )
    # --- CUDA ----------------------------------------------------------------------------
    cuda_tf32: bool = Field(
        False,
        description="allow TF32 in CUDA convs/matmuls (faster on "
        "Ampere+, breaks the fp32 graph's exactness)",
    )
    cudnn_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm search (EXHAUSTIVE re-tunes for "
        "every new batch shape)",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "off",
        description="run the graph through onnxruntime IOBinding: the batch copied to "
        "the device once, only the outputs an answer needs copied back; `auto`: on with CUDA "
        "(off by default until measured on a GPU: benchmarks/gpu_checks.sh)",
    )
    cuda_graphs: bool = Field(
        False,
        description="capture one CUDA graph per batch bucket and "
        "replay it (CUDA only; needs batch buckets; binds its own "
        "buffers whatever PROTONMF_IO_BINDING says)",
    )
    # --- gRPC ----------------------------------------------------------------------------
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 turns gRPC off")
    grpc_host: str = Field("0.0.0.0", description="gRPC bind address")
    grpc_max_concurrency: int = Field(
        128,
        ge=1,
        le=100_000,
        description="gRPC calls in flight per worker; beyond: RESOURCE_EXHAUSTED",
    )
    grpc_max_message_bytes: int | None = Field(
        None,
        ge=1024,
        description="largest gRPC message; unset: a full request of maximum-size images + 1 MiB",
    )
    grpc_grace_s: float = Field(
        10.0, ge=0, le=600, description="seconds in-flight gRPC calls get to finish at shutdown"
    )
    grpc_drain_delay_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="at SIGTERM gRPC health "
        "turns NOT_SERVING at once and calls are still taken "
        "this long (those on the wire), then refused",
    )
    grpc_tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain: gRPC over TLS "
        "(with PROTONMF_GRPC_TLS_KEY); unset: plaintext",
    )
    grpc_tls_key: Path | None = Field(None, description="PEM private key of the gRPC certificate")
    # --- authentication and logs (service/ops/observability.py) -------------------------------
    api_keys: SecretStr | None = Field(
        None,
        description="API keys accepted, comma-separated "
        "(`Authorization: Bearer KEY` or `X-API-Key: KEY`; gRPC "
        "metadata the same); unset with no file: no "
        "authentication",
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line (a mounted Secret)"
    )
    auth_open_paths: str = Field(
        "/healthz,/livez,/readyz,/metrics,/v2/health",
        description="REST paths served without a key when keys are set (comma-separated)",
    )
    auth_open_grpc: str = Field(
        "grpc.health.v1.Health",
        description="gRPC services served without a key when keys are set (comma-separated)",
    )
    access_log: bool = Field(
        True, description="one log line per request on the protonmf.access logger"
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="access log lines as JSON objects or plain text"
    )
    # --- request limits (service/decode/images.py) -----------------------------------------------
    max_bytes: int = Field(Limits.max_bytes, ge=1, description="bytes of one encoded image")
    max_pixels: int = Field(
        Limits.max_pixels, ge=1, description="declared width × height, checked before decoding"
    )
    min_side: int = Field(Limits.min_side, ge=1, description="shorter side at least")
    max_side: int = Field(
        Limits.max_side, ge=1, description="longer side at most, checked before decoding"
    )
    max_aspect: int = Field(Limits.max_aspect, ge=1, description="longer / shorter side at most")
    max_raster_bytes: int = Field(
        Limits.max_raster_bytes, ge=1, description="decoded raster bytes as Pillow holds them"
    )
    max_scans: int = Field(
        Limits.max_scans, ge=1, description="a JPEG's scans (progressive scan bombs)"
    )
    max_decode_ms: int = Field(
        Limits.max_decode_ms,
        ge=1,
        description="one image's header reading and decoding; beyond: 413 decode_timeout",
    )
    max_images: int = Field(Limits.max_images, ge=1, description="images in one request")
    max_interventions: int = Field(
        Limits.max_interventions,
        ge=1,
        description="(class, prototype) pairs switched off in one request",
    )
    jpeg_decoder: Literal["pillow", "nvimgcodec"] = Field(
        "pillow",
        description="who decodes JPEG pixels: Pillow (libjpeg-turbo, timm's pixels) "
        "or `nvimgcodec`: the GPU (nvImageCodec; `pip install nvidia-nvimgcodec-cu13 "
        "nvidia-nvjpeg-cu13`), close to but not timm's pixels, in the worker (not with decode "
        "processes); refused at start without a GPU",
    )
    jpeg_draft: bool = Field(
        Limits.jpeg_draft,
        description="decode large JPEGs at reduced "
        "scale (Pillow's draft mode, DCT scaling) when the model's resize "
        "allows: faster, but the pixels are NOT timm's (a few grey levels "
        "off), so answers may differ from the black box's",
    )

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("PROTONMF_GRPC_TLS_CERT and PROTONMF_GRPC_TLS_KEY go together")
        if self.jpeg_decoder == "nvimgcodec" and self.decode_processes:
            raise ValueError(
                "PROTONMF_JPEG_DECODER=nvimgcodec decodes in the worker (one GPU "
                "context); set PROTONMF_DECODE_PROCESSES=0"
            )
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: os.environ); SettingsError names every bad variable."""
        env = os.environ if env is None else env
        ours = {k[len(PREFIX) :]: v for k, v in env.items() if k.startswith(PREFIX)}
        known = {name.upper() for name in cls.model_fields}
        for name in sorted(set(ours) & set(REMOVED)):
            log.warning("%s%s is ignored: %s", PREFIX, name, REMOVED[name])
        unknown = sorted(set(ours) - known - set(REMOVED))
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(PREFIX + u for u in unknown)}; "
                f"known: {', '.join(PREFIX + k for k in sorted(known))}"
            )
        values = {k.lower(): v for k, v in ours.items() if k in known and v != ""}
        try:
            # model_validate reads only ``values`` (not the process environment)
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(
                (f"{PREFIX}{'.'.join(map(str, err['loc'])).upper()}: " if err["loc"] else "")
                + err["msg"]
                for err in e.errors()
            )
            raise SettingsError(problems) from None

    def limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in Limits.__dataclass_fields__})

    def ort_threads_per_worker(self) -> int | None:
        """PROTONMF_ORT_THREADS, else None with one worker (onnxruntime's own choice: a
        thread per physical core) unless a cgroup limits the CPUs, and the available CPUs
        shared out with several workers (each onnxruntime would take every core). On 2
        vCPUs, 2 workers × 1 thread served 1.23× the images/s of 1 × 2 threads (benchmarks)."""
        if self.ort_threads:
            return self.ort_threads
        cpus = available_cpus()
        if self.workers <= 1 and cpus == len(os.sched_getaffinity(0)):
            return None
        return max(1, cpus // self.workers)

    def decode_thread_count(self) -> int:
        """PROTONMF_DECODE_THREADS, else the CPUs available."""
        return self.decode_threads or available_cpus()

    def buckets(self, provider: str) -> tuple[int, ...] | None:
        """The batch sizes batches are padded to on ``provider`` (None: no padding)."""
        if self.batch_buckets == "off":
            return None
        if self.batch_buckets == "auto":
            if provider != "CUDAExecutionProvider":
                return None
            sizes = {
                1 << i
                for i in range(self.max_batch_size.bit_length())
                if 1 << i <= self.max_batch_size
            }
            return tuple(sorted(sizes | {self.max_batch_size}))
        sizes = {int(x) for x in self.batch_buckets.split(",")}
        if min(sizes) < 1:
            raise SettingsError(f"{PREFIX}BATCH_BUCKETS: sizes must be >= 1")
        # a batch can reach the limit: the limit is always a bucket
        return tuple(sorted({x for x in sizes if x < self.max_batch_size} | {self.max_batch_size}))

    def body_bytes(self) -> int:
        return self.max_body_bytes or self.max_images * (self.max_bytes * 4 // 3 + 4) + (1 << 20)

    def grpc_message_bytes(self) -> int:
        return self.grpc_max_message_bytes or self.max_bytes * self.max_images + (1 << 20)


def _type_name(annotation) -> str:
    """int, path, one of `a`/`b`…; "optional" dropped (the default column says unset)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return "one of " + " / ".join(f"`{a}`" for a in args)
    if len(args) == 1:
        return _type_name(args[0])
    return {Path: "path", bool: "bool (true/false/1/0)", SecretStr: "secret (str)"}.get(
        annotation, annotation.__name__
    )


def markdown_table() -> str:
    """docs/configuration.md's table: every variable, type, default, bounds, meaning."""
    rows = ["| Variable | Type | Default | Meaning |", "|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        kind = _type_name(f.annotation)
        bounds = [
            f"{op} {getattr(m, op)}"
            for m in f.metadata
            for op in ("ge", "gt", "le")
            if getattr(m, op, None) is not None
        ]
        if bounds:
            kind += f" ({', '.join(bounds)})"
        default = "unset" if f.default is None else f"`{f.default}`"
        rows.append(f"| `{PREFIX}{name.upper()}` | {kind} | {default} | {f.description} |")
    return "\n".join(rows) + "\n"


CONFIG_DOC_HEAD = """# Configuration

The service reads these environment variables once, at start-up (`protonmf.service.ops.settings.
Settings`). An unknown `PROTONMF_*` variable, or a value out of bounds, stops the service with
the variable's name and the reason; `protonmf serve` also loads the artifact with them once
before BentoML starts, so a setting this machine cannot run (CUDA without a GPU, CUDA graphs
on the CPU, nvImageCodec missing) exits 2 with its reason. `protonmf serve --workers/
--max-batch-size/--device/--variant/--grpc-port` set the matching variables.

Generated by `python -m protonmf.service.ops.settings --markdown > docs/configuration.md`; a test
checks the file is current.

"""


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m protonmf.service.ops.settings --markdown")
    sys.stdout.write(CONFIG_DOC_HEAD + markdown_table())
