"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` (KServe's
``grpc_predict_v2.proto``, vendored under protonmf/api/proto/inference) on the worker's grpc.aio
server, beside ``protonmf.v1``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer; ModelInfer
is the REST ``/v2/models/{name}/infer`` (service/oip/rest.py) with the same tensor layer
(``OipModel``) over the same engine and batcher. Inputs come as typed ``contents`` or as
``raw_input_contents`` (one per input, in order, as Triton's clients send them); outputs are
answered the same way the inputs came (raw → ``raw_output_contents``). Parameters
(``top_k``, ``heatmaps``, ``map_kind``, ``box_percentile``, ``interventions``) are request
or ``explanation`` output parameters. Typed errors → their gRPC codes; malformed request
bytes → INVALID_ARGUMENT (the lenient deserializers of service/grpc/calls.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from protonmf import __version__ as PROTONMF_VERSION
from protonmf.api.proto.inference import grpc_predict_v2_pb2 as pb
from protonmf.service.grpc.calls import guarded, register_unary
from protonmf.service.oip.rest import (
    EXTENSIONS,
    MODEL_VERSION,
    NP_OF,
    InputTensor,
    OipModel,
    OutputTensor,
    check_datatype,
    check_shape,
    element_count,
    from_raw,
    to_raw,
)
from protonmf.service.ops.errors import InvalidInput, NotReady

__all__ = ["SERVICE_NAME", "OipServicer", "add_oip_servicer", "pb"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# datatype → the InferTensorContents field that carries it
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _params(mapping) -> dict:
    """map<string, InferParameter> → plain values."""
    out = {}
    for key, p in mapping.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def _input(t, raw: bytes | None) -> InputTensor:
    datatype = check_datatype(t.name, t.datatype)
    shape = check_shape(t.name, list(t.shape))
    if raw is not None:
        return from_raw(t.name, datatype, shape, raw)
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input {t.name!r}: {datatype} has no typed contents; send raw_input_contents",
            "bad_tensor",
        )
    values = getattr(t.contents, field)
    if len(values) != element_count(shape):
        raise InvalidInput(
            f"input {t.name!r}: {len(values)} elements for shape {shape}", "bad_tensor"
        )
    if datatype == "BYTES":
        return InputTensor(t.name, datatype, shape, list(values))
    dtype = NP_OF[datatype]
    arr = np.asarray(values)
    if np.issubdtype(dtype, np.integer) and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(
                f"input {t.name!r}: values out of range for {datatype}", "bad_tensor"
            )
    return InputTensor(t.name, datatype, shape, arr.astype(dtype).reshape(shape))


def _output(t: OutputTensor, raw: bool):
    out = pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
    if not raw:
        values = t.data if t.datatype == "BYTES" else np.asarray(t.data).ravel().tolist()
        getattr(out.contents, CONTENTS[t.datatype]).extend(values)
    return out


class OipServicer:
    """The GRPCInferenceService RPCs over ``get_engine()`` (a Engine, or None)."""

    def __init__(self, get_engine: Callable[[], object | None], model_name: str = "protonmf"):
        self.get_engine = get_engine
        self.model_name = model_name
        self._model: OipModel | None = None

    def _plane(self):
        return self.get_engine()

    def model(self) -> OipModel:
        engine = self._plane()
        if engine is None:
            raise NotReady("the model is not loaded yet; retry shortly", "not_ready")
        if self._model is None or self._model.engine is not engine:
            self._model = OipModel(engine, self.model_name)
        return self._model

    async def _guarded(self, context, work):
        return await guarded(context, work)

    def _ready(self) -> bool:
        engine = self._plane()
        return bool(engine is not None and engine.ready)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        async def work():
            self.model().check_name(request.name, request.version)
            return pb.ModelReadyResponse(ready=self._ready())

        return await self._guarded(context, work())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=self.model_name, version=PROTONMF_VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        async def work():
            m = self.model()
            m.check_name(request.name, request.version)
            meta = m.metadata()
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        return await self._guarded(context, work())

    async def ModelInfer(self, request, context):
        async def work():
            m = self.model()
            m.check_name(request.model_name, request.model_version)
            raw = bool(request.raw_input_contents)
            if raw and len(request.raw_input_contents) != len(request.inputs):
                raise InvalidInput(
                    f"{len(request.raw_input_contents)} raw_input_contents for "
                    f"{len(request.inputs)} inputs",
                    "bad_tensor",
                )
            inputs = [
                _input(t, request.raw_input_contents[i] if raw else None)
                for i, t in enumerate(request.inputs)
            ]
            outputs = [(o.name, _params(o.parameters)) for o in request.outputs] or None
            tensors = await m.infer(inputs, outputs, _params(request.parameters))
            # raw in, raw out; FP16 has no typed field, and raw is for all outputs or none
            raw_out = raw or any(t.datatype not in CONTENTS for t in tensors)
            response = pb.ModelInferResponse(
                model_name=m.name,
                model_version=MODEL_VERSION,
                id=request.id,
                outputs=[_output(t, raw_out) for t in tensors],
            )
            if raw_out:
                response.raw_output_contents.extend(to_raw(t) for t in tensors)
            return response

        return await self._guarded(context, work())


def add_oip_servicer(
    server, get_engine: Callable[[], object | None], model_name: str = "protonmf"
) -> OipServicer:
    """Register ``inference.GRPCInferenceService`` on the grpc.aio ``server`` (before it
    starts), with lenient deserializers: malformed request bytes are INVALID_ARGUMENT."""
    servicer = OipServicer(get_engine, model_name)
    register_unary(server, pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], servicer, pb)
    return servicer
