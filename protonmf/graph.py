"""Run an artifact's ONNX graph with onnxruntime: no torch, provider checked, I/O named.

onnxruntime-gpu lists CUDA as *available* even on machines without a GPU and silently
falls back to CPU when CUDA fails, so the provider actually in use is read back from
``session.get_providers()`` and a request for CUDA that did not take is an error.

Three ways to run the graph, chosen at load (``GraphSession.load``): ``session.run``;
IOBinding (the batch bound once, only the requested outputs bound and copied back); and
CUDA graphs (``BucketGraphs``: one captured graph per batch bucket, fixed device buffers).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from protonmf.artifact import (
    MODEL_FILE,
    ArtifactError,
    Preprocessing,
    load_manifest,
    load_tensors,
    preprocess,
)
from protonmf.artifact.manifest import Manifest

__all__ = [
    "BucketGraphs",
    "GraphSession",
    "ProviderError",
    "create_session",
    "cuda_options",
]


class ProviderError(RuntimeError):
    """The requested execution provider could not be used."""


CUDNN_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def cuda_options(
    tf32: bool = False, search: str = "HEURISTIC", graphs: bool = False
) -> dict[str, str]:
    """CUDA provider options (PROTONMF_CUDA_TF32, PROTONMF_CUDNN_SEARCH in the service).

    TF32 stays off unless asked for: onnxruntime enables it by default on Ampere and later,
    which rounds conv/matmul inputs to 10 mantissa bits and breaks the fp32 graph's
    exactness contract (logits equal to the black box's).

    cuDNN's convolution algorithm search is HEURISTIC by default: onnxruntime's default,
    EXHAUSTIVE, benchmarks every algorithm for each new input shape (a new batch size) —
    measured on an H100, batches took ~700 ms instead of ~6 ms under load.

    ``graphs``: ``enable_cuda_graph`` (PROTONMF_CUDA_GRAPHS), for ``BucketGraphs`` only: such
    a session must be run through IOBinding with fixed device buffers.
    """
    search = search.upper()
    if search not in CUDNN_SEARCH:
        raise ValueError(f"cuDNN search must be one of {CUDNN_SEARCH}, got {search!r}")
    options = {"use_tf32": "1" if tf32 else "0", "cudnn_conv_algo_search": search}
    if graphs:
        options["enable_cuda_graph"] = "1"
    return options


def create_session(
    model_path: str | os.PathLike,
    device: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
    cuda: dict | None = None,
):
    """An InferenceSession on ``device`` ("cpu", "cuda" or "auto"), full graph optimisation.

    ``spinning=False``: idle intra-op threads sleep instead of busy-waiting for the next
    kernel, leaving the CPU to work beside the graph (the service's decoding and HTTP).
    ``cuda``: ``cuda_options`` keyword arguments (tf32, search, graphs).
    Returns (session, provider_in_use).
    """
    import onnxruntime as ort

    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    want_cuda = (
        device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers()
    )
    providers = (
        [("CUDAExecutionProvider", cuda_options(**(cuda or {}))), "CPUExecutionProvider"]
        if want_cuda
        else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    in_use = session.get_providers()[0]
    if device == "cuda" and in_use != "CUDAExecutionProvider":
        raise ProviderError(
            f"CUDA was requested but onnxruntime runs on {in_use} "
            f"(available: {ort.get_available_providers()}); is there a GPU and CUDA runtime?"
        )
    return session, in_use


def check_graph(artifact_dir, manifest: dict | Manifest, session) -> None:
    """The graph's input and outputs are the manifest's: names, and every fixed dimension
    (classes, p, k, grid, image size and channels). An edited manifest would otherwise
    load and answer with the wrong shapes or crash on the first request."""

    def fixed(shape) -> list:  # "N" / "batch" / None: symbolic
        return [d if isinstance(d, int) else None for d in shape]

    m = Manifest.of(manifest)
    inp = session.get_inputs()[0]
    prep = m.preprocessing
    want_in = [None, prep.channels, prep.height, prep.width]
    if fixed(inp.shape) != want_in:
        raise ArtifactError(
            f"{artifact_dir}: the graph's input is {inp.shape}, the manifest's "
            f"preprocessing implies [N, {prep.channels}, {prep.height}, "
            f"{prep.width}]"
        )
    got = {o.name: fixed(o.shape) for o in session.get_outputs()}
    want = {name: fixed(shape) for name, shape in (m.graph.outputs if m.graph else {}).items()}
    if list(got) != list(want):
        raise ArtifactError(f"{artifact_dir}: graph outputs {list(got)} != manifest {list(want)}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ArtifactError(
                f"{artifact_dir}: graph output {name!r} has shape {got[name]}, "
                f"the manifest says {shape}"
            )
    C, p = len(m.classes), m.p
    if "logits" in want and want["logits"][1:] != [C]:
        raise ArtifactError(
            f"{artifact_dir}: {C} classes in the manifest, the graph has "
            f"{want['logits'][1:]} logits"
        )
    per_proto = [s for n, s in want.items() if n in ("scores", "topk_scores")]
    if per_proto and per_proto[0][-1] != p:
        raise ArtifactError(
            f"{artifact_dir}: p = {p} in the manifest, the graph has "
            f"{per_proto[0][-1]} prototypes per class"
        )


GRAPHS_SETTING = "PROTONMF_CUDA_GRAPHS"
# onnxruntime's tensor types → numpy (BucketGraphs allocates every input and output itself;
# the OIP adapter names its datatypes from it)
NUMPY_TYPES = {
    "tensor(uint8)": np.uint8,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass
class _Bucket:
    graph_id: int
    input: object  # OrtValue, fixed address
    outputs: dict  # name → OrtValue, fixed addresses, every graph output
    binding: object  # IOBinding over the two, bound once
    options: object  # RunOptions with this bucket's gpu_graph_id
    runs: int = 0


class BucketGraphs:
    """CUDA graphs, one per batch bucket (PROTONMF_CUDA_GRAPHS).

    A CUDA graph replays its kernels on the device addresses it captured, so each bucket
    size gets its own input and output buffers on the device, bound once to its own
    IOBinding, and its own ``gpu_graph_id`` run option (onnxruntime ≥ 1.18 keeps one graph
    per id; 0 is its default id, -1 a run that neither captures nor replays). A batch is
    copied into its bucket's input buffer (``OrtValue.update_inplace``), the bucket's graph
    runs, and only the outputs asked for are copied to the host. Every output is bound: a
    graph cannot vary what it writes.

    A bucket's first ``REGULAR_RUNS`` runs are ordinary runs (gpu_graph_id -1): the arena
    grows and cuDNN picks its convolutions there, since nothing may allocate while a graph
    is captured; the next run captures the graph, later runs replay it.
    ``Model.warm_up`` runs every bucket ``GraphSession.warm_up_runs`` times, so each graph is
    captured (and replayed once) before the service says ready.

    onnxruntime's CUDA provider keeps captured graphs per calling thread, so every run goes
    through one thread owned here: warm-up (the main thread) and serving (the batcher's
    thread) see the same graphs.

    ``device="cpu"`` builds the same buffers, bindings and graph ids on a CPU session (the
    CPU provider ignores gpu_graph_id and captures nothing): that is how the bookkeeping is
    tested without a GPU. Capture and replay themselves (``enable_cuda_graph``) cannot run
    here; ``benchmarks/gpu_checks.sh run`` compares their outputs with ``session.run``'s.
    """

    REGULAR_RUNS = 2

    def __init__(self, session, sizes, device: str = "cuda", device_id: int = 0):
        import onnxruntime as ort

        sizes = sorted(set(sizes or ()))
        if not sizes or sizes[0] < 1:
            raise ValueError(
                f"{GRAPHS_SETTING} needs batch buckets (PROTONMF_BATCH_BUCKETS "
                f"`auto` or a list of sizes, not `off`): one graph per bucket"
            )
        self.session, self.device = session, device
        inp, outputs = session.get_inputs()[0], session.get_outputs()
        for meta in (inp, *outputs):
            if meta.type not in NUMPY_TYPES or not all(isinstance(d, int) for d in meta.shape[1:]):
                raise ValueError(
                    f"{GRAPHS_SETTING}: {meta.name!r} is {meta.type} {meta.shape}; "
                    "a graph's buffers need fixed dimensions besides the batch"
                )

        def buffer(meta, n: int):
            return ort.OrtValue.ortvalue_from_shape_and_type(
                [n, *meta.shape[1:]], NUMPY_TYPES[meta.type], device, device_id
            )

        self.buckets: dict[int, _Bucket] = {}
        for graph_id, n in enumerate(sizes, start=1):
            x, outs = buffer(inp, n), {o.name: buffer(o, n) for o in outputs}
            binding = session.io_binding()
            binding.bind_ortvalue_input(inp.name, x)
            for name, value in outs.items():
                binding.bind_ortvalue_output(name, value)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self.buckets[n] = _Bucket(graph_id, x, outs, binding, options)
        self._regular = ort.RunOptions()
        self._regular.add_run_config_entry("gpu_graph_id", "-1")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="protonmf-cuda-graphs")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.buckets)

    def captured(self) -> tuple[int, ...]:
        """The bucket sizes past their regular runs: their graph is captured (on CUDA)."""
        return tuple(n for n, b in self.buckets.items() if b.runs > self.REGULAR_RUNS)

    def run(self, batch: np.ndarray, names) -> dict[str, np.ndarray]:
        """``batch`` (a bucket's size, float32) → the outputs ``names``, on the host."""
        return self._thread.submit(self._run, batch, list(names)).result()

    def _run(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        bucket = self.buckets.get(len(batch))
        if bucket is None:
            raise ValueError(
                f"{GRAPHS_SETTING}: a batch of {len(batch)} is not one of the "
                f"batch buckets {self.sizes} (the batcher pads to them)"
            )
        if tuple(batch.shape) != tuple(bucket.input.shape()):
            raise ValueError(f"batch shape {batch.shape}, the graph takes {bucket.input.shape()}")
        bucket.input.update_inplace(batch)
        options = self._regular if bucket.runs < self.REGULAR_RUNS else bucket.options
        self.session.run_with_iobinding(bucket.binding, options)
        bucket.runs += 1
        out = {name: bucket.outputs[name].numpy() for name in names}  # device → host: these only
        if self.device == "cpu":  # a CPU OrtValue's numpy() is a view of the reused buffer
            out = {name: value.copy() for name, value in out.items()}
        return out

    def close(self) -> None:
        self._thread.shutdown(wait=False)


@dataclass
class GraphSession:
    """An artifact loaded for inference: manifest, prototype tensors and ONNX session."""

    manifest: dict
    tensors: dict
    session: object
    provider: str
    variant: str = "fp32"
    io_binding: bool = False  # run through IOBinding (resolved: "auto" is gone)
    graphs: BucketGraphs | None = None  # CUDA graphs per batch bucket
    device_id: int = 0

    @cached_property
    def info(self) -> Manifest:
        """The manifest, typed."""
        return Manifest.of(self.manifest)

    @classmethod
    def load(
        cls,
        artifact_dir: str | os.PathLike,
        device: str = "cpu",
        threads=None,
        variant: str = "fp32",
        spinning: bool = True,
        cuda: dict | None = None,
        *,
        io_binding: str = "off",
        cuda_graphs: bool = False,
        buckets=None,
    ):
        """``variant``: "fp32" (model.onnx, exact) or one listed in the manifest's variants.

        ``io_binding`` (PROTONMF_IO_BINDING): "on", "off" or "auto" (on when the session runs
        on CUDA). ``cuda_graphs`` (PROTONMF_CUDA_GRAPHS): one CUDA graph per size of
        ``buckets`` (``BucketGraphs``, bound buffers of its own); refused without CUDA or
        buckets."""
        _check_run_modes(io_binding, cuda_graphs, buckets, device)
        artifact_dir = Path(artifact_dir)
        manifest = load_manifest(artifact_dir)
        graph = _graph_file(artifact_dir, Manifest.of(manifest), variant)
        tensors = load_tensors(artifact_dir, manifest)
        path = artifact_dir / graph
        session, provider = _session(path, device, threads, spinning, cuda, cuda_graphs)
        check_graph(artifact_dir, manifest, session)
        on_cuda = provider == "CUDAExecutionProvider"
        if cuda_graphs and not on_cuda:
            raise ProviderError(
                f"{GRAPHS_SETTING} runs on CUDA only; onnxruntime runs this graph on {provider}"
            )
        device_id = int(session.get_provider_options().get(provider, {}).get("device_id", 0))
        graphs = BucketGraphs(session, buckets, "cuda", device_id) if cuda_graphs else None
        bound = cuda_graphs or io_binding == "on" or (io_binding == "auto" and on_cuda)
        return cls(manifest, tensors, session, provider, variant, bound, graphs, device_id)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def preprocess(self, images) -> np.ndarray:
        """PIL images → (N, c, h, w) float32 batch, as the manifest says."""
        spec = self.preprocessing
        return np.stack([preprocess(im, spec) for im in images])

    @property
    def output_shapes(self) -> dict[str, list]:
        """The outputs ``run`` returns, with their shapes ("N" first): the graph's, and
        ``bias`` (N, C) for an all-scores graph whose bias does not depend on the image
        (format 3 leaves that constant out of the graph: protomodel._image_bias)."""
        shapes = dict(self.info.graph.outputs)
        if "scores" in shapes and "bias" not in shapes:
            shapes["bias"] = ["N", len(self.classes)]
        return shapes

    def run(self, batch: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
        """Run the graph on a preprocessed batch; outputs by name (``output_shapes``).

        ``outputs``: the names wanted (default: all). onnxruntime copies only those out of
        the device; the heavy ones (per-prototype maps) stay there when not asked for.
        The same outputs whichever way the graph runs (session.run, IOBinding, CUDA graphs)."""
        graph_outputs = self.info.graph.outputs
        names = (
            list(graph_outputs) if outputs is None else [n for n in graph_outputs if n in outputs]
        )
        batch = np.ascontiguousarray(batch, np.float32)
        if self.graphs is not None:
            out = self.graphs.run(batch, names)
        elif self.io_binding:
            out = self._run_bound(batch, names)
        else:
            feed = {self.info.graph.input.name: batch}
            out = dict(zip(names, self.session.run(names, feed), strict=True))
        if "scores" in out and "bias" not in out and "bias" not in graph_outputs:
            out["bias"] = np.broadcast_to(self.tensors["bias"], (len(batch), len(self.classes)))
        return out

    def _run_bound(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """IOBinding: the batch bound as it is (onnxruntime copies it to the device once),
        only ``names`` bound as outputs, on the session's device, then copied to the host."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.info.graph.input.name, batch)
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        for name in names:
            binding.bind_output(name, device, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    @property
    def warm_up_runs(self) -> int:
        """Runs per batch size before ready: 1; with CUDA graphs the regular runs, the
        capture and one replay (``BucketGraphs``)."""
        return 1 if self.graphs is None else BucketGraphs.REGULAR_RUNS + 2


def _check_run_modes(io_binding: str, cuda_graphs: bool, buckets, device: str) -> None:
    if io_binding not in ("auto", "on", "off"):
        raise ValueError(f"io_binding must be 'auto', 'on' or 'off', got {io_binding!r}")
    # (CUDA graphs bind their own buffers: IOBinding whatever ``io_binding`` says)
    if cuda_graphs and not buckets:
        raise ValueError(f"{GRAPHS_SETTING} needs batch buckets, and PROTONMF_BATCH_BUCKETS is off")
    if cuda_graphs and device == "cpu":
        raise ValueError(f"{GRAPHS_SETTING} runs on CUDA only, and the device is cpu")


def _graph_file(artifact_dir: Path, info: Manifest, variant: str) -> str:
    """The ONNX file of ``variant``: model.onnx for fp32, else the manifest's variant."""
    if MODEL_FILE not in info.files:
        raise ArtifactError(f"{artifact_dir} has no {MODEL_FILE}: re-run `protonmf convert`")
    if variant == "fp32":
        return MODEL_FILE
    if variant not in info.variants:
        raise ArtifactError(
            f"{artifact_dir} has no {variant!r} graph (has: fp32"
            f"{''.join(', ' + k for k in info.variants)}); see `protonmf variants`"
        )
    return info.variants[variant].file


def _session(path: Path, device, threads, spinning, cuda, cuda_graphs: bool):
    """``create_session``, with a CUDA graph's refusal said as what it is."""
    if cuda_graphs:
        cuda = {**(cuda or {}), "graphs": True}
    try:
        return create_session(path, device, threads, spinning, cuda)
    except Exception as e:  # noqa: BLE001
        # onnxruntime refuses enable_cuda_graph at session creation with exception
        # classes of its private module (pybind11's, deriving from Exception only)
        if not cuda_graphs or isinstance(e, ProviderError):
            raise
        raise ProviderError(
            f"onnxruntime could not create the session with {GRAPHS_SETTING} "
            f"on (a CUDA graph needs every node on the CUDA provider): {e}"
        ) from e
