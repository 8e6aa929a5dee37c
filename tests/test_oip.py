"""Open Inference Protocol v2 (service/oip_rest.py, service/oip_grpc.py) over the data plane.

REST: Starlette's TestClient around the app mounted at /v2 as BentoML mounts it (with
V2Root), and tritonclient.http against the same app under uvicorn. gRPC: the servicer on an
in-process grpc.aio server, called with raw stubs (the vendored proto) and with
tritonclient.grpc in a subprocess: tritonclient's own copy of the protocol's messages
(``inference.*`` in its grpc_service.proto) cannot share a process's descriptor pool with
ours. Every answer is compared with the data plane's own (plane.run, plane.explain).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import grpc
import numpy as np
import orjson
import pytest
from helpers import FASHION_DATA, REPO
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.testclient import TestClient

from protonmf.api.proto.inference import grpc_predict_v2_pb2 as pb
from protonmf.artifact import normalize
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import ExplainOptions, Intervention
from protonmf.service.engine.pipeline import Engine
from protonmf.service.oip.grpc import add_oip_servicer
from protonmf.service.oip.rest import V2Root, build_app
from protonmf.service.ops.settings import Settings

BLOBS = [p.read_bytes() for p in sorted((FASHION_DATA / "test" / "bag").glob("*.png"))[:2]] + [
    p.read_bytes() for p in sorted((FASHION_DATA / "test" / "sneaker").glob("*.png"))[:1]
]
OPTIONS = ExplainOptions(
    top_k=2, heatmaps=True, map_kind="contribution", interventions=(Intervention("bag", 0),)
)
OPTION_PARAMS = {
    "top_k": 2,
    "heatmaps": True,
    "map_kind": "contribution",
    "interventions": json.dumps([{"class": "bag", "prototype": 0}]),
}


def mounted(plane_holder: dict, lifespan=None) -> Starlette:
    """The OIP app as the service mounts it: under /v2, V2Root in front."""
    app = build_app(lambda: plane_holder.get("plane"), "protonmf")
    return Starlette(routes=[Mount("/v2", app)], middleware=[Middleware(V2Root)], lifespan=lifespan)


def roundtrip(body):
    """What a JSON client reads back (orjson: NaN → null, as the service encodes)."""
    return orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


# --- REST with TestClient ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest(fashion_artifact):
    holder = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        plane = Engine(Model.load(fashion_artifact), Settings.from_env({}))
        await plane.start()
        holder["plane"] = plane
        yield
        await plane.stop()

    with TestClient(mounted(holder, lifespan)) as client:
        client.plane = holder["plane"]
        yield client


def call(client, fn, *args):
    """A data plane coroutine on the app's event loop (the batcher lives there)."""

    async def run():
        return await fn(*args)

    return client.portal.call(run)


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def test_health_and_server_metadata(rest):
    assert rest.get("/v2/health/live").json() == {"live": True}
    r = rest.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    r = rest.get("/v2", follow_redirects=False)  # no 307 to /v2/: V2Root
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "protonmf" and isinstance(body["version"], str)
    assert "binary_tensor_data" in body["extensions"]
    assert rest.get("/v2/").json() == body
    assert rest.get("/v2/models/protonmf/ready").json() == {"name": "protonmf", "ready": True}
    assert rest.get("/v2/models/protonmf/versions/1/ready").status_code == 200


def test_model_metadata_lists_every_output(rest):
    core = rest.plane
    meta = rest.get("/v2/models/protonmf").json()
    assert meta == rest.get("/v2/models/protonmf/versions/1").json()
    assert meta["name"] == "protonmf" and meta["versions"] == ["1"]
    outputs = {o["name"]: o for o in meta["outputs"]}
    shapes = core.model.graph.output_shapes
    assert set(outputs) == set(shapes) | {"explanation"}
    for name, shape in shapes.items():
        assert outputs[name]["shape"] == [-1, *shape[1:]], name
        assert outputs[name]["datatype"] == "FP32", name  # the fashion graph's are float
    assert outputs["logits"]["shape"] == [-1, len(core.model.classes)]
    assert outputs["explanation"] == {"name": "explanation", "datatype": "BYTES", "shape": [-1]}
    inputs = {i["name"]: i for i in meta["inputs"]}
    graph_input = core.model.manifest["graph"]["input"]["name"]
    assert inputs == {
        "images": {"name": "images", "datatype": "BYTES", "shape": [-1]},
        "crops": {"name": "crops", "datatype": "UINT8", "shape": [-1, *core.model.crop_shape]},
        graph_input: {
            "name": graph_input,
            "datatype": "FP32",
            "shape": [-1, core.model.spec.channels, core.model.spec.height, core.model.spec.width],
        },
    }
    for path in ("/v2/models/other", "/v2/models/protonmf/versions/2", "/v2/models/other/ready"):
        r = rest.get(path)
        assert r.status_code == 404 and "error" in r.json(), path


def check_response_shape(body: dict, request_id=None):
    """The protocol's $inference_response: model_name, model_version, id, outputs with
    name, shape, datatype and row-major data of shape's size."""
    assert body["model_name"] == "protonmf" and body["model_version"] == "1"
    if request_id is not None:
        assert body["id"] == request_id
    for out in body["outputs"]:
        assert set(out) == {"name", "datatype", "shape", "data"}
        assert isinstance(out["shape"], list) and all(isinstance(d, int) for d in out["shape"])
        assert len(out["data"]) == int(np.prod(out["shape"]))


def test_json_infer_equals_the_data_plane(rest):
    plane = rest.plane
    request = {
        "id": "req-1",
        "parameters": OPTION_PARAMS,
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [len(BLOBS)],
                "data": [b64(b) for b in BLOBS],
            }
        ],
        "outputs": [
            {"name": n} for n in ("logits", "scores", "contributions", "maps", "explanation")
        ],
    }
    r = rest.post("/v2/models/protonmf/infer", json=request)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    check_response_shape(body, "req-1")
    got = {o["name"]: o for o in body["outputs"]}
    _, outs = call(rest, plane.run, BLOBS, "contribution")
    for name in ("logits", "scores", "contributions", "maps"):
        expected = np.stack([o[name] for o in outs])
        assert got[name]["datatype"] == "FP32" and got[name]["shape"] == list(expected.shape)
        np.testing.assert_array_equal(
            np.asarray(got[name]["data"], np.float32).reshape(expected.shape), expected
        )
    explained = call(rest, plane.explain, BLOBS, OPTIONS)["explanations"]
    assert got["explanation"]["datatype"] == "BYTES" and got["explanation"]["shape"] == [3]
    assert [json.loads(s) for s in got["explanation"]["data"]] == roundtrip(explained)
    classified = call(rest, plane.classify, BLOBS, 3)["predictions"]
    logits = np.asarray(got["logits"]["data"], np.float32).reshape(3, -1)
    for row, pred in zip(logits, classified, strict=True):
        assert [float(row[t["index"]]) for t in pred["top_k"]] == [
            t["logit"] for t in pred["top_k"]
        ]
    # the versioned route and the default output (logits only)
    del request["outputs"]
    r = rest.post("/v2/models/protonmf/versions/1/infer", json=request)
    assert [o["name"] for o in r.json()["outputs"]] == ["logits"]
    assert r.json()["outputs"][0]["data"] == got["logits"]["data"]


def test_crops_and_normalised_input_give_the_same_logits(rest):
    core = rest.plane
    crops = np.stack([core.model.prepare(b) for b in BLOBS])
    base = {"outputs": [{"name": "logits"}]}

    def logits(inp):
        r = rest.post("/v2/models/protonmf/infer", json={**base, "inputs": [inp]})
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    from_images = logits(
        {"name": "images", "datatype": "BYTES", "shape": [3], "data": [b64(b) for b in BLOBS]}
    )
    from_crops = logits(
        {"name": "crops", "datatype": "UINT8", "shape": list(crops.shape), "data": crops.tolist()}
    )
    x = normalize(crops, core.model.spec)
    graph_input = core.model.manifest["graph"]["input"]["name"]
    from_fp32 = logits(
        {
            "name": graph_input,
            "datatype": "FP32",
            "shape": list(x.shape),
            "data": x.ravel().tolist(),
        }
    )
    assert from_images == from_crops == from_fp32
    # the binary tensor extension: the crops raw after the JSON header, logits back raw
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "crops",
                    "datatype": "UINT8",
                    "shape": list(crops.shape),
                    "parameters": {"binary_data_size": crops.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    r = rest.post(
        "/v2/models/protonmf/infer",
        content=head + crops.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    out = json.loads(r.content[:n])["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(r.content) - n
    raw = np.frombuffer(r.content[n:], "<f4").reshape(out["shape"])
    np.testing.assert_array_equal(raw, np.asarray(from_images, np.float32).reshape(out["shape"]))
    # FP32 that is no uint8 crop is refused, not quietly rounded
    r = rest.post(
        "/v2/models/protonmf/infer",
        json={
            **base,
            "inputs": [
                {
                    "name": graph_input,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": (x + 0.1).ravel().tolist(),
                }
            ],
        },
    )
    assert r.status_code == 400 and "not_a_crop" in r.json()["error"]


@pytest.mark.parametrize(
    "request_body, status, reason",
    [
        (b"{not json", 400, "bad_json"),
        ({"inputs": "x"}, 400, "bad_request"),
        (
            {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [1]}]},
            400,
            "unknown_input",
        ),
        (
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            400,
            "bad_base64",
        ),
        (
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]},
            400,
            "bad_tensor",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [b64(b"not an image at all")],
                    }
                ]
            },
            415,
            "unsupported_format",
        ),
        (
            {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "bad_datatype",
        ),
        (
            {
                "inputs": [
                    {"name": "crops", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4}
                ]
            },
            400,
            "bad_shape",
        ),
        (
            {"inputs": [{"name": "crops", "datatype": "UINT8", "shape": [1], "data": [300]}]},
            400,
            "bad_tensor",
        ),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
                "outputs": [{"name": "saliency"}],
            },
            400,
            "unknown_output",
        ),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
                "outputs": [{"name": "explanation", "parameters": {"top_k": 99}}],
            },
            422,
            "top_k_out_of_range",
        ),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
                "parameters": {"interventions": '[{"class": "nope", "prototype": 0}]'},
                "outputs": [{"name": "explanation"}],
            },
            422,
            "unknown_class",
        ),
        (
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [0], "data": []}]},
            422,
            "no_images",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 10},
                    }
                ]
            },
            400,
            "bad_tensor",
        ),
    ],
)
def test_errors_answer_with_the_protocol_body(rest, request_body, status, reason):
    kwargs = (
        {"content": request_body} if isinstance(request_body, bytes) else {"json": request_body}
    )
    r = rest.post("/v2/models/protonmf/infer", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error"].endswith(f"[{reason}]")


def test_not_ready_without_a_plane():
    with TestClient(mounted({})) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        r = client.post("/v2/models/protonmf/infer", json={"inputs": []})
        assert r.status_code == 503 and "error" in r.json()


# --- a real server: uvicorn (REST) and grpc.aio on one event loop, as in a worker -------------


class Served:
    def __init__(self, artifact):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.artifact = artifact
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.error = None
        self.thread.start()
        assert self.ready.wait(120) and self.error is None, f"server did not start: {self.error!r}"

    def _main(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        import uvicorn

        self.plane = Engine(Model.load(self.artifact), Settings.from_env({}))
        await self.plane.start()
        self.grpc = grpc.aio.server()
        add_oip_servicer(self.grpc, lambda: self.plane, "protonmf")
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(mounted({"plane": self.plane}), lifespan="off", log_level="warning")
        self.http = uvicorn.Server(config)
        self.http_task = self.loop.create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            await asyncio.sleep(0.01)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def close(self):
        async def stop():
            self.http.should_exit = True
            await self.http_task
            await self.grpc.stop(1)
            await self.plane.stop(1)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(fashion_artifact):
    s = Served(fashion_artifact)
    yield s
    s.close()


def expected(served):
    _, outs = served.call(served.plane.run(BLOBS, "contribution"))
    explained = served.call(served.plane.explain(BLOBS, OPTIONS))["explanations"]
    return outs, roundtrip(explained)


def test_tritonclient_http(served):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("protonmf")
    assert client.get_server_metadata()["name"] == "protonmf"
    meta = client.get_model_metadata("protonmf")
    assert {o["name"] for o in meta["outputs"]} >= {"logits", "contributions", "explanation"}
    images = httpclient.InferInput("images", [len(BLOBS)], "BYTES")
    images.set_data_from_numpy(np.array(BLOBS, dtype=object), binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=True)
        for n in ("logits", "contributions", "maps", "explanation")
    ]
    result = client.infer("protonmf", [images], outputs=outputs, parameters=OPTION_PARAMS)
    outs, explained = expected(served)
    for name in ("logits", "contributions", "maps"):
        np.testing.assert_array_equal(result.as_numpy(name), np.stack([o[name] for o in outs]))
    assert [json.loads(s) for s in result.as_numpy("explanation")] == explained
    # JSON (not binary) both ways: crops in, logits out
    crops = np.stack([served.plane.model.prepare(b) for b in BLOBS])
    inp = httpclient.InferInput("crops", list(crops.shape), "UINT8")
    inp.set_data_from_numpy(crops, binary_data=False)
    result = client.infer(
        "protonmf", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)]
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), np.stack([o["logits"] for o in outs]))
    with pytest.raises(Exception, match="unknown_output"):
        client.infer("protonmf", [inp], outputs=[httpclient.InferRequestedOutput("nope")])
    client.close()
    del client, result
    gc.collect()  # here: its __del__ must not run on another thread (gevent's hub is this one's)


TRITON_GRPC_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, blobs_path, params, out = sys.argv[1:5]
    blobs = json.load(open(blobs_path))
    blobs = [bytes.fromhex(b) for b in blobs]
    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("protonmf")
    meta = client.get_model_metadata("protonmf", as_json=True)
    images = grpcclient.InferInput("images", [len(blobs)], "BYTES")
    images.set_data_from_numpy(np.array(blobs, dtype=object))
    names = ["logits", "contributions", "maps", "explanation"]
    result = client.infer("protonmf", [images],
                          outputs=[grpcclient.InferRequestedOutput(n) for n in names],
                          parameters=json.loads(params))
    arrays = {n: result.as_numpy(n) for n in names[:3]}
    try:
        client.infer("nope", [images])
        error = None
    except InferenceServerException as e:
        error = e.status()
    np.savez(out, **arrays)
    json.dump({"meta": meta, "error": error,
               "explanation": [s.decode() for s in result.as_numpy("explanation")]},
              open(out + ".json", "w"))
""")


def test_tritonclient_grpc(served, tmp_path):
    """tritonclient.grpc in a subprocess (its inference.* messages and ours cannot share one
    descriptor pool)."""
    (tmp_path / "blobs.json").write_text(json.dumps([b.hex() for b in BLOBS]))
    out = str(tmp_path / "out.npz")
    (tmp_path / "client.py").write_text(TRITON_GRPC_CLIENT)
    subprocess.run(
        [
            sys.executable,
            str(tmp_path / "client.py"),
            f"127.0.0.1:{served.grpc_port}",
            str(tmp_path / "blobs.json"),
            json.dumps(OPTION_PARAMS),
            out,
        ],
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    got = np.load(out)
    side = json.loads((tmp_path / "out.npz.json").read_text())
    outs, explained = expected(served)
    for name in ("logits", "contributions", "maps"):
        np.testing.assert_array_equal(got[name], np.stack([o[name] for o in outs]))
    assert [json.loads(s) for s in side["explanation"]] == explained
    assert side["error"] == "StatusCode.NOT_FOUND"
    shapes = {o["name"]: [int(d) for d in o["shape"]] for o in side["meta"]["outputs"]}
    assert shapes["logits"] == [-1, len(served.plane.model.classes)]


def test_raw_grpc_stubs(served):
    """The vendored proto's stubs: typed contents in → typed out, raw in → raw out, every
    RPC, errors with their codes."""
    from protonmf.api.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    core = served.plane
    outs, explained = expected(served)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="protonmf")).ready
        assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "protonmf"
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="protonmf", version="1"))
        shapes = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
        assert shapes == {
            n: ("FP32", [-1, *s[1:]]) for n, s in core.model.graph.output_shapes.items()
        } | {"explanation": ("BYTES", [-1])}
        param = pb.InferParameter
        typed = pb.ModelInferRequest(
            model_name="protonmf",
            id="x",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="images",
                    datatype="BYTES",
                    shape=[len(BLOBS)],
                    contents=pb.InferTensorContents(bytes_contents=BLOBS),
                )
            ],
            outputs=[
                pb.ModelInferRequest.InferRequestedOutputTensor(name="logits"),
                pb.ModelInferRequest.InferRequestedOutputTensor(
                    name="explanation",
                    parameters={
                        "top_k": param(int64_param=2),
                        "heatmaps": param(bool_param=True),
                        "map_kind": param(string_param="contribution"),
                        "interventions": param(string_param=OPTION_PARAMS["interventions"]),
                    },
                ),
            ],
        )
        r = stub.ModelInfer(typed)
        assert r.id == "x" and not r.raw_output_contents
        logits = np.asarray(r.outputs[0].contents.fp32_contents, np.float32).reshape(
            r.outputs[0].shape
        )
        np.testing.assert_array_equal(logits, np.stack([o["logits"] for o in outs]))
        assert [json.loads(s) for s in r.outputs[1].contents.bytes_contents] == explained
        crops = np.stack([core.model.prepare(b) for b in BLOBS])
        raw = pb.ModelInferRequest(
            model_name="protonmf",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="crops", datatype="UINT8", shape=list(crops.shape)
                )
            ],
            raw_input_contents=[crops.tobytes()],
        )
        r = stub.ModelInfer(raw)
        assert len(r.raw_output_contents) == 1 and not r.outputs[0].HasField("contents")
        np.testing.assert_array_equal(
            np.frombuffer(r.raw_output_contents[0], "<f4").reshape(logits.shape), logits
        )
        for request, code in [
            (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
            (pb.ModelInferRequest(model_name="protonmf"), grpc.StatusCode.INVALID_ARGUMENT),
            (
                pb.ModelInferRequest(
                    model_name="protonmf", inputs=raw.inputs, raw_input_contents=[b"short"]
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request)
            assert e.value.code() == code
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="protonmf", version="7"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bad = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as e:
            bad(b"\xff\xff\xff")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")  # the dev extra: the generator
    subprocess.run(
        ["bash", str(REPO / "scripts/gen_oip_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PY": sys.executable},
    )
    committed = REPO / "protonmf/api/proto/inference"
    for name in (
        "grpc_predict_v2_pb2.py",
        "grpc_predict_v2_pb2.pyi",
        "grpc_predict_v2_pb2_grpc.py",
    ):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run scripts/gen_oip_proto.sh"
        )


def test_the_served_service_speaks_v2_on_both_transports(fashion_artifact, tmp_path):
    """`protonmf serve` mounts the v2 REST routes at /v2 and the gRPC service on the gRPC
    port: tritonclient.http classifies as /classify does; tritonclient.grpc's ServerReady."""
    import httpx
    import tritonclient.http as triton_http
    from served import serve

    with serve(fashion_artifact, tmp_path) as s:
        host = s.url.removeprefix("http://")
        assert httpx.get(f"{s.url}/v2").json()["name"]  # no redirect: V2Root
        client = triton_http.InferenceServerClient(host)
        assert client.is_server_live() and client.is_model_ready("protonmf")
        images = triton_http.InferInput("images", [1], "BYTES")
        images.set_data_from_numpy(np.array([BLOBS[0]], dtype=object), binary_data=True)
        result = client.infer(
            "protonmf", [images], outputs=[triton_http.InferRequestedOutput("logits")]
        )
        logits = result.as_numpy("logits")[0]
        rest = httpx.post(
            f"{s.url}/classify",
            files={"images": ("x.png", BLOBS[0], "image/png")},
            data={"top_k": "3"},
        ).json()["predictions"][0]["top_k"]
        assert [float(logits[t["index"]]) for t in rest] == [t["logit"] for t in rest]
        code = textwrap.dedent(f"""
            import tritonclient.grpc as g
            c = g.InferenceServerClient("{s.grpc_target}")
            print(c.is_server_ready(), c.is_model_ready("protonmf"))
        """)  # the client's own inference.* messages clash with ours in one process
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
