"""protonmf.client without a ProtoNMF server: the requests each client builds (REST through
httpx.MockTransport, gRPC through an in-process server with a fake servicer) and the typed
answers it reads back, the same over both transports and in sync and async clients."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import subprocess
import sys
from concurrent import futures

import grpc
import httpx
import pydantic
import pytest
from helpers import assert_same_body

from protonmf.api import protomap
from protonmf.api import schemas as S
from protonmf.api.proto.protonmf.v1 import protonmf_pb2 as pb
from protonmf.api.proto.protonmf.v1 import protonmf_pb2_grpc as pb_grpc
from protonmf.client import (
    AsyncGrpcClient,
    AsyncRestClient,
    GrpcClient,
    RequestFailed,
    RestClient,
    grpc_channel_options,
)

PNG = b"\x89PNG\r\n\x1a\n fake"
IMAGES = [b"\xff\xd8 first image", b"\x89PNG second image"]


def example(model: type[pydantic.BaseModel]) -> dict:
    return copy.deepcopy(model.model_json_schema()["example"])


BODIES = {
    "/classify": example(S.ClassifyResponse),
    "/explain": example(S.ExplainResponse),
    "/model": example(S.ModelInfo),
    "/prototypes": example(S.PrototypesResponse),
}


def test_import_pulls_in_neither_bentoml_nor_onnxruntime():
    code = (
        "import sys, protonmf.client; "
        "bad = {'bentoml', 'onnxruntime', 'torch', 'numpy', 'protonmf.service.engine'} "
        "& set(sys.modules); sys.exit(str(bad) if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


# --- REST -----------------------------------------------------------------------------------


class FakeRest:
    """An httpx transport answering like the service: BODIES as JSON, PNG for the images;
    ``fail`` (path → (status, body bytes, headers)) for errors. Keeps the requests."""

    def __init__(self, bodies=None, fail=None):
        self.bodies = bodies or BODIES
        self.fail = fail or {}
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path in self.fail:
            status, content, headers = self.fail[path]
            return httpx.Response(status, content=content, headers=headers)
        if path in ("/overlay", "/prototype_image"):
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return httpx.Response(
            200,
            content=json.dumps(self.bodies[path]).encode(),
            headers={"content-type": "application/json"},
        )

    def sent(self) -> tuple[str, dict]:
        r = self.requests[-1]
        assert r.method == "POST" and r.headers["content-type"] == "application/json"
        return r.url.path, json.loads(r.content)


B64 = [base64.b64encode(b).decode() for b in IMAGES]
# (call, the JSON body it must send, the model or bytes it returns)
REST_CALLS = [
    (
        lambda c: c.classify(IMAGES),
        "/classify",
        {"images_base64": B64, "top_k": 5},
        S.ClassifyResponse,
    ),
    (
        lambda c: c.classify(IMAGES, top_k=2),
        "/classify",
        {"images_base64": B64, "top_k": 2},
        S.ClassifyResponse,
    ),
    (
        lambda c: c.explain(IMAGES),
        "/explain",
        {
            "images_base64": B64,
            "top_k": 3,
            "heatmaps": True,
            "box_percentile": 90.0,
            "interventions": [],
            "map_kind": "similarity",
        },
        S.ExplainResponse,
    ),
    (
        lambda c: c.explain(
            IMAGES[:1],
            top_k=1,
            heatmaps=False,
            box_percentile=75,
            interventions=[
                {"class": "bag", "prototype": 1},
                S.InterventionIn(class_name=3, prototype=0),
            ],
            map_kind="contribution",
        ),
        "/explain",
        {
            "images_base64": B64[:1],
            "top_k": 1,
            "heatmaps": False,
            "box_percentile": 75.0,
            "interventions": [{"class": "bag", "prototype": 1}, {"class": 3, "prototype": 0}],
            "map_kind": "contribution",
        },
        S.ExplainResponse,
    ),
    (
        lambda c: c.overlay(IMAGES[0], rank=1),
        "/overlay",
        {"images_base64": B64[:1], "rank": 1, "map_kind": "contribution"},
        bytes,
    ),
    (lambda c: c.model(), "/model", {}, S.ModelInfo),
    (lambda c: c.prototypes(), "/prototypes", {"classes": []}, S.PrototypesResponse),
    (
        lambda c: c.prototypes(["bag", 3]),
        "/prototypes",
        {"classes": ["bag", 3]},
        S.PrototypesResponse,
    ),
    (
        lambda c: c.prototype_image("bag", 2, kind="nmf"),
        "/prototype_image",
        {"class": "bag", "prototype": 2, "kind": "nmf"},
        bytes,
    ),
]


def _check_rest_answer(result, path, returns, fake):
    if returns is bytes:
        assert result == PNG
    else:
        assert isinstance(result, returns)
        assert result.model_dump(mode="json", exclude_unset=True) == fake.bodies[path]


@pytest.mark.parametrize("call, path, body, returns", REST_CALLS)
def test_rest_client_requests_and_answers(call, path, body, returns):
    fake = FakeRest()
    with RestClient("http://protonmf.test", transport=fake.transport) as c:
        result = call(c)
    assert fake.sent() == (path, body)
    _check_rest_answer(result, path, returns, fake)


@pytest.mark.parametrize("call, path, body, returns", REST_CALLS)
def test_async_rest_client_requests_and_answers(call, path, body, returns):
    fake = FakeRest()

    async def main():
        async with AsyncRestClient("http://protonmf.test", transport=fake.transport) as c:
            return await call(c)

    result = asyncio.run(main())
    assert fake.sent() == (path, body)
    _check_rest_answer(result, path, returns, fake)


def test_rest_client_checks_arguments_before_sending():
    fake = FakeRest()
    with RestClient("http://protonmf.test", transport=fake.transport) as c:
        with pytest.raises(pydantic.ValidationError):
            c.explain(IMAGES, top_k=0)
        with pytest.raises(pydantic.ValidationError):
            c.explain(IMAGES, interventions=[{"class": "bag"}])  # no prototype
        with pytest.raises(pydantic.ValidationError):
            c.overlay(IMAGES[0], rank=-1)
        with pytest.raises(TypeError, match="sequence"):
            c.classify(IMAGES[0])  # one bytes object, not a list of images
    assert fake.requests == []


ERRORS = [
    # the service's ErrorBody
    (
        (
            422,
            json.dumps(
                {"error": "unknown class 'hat'", "reason": "unknown_class", "status": 422}
            ).encode(),
            {},
        ),
        (422, "unknown class 'hat'", "unknown_class", None),
    ),
    (
        (
            503,
            json.dumps({"error": "queue full", "reason": "overloaded", "status": 503}).encode(),
            {"Retry-After": "1"},
        ),
        (503, "queue full", "overloaded", 1.0),
    ),
    # BentoML's own error body, reason in the message
    (
        (400, json.dumps({"error": "bad [malformed_multipart]"}).encode(), {}),
        (400, "bad [malformed_multipart]", "malformed_multipart", None),
    ),
    # not JSON at all
    (
        (504, b"Not able to process the request in 60 seconds", {}),
        (504, "Not able to process the request in 60 seconds", None, None),
    ),
]


@pytest.mark.parametrize("answer, expected", ERRORS)
def test_rest_errors_raise_request_failed(answer, expected):
    fake = FakeRest(fail={"/explain": answer})
    with RestClient("http://protonmf.test", transport=fake.transport) as c:
        with pytest.raises(RequestFailed) as e:
            c.explain(IMAGES)
    assert (e.value.code, e.value.message, e.value.reason, e.value.retry_after) == expected

    async def main():
        async with AsyncRestClient("http://protonmf.test", transport=fake.transport) as c:
            await c.explain(IMAGES)

    with pytest.raises(RequestFailed) as e:
        asyncio.run(main())
    assert (e.value.code, e.value.message, e.value.reason, e.value.retry_after) == expected


def test_request_failed_reads_the_reason_off_a_message():
    e = RequestFailed("INVALID_ARGUMENT", "each image is over 8 MiB [too_large]")
    assert (e.code, e.reason, str(e)) == (
        "INVALID_ARGUMENT",
        "too_large",
        "INVALID_ARGUMENT: each image is over 8 MiB [too_large]",
    )
    assert RequestFailed(500, "no reason here").reason is None


# --- gRPC -----------------------------------------------------------------------------------


class FakeServicer(pb_grpc.ProtoNMFServicer):
    """Answers every RPC with BODIES turned into messages by protomap, keeps the requests;
    the class "missing" is INVALID_ARGUMENT, the class "busy" RESOURCE_EXHAUSTED."""

    def __init__(self, bodies):
        self.bodies = bodies
        self.requests = []

    def _keep(self, request, context):
        self.requests.append(request)
        names = [getattr(request, "class_name", "")] + list(getattr(request, "classes", []))
        if "missing" in names:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "unknown class 'missing' [unknown_class]"
            )
        if "busy" in names:
            context.set_trailing_metadata((("retry-after", "1"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full [overloaded]")

    def Classify(self, request, context):
        self._keep(request, context)
        return protomap.to_message(self.bodies["/classify"], pb.ClassifyResponse)

    def Explain(self, request, context):
        self._keep(request, context)
        return protomap.to_message(self.bodies["/explain"], pb.ExplainResponse)

    def ModelInfo(self, request, context):
        self._keep(request, context)
        return protomap.model_info_message(self.bodies["/model"], pb.ModelInfoResponse)

    def Prototypes(self, request, context):
        self._keep(request, context)
        return protomap.to_message(self.bodies["/prototypes"], pb.PrototypesResponse)

    def PrototypeImage(self, request, context):
        self._keep(request, context)
        return pb.PrototypeImageResponse(png=PNG)


class FakeGrpc:
    def __init__(self, bodies=None):
        self.servicer = FakeServicer(bodies or BODIES)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ProtoNMFServicer_to_server(self.servicer, self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(None)


@pytest.fixture(scope="module")
def fake_grpc():
    with FakeGrpc() as f:
        yield f


# (call, the request message it must send, the model or bytes it returns)
GRPC_CALLS = [
    (
        lambda c: c.classify(IMAGES),
        pb.ClassifyRequest(images=IMAGES, top_k=5),
        S.ClassifyResponse,
        "/classify",
    ),
    (
        lambda c: c.explain(IMAGES),
        pb.ExplainRequest(
            images=IMAGES, top_k=3, heatmaps=True, box_percentile=90.0, map_kind="similarity"
        ),
        S.ExplainResponse,
        "/explain",
    ),
    (
        lambda c: c.explain(
            IMAGES[:1],
            top_k=1,
            heatmaps=False,
            box_percentile=75,
            interventions=[{"class": "bag", "prototype": 1}, {"class": 3, "prototype": 0}],
            map_kind="contribution",
        ),
        pb.ExplainRequest(
            images=IMAGES[:1],
            top_k=1,
            heatmaps=False,
            box_percentile=75.0,
            map_kind="contribution",
            interventions=[
                pb.Intervention(class_name="bag", prototype=1),
                pb.Intervention(class_name="3", prototype=0),
            ],
        ),
        S.ExplainResponse,
        "/explain",
    ),
    (lambda c: c.model(), pb.ModelInfoRequest(), S.ModelInfo, "/model"),
    (lambda c: c.prototypes(), pb.PrototypesRequest(), S.PrototypesResponse, "/prototypes"),
    (
        lambda c: c.prototypes(["bag", 3]),
        pb.PrototypesRequest(classes=["bag", "3"]),
        S.PrototypesResponse,
        "/prototypes",
    ),
    (
        lambda c: c.prototype_image(4, 2, kind="nmf"),
        pb.PrototypeImageRequest(class_name="4", prototype=2, kind="nmf"),
        bytes,
        None,
    ),
]


def _check_grpc_answer(result, returns, path, bodies):
    if returns is bytes:
        assert result == PNG
    else:
        assert isinstance(result, returns)
        # the same model as REST's answer of the same body
        assert result == returns.model_validate(bodies[path])


@pytest.mark.parametrize("call, message, returns, path", GRPC_CALLS)
def test_grpc_client_requests_and_answers(fake_grpc, call, message, returns, path):
    with GrpcClient(fake_grpc.target, timeout=10) as c:
        result = call(c)
    sent = fake_grpc.servicer.requests[-1]
    assert sent == message
    # optional fields set explicitly, as the server reads them with HasField
    for field in ("top_k", "heatmaps", "box_percentile", "map_kind", "kind"):
        if field in message.DESCRIPTOR.fields_by_name:
            assert sent.HasField(field)
    _check_grpc_answer(result, returns, path, BODIES)


@pytest.mark.parametrize("call, message, returns, path", GRPC_CALLS)
def test_async_grpc_client_requests_and_answers(fake_grpc, call, message, returns, path):
    async def main():
        async with AsyncGrpcClient(fake_grpc.target, timeout=10) as c:
            return await call(c)

    result = asyncio.run(main())
    assert fake_grpc.servicer.requests[-1] == message
    _check_grpc_answer(result, returns, path, BODIES)


def test_grpc_errors_raise_request_failed(fake_grpc):
    async def main(name):
        async with AsyncGrpcClient(fake_grpc.target, timeout=10) as c:
            await c.prototype_image(name, 0)

    with GrpcClient(fake_grpc.target, timeout=10) as c:
        for call in (
            lambda: c.prototype_image("missing", 0),
            lambda: c.prototypes(["missing"]),
            lambda: asyncio.run(main("missing")),
        ):
            with pytest.raises(RequestFailed) as e:
                call()
            assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "unknown_class")
            assert e.value.message == "unknown class 'missing' [unknown_class]"
        for call in (lambda: c.prototypes(["busy"]), lambda: asyncio.run(main("busy"))):
            with pytest.raises(RequestFailed) as e:
                call()
            assert (e.value.code, e.value.reason, e.value.retry_after) == (
                "RESOURCE_EXHAUSTED",
                "overloaded",
                1.0,
            )


def test_grpc_client_channels_and_overlay(fake_grpc):
    with pytest.raises(ValueError, match="channels"):
        GrpcClient(fake_grpc.target, channels=0)
    with GrpcClient(fake_grpc.target, timeout=10, channels=3) as c:
        assert len({id(c.stub) for _ in range(6)}) == 3  # round-robin over 3 stubs
        assert (
            c.classify(IMAGES).predictions
            == S.ClassifyResponse.model_validate(BODIES["/classify"]).predictions
        )
        with pytest.raises(NotImplementedError, match="Overlay"):
            c.overlay(IMAGES[0])
    assert ("grpc.use_local_subchannel_pool", 1) in grpc_channel_options(own_connection=True)
    assert ("grpc.use_local_subchannel_pool", 1) not in grpc_channel_options()


def test_grpc_client_checks_arguments_before_sending(fake_grpc):
    before = len(fake_grpc.servicer.requests)
    with GrpcClient(fake_grpc.target, timeout=10) as c:
        with pytest.raises(pydantic.ValidationError):
            c.classify(IMAGES, top_k=0)
        with pytest.raises(TypeError, match="sequence"):
            c.explain(IMAGES[0])
    assert len(fake_grpc.servicer.requests) == before


# --- real bodies: both transports, the same answer --------------------------------------------


@pytest.fixture(scope="module")
def real_bodies(core_all) -> dict:
    """The core's bodies for two Fashion images: top-3 explanations with heatmaps and an
    intervention, top-5 classes, every prototype, the model."""
    from helpers import FASHION_DATA, run_images

    from protonmf.service.engine.options import ExplainOptions, Intervention

    engine = core_all
    blobs = [next((FASHION_DATA / "test" / c).glob("*.png")).read_bytes() for c in ("bag", "coat")]
    outs = run_images(engine, blobs)
    options = ExplainOptions(top_k=3, interventions=(Intervention("bag", 0),))
    return {
        "/classify": {"predictions": [engine.explanations.classification(o, 5) for o in outs]},
        "/explain": {
            "explanations": [engine.explanations.explanation(o, options) for o in outs],
            "provider": engine.model.graph.provider,
        },
        "/model": engine.model_info(),
        "/prototypes": engine.listings.prototypes(),
    }


def test_both_transports_answer_the_same_models(real_bodies):
    """REST (the orjson-encoded body, as the service sends it) and gRPC (the message the
    servicer builds with protomap) give the client the same typed answers."""
    import orjson

    encoded = {
        k: orjson.loads(orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY))
        for k, v in real_bodies.items()
    }
    fake = FakeRest(bodies=encoded)
    with (
        FakeGrpc(real_bodies) as server,
        RestClient("http://protonmf.test", transport=fake.transport) as rest,
        GrpcClient(server.target, timeout=30) as rpc,
    ):
        pairs = [
            (rest.classify(IMAGES), rpc.classify(IMAGES)),
            (rest.explain(IMAGES), rpc.explain(IMAGES)),
            (rest.model(), rpc.model()),
            (rest.prototypes(), rpc.prototypes()),
        ]
    for a, b in pairs:
        assert type(a) is type(b)
        assert_same_body(a.model_dump(mode="json"), b.model_dump(mode="json"))
    explanation = pairs[1][0].explanations[0]
    assert explanation.top_k[0].class_name == "bag" and explanation.intervention is not None
    assert pairs[1][1].explanations[0].top_k[0].prototypes[0].heatmap.shape == [7, 7]
