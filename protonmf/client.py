"""Clients for both transports of a ProtoNMF service, sync and async, returning the typed
response models of protonmf.api.schemas.

    from protonmf.client import GrpcClient, RestClient
    with RestClient("http://127.0.0.1:3000") as c:        # or GrpcClient("127.0.0.1:50051"),
                                                          # channels=N to reach N workers
        r = c.explain([open("cat.jpg", "rb").read()], top_k=3,
                      interventions=[{"class": "tabby", "prototype": 0}])
        r.explanations[0].top_k[0].class_name             # ExplainResponse

    async with AsyncRestClient(url) as c: ...             # AsyncGrpcClient(target) likewise
        r = await c.classify(images)

Methods (the same on all four): ``classify``, ``explain``, ``model``, ``prototypes`` return
ClassifyResponse, ExplainResponse, ModelInfo, PrototypesResponse; ``prototype_image`` and
``overlay`` (REST only: protonmf.v1 has no Overlay RPC) return PNG bytes. Requests are
built from the request models (ExplainRequest, ...), so arguments are checked before
anything is sent; gRPC answers are read back into the same models as REST's
(protonmf.api.protomap).

Failures raise ``RequestFailed`` with the REST status or gRPC code name, the message and
the service's reason (``too_large``, ``unsupported_media_type``, ...). Needs httpx (REST)
or grpcio (gRPC); never BentoML or onnxruntime.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protonmf.api import protomap
from protonmf.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    ExplainRequest,
    ExplainResponse,
    InterventionIn,
    ModelInfo,
    OverlayRequest,
    PrototypeImageRequest,
    PrototypesRequest,
    PrototypesResponse,
    default_of,
)

__all__ = [
    "AsyncGrpcClient",
    "AsyncRestClient",
    "GrpcClient",
    "RequestFailed",
    "RestClient",
    "grpc_channel_options",
]

M = TypeVar("M", bound=BaseModel)
_REASON = re.compile(r"\[([a-z_]+)\]\s*$")
_JSON = {"content-type": "application/json"}
# request fields that are not gRPC request fields (images travel as bytes there)
_NOT_IN_MESSAGE = {"images", "images_base64"}
# the request defaults, declared once on the schema's models
CLASSIFY_TOP_K = default_of(ClassifyRequest, "top_k")
TOP_K, HEATMAPS = default_of(ExplainRequest, "top_k"), default_of(ExplainRequest, "heatmaps")
PERCENTILE, MAP_KIND = (
    default_of(ExplainRequest, "box_percentile"),
    default_of(ExplainRequest, "map_kind"),
)
OVERLAY_MAP_KIND = default_of(OverlayRequest, "map_kind")
EXEMPLAR_KIND = default_of(PrototypeImageRequest, "kind")


class RequestFailed(Exception):
    """A request the service refused or failed: ``code`` is the HTTP status (int) or the
    gRPC status code's name (str); ``reason`` the service's machine-readable reason (from
    the REST error body, or the ``[reason]`` a message ends with), None if it gave none;
    ``retry_after`` seconds, where the service said (503 overloaded)."""

    def __init__(
        self,
        code: int | str,
        message: str,
        reason: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        if reason is None:
            match = _REASON.search(message)
            reason = match.group(1) if match else None
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def from_http(cls, status: int, content: bytes, headers: Mapping[str, str]) -> RequestFailed:
        """From a REST error answer: ErrorBody {error, reason, status}; else BentoML's
        {"error": ...} or plain text."""
        retry = _seconds(headers.get("retry-after"))
        try:
            body = ErrorBody.model_validate_json(content)
            return cls(status, body.error, body.reason, retry)
        except ValidationError:
            pass
        text = content.decode("utf-8", "replace")
        try:
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                return cls(status, data["error"], data.get("reason"), retry)
        except ValueError:
            pass
        return cls(status, text, None, retry)

    @classmethod
    def from_grpc(cls, error) -> RequestFailed:
        """From a grpc.RpcError (grpc.aio.AioRpcError included)."""
        trailing = getattr(error, "trailing_metadata", lambda: None)() or ()
        retry = next((_seconds(v) for k, v in trailing if k == "retry-after"), None)
        return cls(error.code().name, error.details() or "", None, retry)


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _b64(images: Sequence[bytes]) -> list[str]:
    if isinstance(images, (bytes, bytearray, memoryview)):
        raise TypeError("images: a sequence of encoded images (bytes), not one bytes object")
    return [base64.b64encode(b).decode("ascii") for b in images]


def _interventions(items: Sequence[Mapping | InterventionIn]) -> list[InterventionIn]:
    return [i if isinstance(i, InterventionIn) else InterventionIn.model_validate(i) for i in items]


# --- requests, once for all four clients ------------------------------------------------


def _classify(top_k) -> ClassifyRequest:
    return ClassifyRequest(top_k=top_k)


def _explain(top_k, heatmaps, box_percentile, interventions, map_kind) -> ExplainRequest:
    return ExplainRequest(
        top_k=top_k,
        heatmaps=heatmaps,
        box_percentile=box_percentile,
        interventions=_interventions(interventions),
        map_kind=map_kind,
    )


def _prototypes(classes) -> PrototypesRequest:
    if isinstance(classes, (str, int)):
        classes = [classes]
    return PrototypesRequest(classes=list(classes))


def _prototype_image(class_name, prototype, kind) -> PrototypeImageRequest:
    return PrototypeImageRequest(class_name=class_name, prototype=prototype, kind=kind)


def _rest_body(request: BaseModel, images: Sequence[bytes] | None = None) -> bytes:
    """The JSON body: the request model's fields, images as base64 strings."""
    update = {"images_base64": _b64(images)} if images is not None else None
    if update:
        request = request.model_copy(update=update)
    return request.model_dump_json(by_alias=True, exclude={"images"}).encode()


def _grpc_request(request: BaseModel, message_class, images: Sequence[bytes] | None = None):
    """The gRPC request message: the request model's fields (class names and indices as
    strings, as the .proto has them), images as bytes."""
    body = request.model_dump(by_alias=True, exclude=_NOT_IN_MESSAGE)
    if "class" in body:
        body["class"] = str(body["class"])
    if "classes" in body:
        body["classes"] = [str(c) for c in body["classes"]]
    for item in body.get("interventions", ()):
        item["class"] = str(item["class"])
    message = protomap.to_message(body, message_class)
    if images is not None:
        if isinstance(images, (bytes, bytearray, memoryview)):
            raise TypeError("images: a sequence of encoded images (bytes), not one bytes object")
        message.images.extend(bytes(b) for b in images)
    return message


def _parse(model: type[M], message) -> M:
    return model.model_validate(protomap.from_message(message))


# --- REST ---------------------------------------------------------------------------------


class _RestBase:
    def _check(self, r) -> None:
        if r.status_code != 200:
            raise RequestFailed.from_http(r.status_code, r.content, r.headers)


class RestClient(_RestBase):
    """POSTs JSON to a ProtoNMF service's REST API (httpx)."""

    def __init__(self, url: str, timeout: float = 60.0, **httpx_options):
        import httpx

        self._http = httpx.Client(base_url=url, timeout=timeout, **httpx_options)

    def _post(self, path: str, content: bytes):
        r = self._http.post(path, content=content, headers=_JSON)
        self._check(r)
        return r

    def classify(self, images: Sequence[bytes], top_k: int = CLASSIFY_TOP_K) -> ClassifyResponse:
        r = self._post("/classify", _rest_body(_classify(top_k), images))
        return ClassifyResponse.model_validate_json(r.content)

    def explain(
        self,
        images: Sequence[bytes],
        top_k: int = TOP_K,
        heatmaps: bool = HEATMAPS,
        box_percentile: float = PERCENTILE,
        interventions: Sequence[Mapping] = (),
        map_kind: str = MAP_KIND,
    ) -> ExplainResponse:
        request = _explain(top_k, heatmaps, box_percentile, interventions, map_kind)
        r = self._post("/explain", _rest_body(request, images))
        return ExplainResponse.model_validate_json(r.content)

    def overlay(self, image: bytes, rank: int = 0, map_kind: str = OVERLAY_MAP_KIND) -> bytes:
        """PNG: the image under the rank-th class's maps."""
        request = OverlayRequest(rank=rank, map_kind=map_kind)
        return self._post("/overlay", _rest_body(request, [image])).content

    def model(self) -> ModelInfo:
        return ModelInfo.model_validate_json(self._post("/model", b"{}").content)

    def prototypes(self, classes: Sequence[str | int] = ()) -> PrototypesResponse:
        r = self._post("/prototypes", _rest_body(_prototypes(classes)))
        return PrototypesResponse.model_validate_json(r.content)

    def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = EXEMPLAR_KIND
    ) -> bytes:
        """PNG bytes of the prototype's exemplar strip."""
        request = _prototype_image(class_name, prototype, kind)
        return self._post("/prototype_image", _rest_body(request)).content

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRestClient(_RestBase):
    """RestClient's methods as coroutines (httpx.AsyncClient)."""

    def __init__(self, url: str, timeout: float = 60.0, **httpx_options):
        import httpx

        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, **httpx_options)

    async def _post(self, path: str, content: bytes):
        r = await self._http.post(path, content=content, headers=_JSON)
        self._check(r)
        return r

    async def classify(
        self, images: Sequence[bytes], top_k: int = CLASSIFY_TOP_K
    ) -> ClassifyResponse:
        r = await self._post("/classify", _rest_body(_classify(top_k), images))
        return ClassifyResponse.model_validate_json(r.content)

    async def explain(
        self,
        images: Sequence[bytes],
        top_k: int = TOP_K,
        heatmaps: bool = HEATMAPS,
        box_percentile: float = PERCENTILE,
        interventions: Sequence[Mapping] = (),
        map_kind: str = MAP_KIND,
    ) -> ExplainResponse:
        request = _explain(top_k, heatmaps, box_percentile, interventions, map_kind)
        r = await self._post("/explain", _rest_body(request, images))
        return ExplainResponse.model_validate_json(r.content)

    async def overlay(self, image: bytes, rank: int = 0, map_kind: str = OVERLAY_MAP_KIND) -> bytes:
        request = OverlayRequest(rank=rank, map_kind=map_kind)
        return (await self._post("/overlay", _rest_body(request, [image]))).content

    async def model(self) -> ModelInfo:
        return ModelInfo.model_validate_json((await self._post("/model", b"{}")).content)

    async def prototypes(self, classes: Sequence[str | int] = ()) -> PrototypesResponse:
        r = await self._post("/prototypes", _rest_body(_prototypes(classes)))
        return PrototypesResponse.model_validate_json(r.content)

    async def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = EXEMPLAR_KIND
    ) -> bytes:
        request = _prototype_image(class_name, prototype, kind)
        return (await self._post("/prototype_image", _rest_body(request))).content

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# --- gRPC ---------------------------------------------------------------------------------


def grpc_channel_options(max_message_bytes: int = 256 << 20, own_connection: bool = False):
    """Channel options; ``own_connection``: a TCP connection of the channel's own. gRPC
    otherwise shares one connection between channels to the same target, and the server's
    workers share their port with SO_REUSEPORT, which balances connections, not calls."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def _pb():
    from protonmf.api.proto.protonmf.v1 import protonmf_pb2, protonmf_pb2_grpc

    return protonmf_pb2, protonmf_pb2_grpc


class _GrpcBase:
    """``channels`` > 1: that many connections, calls spread round-robin over them — how
    one client reaches several server workers (one connection stays on one worker)."""

    def __init__(
        self,
        target: str,
        timeout: float = 60.0,
        max_message_bytes: int = 256 << 20,
        channels: int = 1,
    ):
        import grpc

        self._grpc = grpc
        self._open(self._channel_factory(grpc), target, timeout, max_message_bytes, channels)

    def _open(
        self, channel_factory, target: str, timeout: float, max_message_bytes: int, channels: int
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self._pb, pb_grpc = _pb()
        self.timeout = timeout
        options = grpc_channel_options(max_message_bytes, own_connection=channels > 1)
        self._channels = [channel_factory(target, options=options) for _ in range(channels)]
        self._stubs = [pb_grpc.ProtoNMFStub(c) for c in self._channels]
        self._next = itertools.count()  # next() on a count is atomic under the GIL

    @property
    def stub(self):
        return self._stubs[next(self._next) % len(self._stubs)]

    def _classify_message(self, images, top_k):
        return _grpc_request(_classify(top_k), self._pb.ClassifyRequest, images)

    def _explain_message(self, images, top_k, heatmaps, box_percentile, interventions, map_kind):
        request = _explain(top_k, heatmaps, box_percentile, interventions, map_kind)
        return _grpc_request(request, self._pb.ExplainRequest, images)

    def _prototypes_message(self, classes):
        return _grpc_request(_prototypes(classes), self._pb.PrototypesRequest)

    def _prototype_image_message(self, class_name, prototype, kind):
        return _grpc_request(
            _prototype_image(class_name, prototype, kind), self._pb.PrototypeImageRequest
        )

    @staticmethod
    def _no_overlay():
        return NotImplementedError("protonmf.v1 has no Overlay RPC: use RestClient.overlay")


class GrpcClient(_GrpcBase):
    """Calls a ProtoNMF service's gRPC API (protonmf.v1, grpcio)."""

    @staticmethod
    def _channel_factory(grpc):
        return grpc.insecure_channel

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise RequestFailed.from_grpc(e) from e

    def classify(self, images: Sequence[bytes], top_k: int = CLASSIFY_TOP_K) -> ClassifyResponse:
        r = self._call(self.stub.Classify, self._classify_message(images, top_k))
        return _parse(ClassifyResponse, r)

    def explain(
        self,
        images: Sequence[bytes],
        top_k: int = TOP_K,
        heatmaps: bool = HEATMAPS,
        box_percentile: float = PERCENTILE,
        interventions: Sequence[Mapping] = (),
        map_kind: str = MAP_KIND,
    ) -> ExplainResponse:
        request = self._explain_message(
            images, top_k, heatmaps, box_percentile, interventions, map_kind
        )
        return _parse(ExplainResponse, self._call(self.stub.Explain, request))

    def overlay(self, image: bytes, rank: int = 0, map_kind: str = OVERLAY_MAP_KIND) -> bytes:
        raise self._no_overlay()

    def model(self) -> ModelInfo:
        r = self._call(self.stub.ModelInfo, self._pb.ModelInfoRequest())
        return ModelInfo.model_validate(protomap.model_info_from_message(r))

    def prototypes(self, classes: Sequence[str | int] = ()) -> PrototypesResponse:
        r = self._call(self.stub.Prototypes, self._prototypes_message(classes))
        return _parse(PrototypesResponse, r)

    def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = EXEMPLAR_KIND
    ) -> bytes:
        """PNG bytes of the prototype's exemplar strip."""
        request = self._prototype_image_message(class_name, prototype, kind)
        return self._call(self.stub.PrototypeImage, request).png

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncGrpcClient(_GrpcBase):
    """GrpcClient's methods as coroutines (grpc.aio); create it inside the event loop it
    is used in."""

    @staticmethod
    def _channel_factory(grpc):
        import grpc.aio

        return grpc.aio.insecure_channel

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise RequestFailed.from_grpc(e) from e

    async def classify(
        self, images: Sequence[bytes], top_k: int = CLASSIFY_TOP_K
    ) -> ClassifyResponse:
        r = await self._call(self.stub.Classify, self._classify_message(images, top_k))
        return _parse(ClassifyResponse, r)

    async def explain(
        self,
        images: Sequence[bytes],
        top_k: int = TOP_K,
        heatmaps: bool = HEATMAPS,
        box_percentile: float = PERCENTILE,
        interventions: Sequence[Mapping] = (),
        map_kind: str = MAP_KIND,
    ) -> ExplainResponse:
        request = self._explain_message(
            images, top_k, heatmaps, box_percentile, interventions, map_kind
        )
        return _parse(ExplainResponse, await self._call(self.stub.Explain, request))

    async def overlay(self, image: bytes, rank: int = 0, map_kind: str = OVERLAY_MAP_KIND) -> bytes:
        raise self._no_overlay()

    async def model(self) -> ModelInfo:
        r = await self._call(self.stub.ModelInfo, self._pb.ModelInfoRequest())
        return ModelInfo.model_validate(protomap.model_info_from_message(r))

    async def prototypes(self, classes: Sequence[str | int] = ()) -> PrototypesResponse:
        r = await self._call(self.stub.Prototypes, self._prototypes_message(classes))
        return _parse(PrototypesResponse, r)

    async def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = EXEMPLAR_KIND
    ) -> bytes:
        request = self._prototype_image_message(class_name, prototype, kind)
        return (await self._call(self.stub.PrototypeImage, request)).png

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
