"""Open Inference Protocol v2 (KServe v2 / Triton) over the engine: REST, and the
transport-free tensor layer the gRPC twin (oip/grpc.py) shares.

Mounted under ``/v2`` (``bentoml.mount_asgi_app`` / ``@bentoml.asgi_app(app, path="/v2")``):
every route below is relative to the mount, so the app itself answers

    GET  /health/live, /health/ready              liveness, readiness (200 / 503)
    GET  /                                        server metadata (``GET /v2``, see V2Root)
    GET  /models/{name}[/versions/{v}]            model metadata: every input and output
    GET  /models/{name}[/versions/{v}]/ready      model readiness
    POST /models/{name}[/versions/{v}]/infer      inference

Inputs (exactly one per request): ``images`` BYTES [N] (encoded JPEG/PNG/WebP: base64
strings in JSON, raw in the binary tensor extension), ``crops`` UINT8 [N, H, W(, C)] (the
model's crop, ``Model.crop_shape``), or the graph input (``image``) FP32 [N, C, H, W]
normalised, which must be a normalised uint8 crop (it is mapped back to one and runs
through the same batcher). Outputs: ``logits`` by default; any graph output of the manifest
(``scores``, ``contributions``, ``pooled``, ``maps``, ``topk_*``…, and ``bias``) and
``explanation`` (BYTES, one JSON document per image: the REST ``/explain`` entry) on
request. Everything runs through the ``Engine``'s steps, as REST and gRPC do: ``decode``
(its threads or decode processes), ``infer`` (its batcher), ``explain_outputs``; typed errors keep their status codes in the
protocol's ``{"error": "..."}`` body. docs/oip.md has the details and examples.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from protonmf import __version__ as PROTONMF_VERSION
from protonmf.artifact import normalize
from protonmf.graph import NUMPY_TYPES
from protonmf.service.engine.options import ExplainOptions, Intervention
from protonmf.service.ops.errors import InvalidInput, NotReady, PayloadTooLarge, ServiceError
from protonmf.service.rest.responses import error_response, json_response

__all__ = ["MODEL_VERSION", "ModelNotFound", "OipModel", "V2Root", "build_app"]

MODEL_VERSION = "1"  # the only version served; /versions/{v} must name it
EXPLANATION = "explanation"
IMAGES, CROPS = "images", "crops"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"

# OIP datatype ↔ numpy
NP_OF = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPE_OF = {np.dtype(t): name for name, t in NP_OF.items()}
ORT_TYPES = {ort: DATATYPE_OF[np.dtype(t)] for ort, t in NUMPY_TYPES.items()}


class ModelNotFound(ServiceError):
    status = 404
    grpc_code = "NOT_FOUND"
    reason = "model_not_found"


@dataclass
class InputTensor:
    """One request input, decoded: ``data`` is a numpy array, or a list of bytes (BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: dict = field(default_factory=dict)


# --- tensor encoding shared by both transports ----------------------------------------------


def element_count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def check_shape(name: str, shape) -> list[int]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape
    ):
        raise InvalidInput(
            f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}",
            "bad_shape",
        )
    return list(shape)


def decode_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    """The binary BYTES serialisation: each element a 4-byte little-endian length + bytes."""
    out, i, n = [], 0, len(raw)
    while i < n:
        if i + 4 > n:
            raise InvalidInput(f"input {name!r}: truncated BYTES element length", "bad_tensor")
        (size,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + size > n:
            raise InvalidInput(f"input {name!r}: BYTES element overruns the data", "bad_tensor")
        out.append(raw[i : i + size])
        i += size
    return out


def encode_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> InputTensor:
    """A tensor from its raw bytes (binary extension / gRPC ``raw_input_contents``)."""
    count = element_count(shape)
    if datatype == "BYTES":
        items = decode_bytes_elements(name, raw)
        if len(items) != count:
            raise InvalidInput(
                f"input {name!r}: {len(items)} BYTES elements for shape {shape}", "bad_tensor"
            )
        return InputTensor(name, datatype, shape, items)
    dtype = np.dtype(NP_OF[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes for {datatype} {shape} (expected "
            f"{count * dtype.itemsize})",
            "bad_tensor",
        )
    return InputTensor(name, datatype, shape, np.frombuffer(raw, dtype).reshape(shape))


def to_raw(t: OutputTensor) -> bytes:
    if t.datatype == "BYTES":
        return encode_bytes_elements(t.data)
    return np.ascontiguousarray(t.data, np.asarray(t.data).dtype.newbyteorder("<")).tobytes()


def check_datatype(name: str, datatype) -> str:
    if datatype != "BYTES" and datatype not in NP_OF:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}", "bad_datatype")
    return datatype


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    if all(not isinstance(x, list) for x in data):
        return data
    out: list = []
    for x in data:
        out.extend(_flatten(x))
    return out


def from_json(name: str, datatype: str, shape: list[int], data) -> InputTensor:
    """A tensor from the JSON ``data`` (flat or nested, row-major). BYTES elements are
    base64 strings (images are binary; JSON strings cannot carry them as they are)."""
    flat = _flatten(data)
    if len(flat) != element_count(shape):
        raise InvalidInput(f"input {name!r}: {len(flat)} elements for shape {shape}", "bad_tensor")
    if datatype == "BYTES":
        items = []
        for i, text in enumerate(flat):
            if not isinstance(text, str):
                raise InvalidInput(
                    f"input {name!r}[{i}]: BYTES elements in JSON are base64 strings", "bad_base64"
                )
            try:
                items.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError) as e:
                raise InvalidInput(
                    f"input {name!r}[{i}] is not valid base64: {e}", "bad_base64"
                ) from e
        return InputTensor(name, datatype, shape, items)
    if not all(isinstance(x, int | float) for x in flat):  # bool is an int: BOOL data
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers", "bad_tensor")
    dtype = NP_OF[datatype]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not all(float(x).is_integer() and info.min <= x <= info.max for x in flat):
            raise InvalidInput(f"input {name!r}: values out of range for {datatype}", "bad_tensor")
    return InputTensor(name, datatype, shape, np.asarray(flat, dtype).reshape(shape))


def to_json_data(t: OutputTensor) -> list:
    if t.datatype == "BYTES":
        return [b.decode() for b in t.data]  # explanation: JSON text (UTF-8)
    return np.asarray(t.data).ravel().tolist()


# --- parameters -----------------------------------------------------------------------------


def _int(params: dict, key: str, default: int) -> int:
    v = params.get(key, default)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidInput(f"parameter {key!r} must be an integer, got {v!r}", "bad_parameter")
    return v


def _bool(params: dict, key: str, default: bool) -> bool:
    v = params.get(key, default)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        v = v.lower() == "true"
    if not isinstance(v, bool):
        raise InvalidInput(f"parameter {key!r} must be a boolean, got {v!r}", "bad_parameter")
    return v


def _float(params: dict, key: str, default: float) -> float:
    v = params.get(key, default)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidInput(f"parameter {key!r} must be a number, got {v!r}", "bad_parameter")
    return float(v)


def _interventions(params: dict) -> tuple[Intervention, ...]:
    v = params.get("interventions")
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise InvalidInput(
                f"parameter 'interventions' is not JSON: {e}", "bad_parameter"
            ) from e
    if not isinstance(v, list) or not all(
        isinstance(x, dict)
        and set(x) == {"class", "prototype"}
        and isinstance(x["class"], str | int)
        and not isinstance(x["class"], bool)
        and isinstance(x["prototype"], int)
        and not isinstance(x["prototype"], bool)
        for x in v
    ):
        raise InvalidInput(
            "parameter 'interventions' must be a JSON list of {\"class\": name "
            'or index, "prototype": index}',
            "bad_parameter",
        )
    return tuple(Intervention(x["class"], x["prototype"]) for x in v)


def explain_options(params: dict) -> ExplainOptions:
    """The ``explanation`` output's options, as REST /explain's (the schema's defaults)."""
    d = ExplainOptions()
    return ExplainOptions(
        top_k=_int(params, "top_k", d.top_k),
        heatmaps=_bool(params, "heatmaps", d.heatmaps),
        box_percentile=_float(params, "box_percentile", d.box_percentile),
        map_kind=str(params.get("map_kind", d.map_kind)),
        interventions=_interventions(params),
    )


# --- the model, transport-free --------------------------------------------------------------


class OipModel:
    """The artifact as an OIP model: metadata and ``infer`` over one ``Engine``."""

    def __init__(self, engine, name: str = "protonmf"):
        self.engine = engine
        self.name = name
        core = engine.model
        self.core = core
        graph = core.manifest["graph"]
        self.graph_input = graph["input"]["name"]
        self.graph_outputs = set(graph["outputs"])
        ort_types = {o.name: o.type for o in core.graph.session.get_outputs()}
        self.outputs: dict[str, tuple[str, list[int]]] = {}
        for out_name, shape in core.graph.output_shapes.items():
            if out_name in ort_types:
                datatype = ORT_TYPES.get(ort_types[out_name], "FP32")
            else:  # bias of an all-scores graph, from the tensors (protonmf.graph.GraphSession.run)
                datatype = DATATYPE_OF.get(core.tensors["bias"].dtype, "FP32")
            self.outputs[out_name] = (
                datatype,
                [-1 if isinstance(d, str) else int(d) for d in shape],
            )
        self.outputs[EXPLANATION] = ("BYTES", [-1])
        c = core.spec.channels
        self.inputs = {
            IMAGES: ("BYTES", [-1]),
            CROPS: ("UINT8", [-1, *core.crop_shape]),
            self.graph_input: ("FP32", [-1, c, core.spec.height, core.spec.width]),
        }

    def check_name(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in (None, "", MODEL_VERSION):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} (versions: [{MODEL_VERSION!r}])"
            )

    def metadata(self) -> dict:
        def tensors(d):
            return [{"name": n, "datatype": dt, "shape": shape} for n, (dt, shape) in d.items()]

        return {
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime",
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
        }

    # -- inference --

    async def _crops(self, t: InputTensor) -> list[np.ndarray]:
        core = self.core
        expected = self.inputs.get(t.name)
        if expected is None:
            raise InvalidInput(
                f"unknown input {t.name!r}; inputs: {list(self.inputs)}", "unknown_input"
            )
        if t.datatype != expected[0]:
            raise InvalidInput(
                f"input {t.name!r} is {expected[0]}, got {t.datatype}", "bad_datatype"
            )
        if t.name == IMAGES:
            if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
                raise InvalidInput(
                    f"input 'images' has shape [N] (or [N, 1]), got {t.shape}", "bad_shape"
                )
            return await self.engine.decode(list(t.data))
        n = t.shape[0] if t.shape else 0
        want = expected[1][1:]
        shape = list(t.shape[1:])
        if t.name == CROPS and len(want) == 2 and shape == [*want, 1]:
            shape = want  # a grey crop with its channel axis
        if len(t.shape) < 1 or shape != want:
            raise InvalidInput(
                f"input {t.name!r} has shape [N, {', '.join(map(str, want))}], got {t.shape}",
                "bad_shape",
            )
        core.check_request(n)
        data = np.asarray(t.data).reshape(n, *want)
        if t.name == CROPS:
            return list(np.ascontiguousarray(data, np.uint8).reshape(n, *core.crop_shape))
        return list(self._quantise(data.astype(np.float32, copy=False)))

    def _quantise(self, x: np.ndarray) -> np.ndarray:
        """Normalised FP32 (N, c, h, w) → the uint8 crops it encodes; InvalidInput unless it
        is one (to within a hundredth of a grey level): the batcher runs uint8 crops."""
        spec = self.core.spec
        mean = np.asarray(spec.mean, np.float64)[:, None, None]
        std = np.asarray(spec.std, np.float64)[:, None, None]
        levels = (x.astype(np.float64) * std + mean) * 255.0
        u = np.clip(np.rint(levels), 0, 255)
        if not np.all(np.isfinite(levels)) or np.abs(levels - u).max(initial=0) > 0.01:
            raise InvalidInput(
                f"input {self.graph_input!r} must be a normalised uint8 crop "
                "((x / 255 - mean) / std, the manifest's preprocessing); send "
                "'crops' or 'images' otherwise",
                "not_a_crop",
            )
        u = u.astype(np.uint8)
        crops = u[:, 0] if spec.channels == 1 else u.transpose(0, 2, 3, 1)
        if not np.allclose(normalize(crops, spec), x, rtol=0, atol=1e-4):
            raise InvalidInput(
                f"input {self.graph_input!r} is not a normalised uint8 crop", "not_a_crop"
            )
        return np.ascontiguousarray(crops)

    async def infer(
        self, inputs: list[InputTensor], outputs: list[tuple[str, dict]] | None, parameters: dict
    ) -> list[OutputTensor]:
        """``outputs``: (name, parameters) of those asked for (None: ``logits``)."""
        if not self.engine.ready:
            raise NotReady("the model is warming up; retry shortly", "not_ready")
        if len(inputs) != 1:
            raise InvalidInput(
                f"send exactly one input (one of {list(self.inputs)}), got {len(inputs)}",
                "one_input",
            )
        requested = outputs if outputs else [("logits", {})]
        names = [n for n, _ in requested]
        for n in names:
            if n not in self.outputs:
                raise InvalidInput(
                    f"unknown output {n!r}; outputs: {list(self.outputs)}", "unknown_output"
                )
        if len(set(names)) != len(names):
            raise InvalidInput("an output is asked for twice", "duplicate_output")
        core = self.core
        options = None
        wanted = {"logits"}
        for n, params in requested:
            if n == EXPLANATION:
                options = explain_options({**parameters, **params})
                core.check_request(1, options)
                wanted |= core.outputs_for(options.map_kind if options.heatmaps else None)
            elif n == "bias" and n not in self.graph_outputs:
                wanted |= {"scores"}  # protonmf.graph.GraphSession.run adds bias beside scores
            else:
                wanted.add(n)
        crops = await self._crops(inputs[0])
        if options is not None:
            core.check_request(len(crops), options)
        outs = await self.engine.infer(crops, frozenset(wanted))
        result = []
        for n, _ in requested:
            if n == EXPLANATION:
                docs = [
                    orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY)
                    for e in self.engine.explain_outputs(outs, options)
                ]
                result.append(OutputTensor(n, "BYTES", [len(docs)], docs))
            else:
                arr = np.stack([o[n] for o in outs])
                datatype = DATATYPE_OF.get(arr.dtype, self.outputs[n][0])
                result.append(OutputTensor(n, datatype, list(arr.shape), arr))
        return result


# --- REST -----------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes; the limit is {limit}", "body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_infer_request(
    body: bytes, header_length: str | None
) -> tuple[list[InputTensor], list[tuple[str, dict]] | None, dict, dict, object]:
    """HTTP/JSON (and binary tensor extension) request → inputs, outputs (name, parameters;
    None if not given), request parameters, per-output "binary_data" wishes, and its id."""
    head, binary = _split_body(body, header_length)
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"the request is not JSON: {e}", "bad_json") from e
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidInput("the request must be a JSON object with an 'inputs' list", "bad_request")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object", "bad_request")
    inputs = _inputs(request["inputs"], binary)
    outputs, binary_wish = _outputs(request.get("outputs"))
    return inputs, outputs, params, binary_wish, request.get("id")


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it (the binary extension)."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidInput(
            "Inference-Header-Content-Length must be the JSON header's size in bytes",
            "bad_header_length",
        )
    return body[: int(header_length)], memoryview(body)[int(header_length) :]


def _inputs(items: list, binary: memoryview) -> list[InputTensor]:
    """The request's input tensors: JSON ``data`` or their slice of the binary data."""
    inputs, offset = [], 0
    for i, t in enumerate(items):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidInput(f"inputs[{i}] must be an object with a name", "bad_request")
        name = t["name"]
        datatype = check_datatype(name, t.get("datatype"))
        shape = check_shape(name, t.get("shape"))
        tparams = t.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if (
                isinstance(size, bool)
                or not isinstance(size, int)
                or not 0 <= size <= len(binary) - offset
            ):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} does not fit the "
                    "binary data after the JSON header",
                    "bad_tensor",
                )
            inputs.append(from_raw(name, datatype, shape, bytes(binary[offset : offset + size])))
            offset += size
        elif "data" in t:
            inputs.append(from_json(name, datatype, shape, t["data"]))
        else:
            raise InvalidInput(
                f"input {name!r} has neither data nor binary_data_size", "bad_tensor"
            )
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data belong to no input", "bad_tensor"
        )
    return inputs


def _outputs(items) -> tuple[list[tuple[str, dict]] | None, dict]:
    """The outputs asked for (None: not said) and their "binary_data" wishes."""
    if items is None:
        return None, {}
    if not isinstance(items, list):
        raise InvalidInput("'outputs' must be a list", "bad_request")
    outputs, binary_wish = [], {}
    for i, o in enumerate(items):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a name", "bad_request")
        oparams = o.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise InvalidInput(f"outputs[{i}].parameters must be an object", "bad_request")
        if "binary_data" in oparams:
            binary_wish[o["name"]] = _bool(oparams, "binary_data", False)
        outputs.append((o["name"], oparams))
    return outputs, binary_wish


def infer_response(
    model: OipModel, tensors: list[OutputTensor], request_id, binary: dict, default_binary: bool
) -> Response:
    outputs, chunks = [], []
    for t in tensors:
        entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary.get(t.name, default_binary):
            raw = to_raw(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json_data(t)
        outputs.append(entry)
    body = {"model_name": model.name, "model_version": MODEL_VERSION, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    head = orjson.dumps(body)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


class V2Root:
    """ASGI middleware: ``GET /v2`` (server metadata; tritonclient asks for exactly that) to
    the mounted app's ``/``. Starlette's ``Mount("/v2")`` matches ``/v2/…`` only and would
    answer ``/v2`` with a 307 to ``/v2/``, which Triton's clients do not follow.
    Add it with ``Service.add_asgi_middleware(V2Root)`` (``path``: the mount's path)."""

    def __init__(self, app, path: str = "/v2"):
        self.app, self.path = app, path.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == self.path:
            scope = {**scope, "path": self.path + "/", "raw_path": (self.path + "/").encode()}
        await self.app(scope, receive, send)


class _Routes:
    """The v2 REST routes over the worker's engine (``get_engine()``; None: not loaded)."""

    def __init__(self, get_engine, model_name: str, max_body_bytes: int | None):
        self.get_engine, self.model_name, self.max_body_bytes = (
            get_engine,
            model_name,
            max_body_bytes,
        )
        self._models: dict[int, OipModel] = {}

    def model(self) -> OipModel:
        engine = self.get_engine()
        if engine is None:
            raise NotReady("the model is not loaded yet; retry shortly", "not_ready")
        m = self._models.get(id(engine))
        if m is None or m.engine is not engine:
            self._models.clear()
            m = self._models[id(engine)] = OipModel(engine, self.model_name)
        return m

    def named(self, request: Request) -> OipModel:
        m = self.model()
        m.check_name(request.path_params["name"], request.path_params.get("version"))
        return m

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        try:
            ok = self.model().engine.ready
        except ServiceError:
            ok = False
        return json_response({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        body = {"name": self.model_name, "version": PROTONMF_VERSION, "extensions": EXTENSIONS}
        return json_response(body)

    async def model_metadata(self, request: Request) -> Response:
        return json_response(self.named(request).metadata())

    async def model_ready(self, request: Request) -> Response:
        m = self.named(request)
        ok = bool(m.engine.ready)
        return json_response({"name": m.name, "ready": ok}, 200 if ok else 503)

    async def infer(self, request: Request) -> Response:
        m = self.named(request)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise InvalidInput(
                "compressed request bodies are not supported", "unsupported_encoding"
            )
        limit = self.max_body_bytes or m.engine.settings.body_bytes()
        body = await _read_body(request, limit)
        inputs, outputs, params, binary, request_id = parse_infer_request(
            body, request.headers.get(HEADER_LENGTH)
        )
        default_binary = _bool(params, "binary_data_output", False)
        tensors = await m.infer(inputs, outputs, params)
        return infer_response(m, tensors, request_id, binary, default_binary)


def _handled(func):
    """``func``'s answer; a typed error as its response; 499 for a client gone."""

    async def endpoint(request: Request) -> Response:
        try:
            return await func(request)
        except ServiceError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=499)

    return endpoint


def build_app(
    get_engine: Callable[[], object | None],
    model_name: str = "protonmf",
    max_body_bytes: int | None = None,
) -> Starlette:
    """The OIP v2 REST app, routes relative to its mount (``/v2``). ``get_engine``: the
    worker's Engine, or None while there is none (everything but liveness answers 503).
    ``max_body_bytes``: default the engine's ``settings.body_bytes()`` (the RequestGuard's
    limit for the service's own endpoints does not reach mounted apps)."""
    r = _Routes(get_engine, model_name, max_body_bytes)
    routes = [
        Route("/health/live", _handled(r.live), methods=["GET"]),
        Route("/health/ready", _handled(r.ready), methods=["GET"]),
        Route("/", _handled(r.server_metadata), methods=["GET"]),
    ]
    for base in ("/models/{name}", "/models/{name}/versions/{version}"):
        routes += [
            Route(base, _handled(r.model_metadata), methods=["GET"]),
            Route(base + "/ready", _handled(r.model_ready), methods=["GET"]),
            Route(base + "/infer", _handled(r.infer), methods=["POST"]),
        ]
    return Starlette(routes=routes)
