"""gRPC (protonmf.v1) against a real `protonmf serve`: every RPC, parity with REST, health,
status codes, reflection through grpcurl, batching shared with REST."""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import (
    REPO,
    animated,
    bomb_png,
    half_jpeg,
    histogram_count,
    png_bytes,
    sample_images,
)
from PIL import Image
from served import free_port, serve

from protonmf.client import GrpcClient, RequestFailed, RestClient
from protonmf.service.grpc.server import GrpcConfig, GrpcServer, pb, pb_grpc

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def served(fashion_artifact, tmp_path_factory):
    with serve(fashion_artifact, tmp_path_factory.mktemp("grpc-server")) as s:
        yield s


def wait_serving(target: str, timeout: float = 60.0) -> list[str]:
    """Poll grpc.health.v1 until SERVING; returns the statuses seen on the way."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen = []
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(int(timeout / 0.2)):
            try:
                status = stub.Check(
                    health_pb2.HealthCheckRequest(service="protonmf.v1.ProtoNMF"), timeout=2
                ).status
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as e:
                seen.append(e.code().name)
            if seen[-1] == "SERVING":
                return seen
            time.sleep(0.2)
    raise TimeoutError(f"health never SERVING: {seen[-5:]}")


def assert_same_explanation(rest: dict, rpc: dict):
    """Identical fields; heatmap values equal up to float32 (gRPC sends packed floats)."""
    if isinstance(rest, dict):
        assert rest.keys() == rpc.keys()
        for k in rest:
            if k == "values":
                flat = [v for row in rest[k] for v in row]
                assert [v for row in rpc[k] for v in row] == pytest.approx(flat, rel=1e-6, abs=1e-6)
            else:
                assert_same_explanation(rest[k], rpc[k])
    elif isinstance(rest, list):
        assert len(rest) == len(rpc)
        for a, b in zip(rest, rpc, strict=True):
            assert_same_explanation(a, b)
    else:
        assert rest == rpc


# --- generated code and the health state machine (in-process) ------------------------


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")  # grpcio-tools: the dev extra
    subprocess.run(
        ["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PY": sys.executable},
    )
    committed = REPO / "protonmf/api/proto/protonmf/v1"
    for name in ("protonmf_pb2.py", "protonmf_pb2.pyi", "protonmf_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh"
        )


def test_health_is_not_serving_until_ready(make_engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        plane = make_engine()
        config = GrpcConfig(port=free_port(), host="127.0.0.1", max_message_bytes=1 << 20)
        server = GrpcServer(plane, config)
        await server.start(ready=False)
        statuses = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check():
                r = await stub.Check(health_pb2.HealthCheckRequest(service="protonmf.v1.ProtoNMF"))
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))

            await check()
            stub_api = pb_grpc.ProtoNMFStub(channel)
            try:  # no RPC runs before the data plane has started
                await stub_api.Classify(pb.ClassifyRequest(images=[BLOB]))
            except grpc.aio.AioRpcError as e:
                statuses.append(f"{e.code().name} {e.details()}")
            await server.ready()
            await check()
        await server.stop()
        return statuses

    assert asyncio.run(scenario()) == [
        "NOT_SERVING",
        "UNAVAILABLE the model is warming up; retry shortly [not_ready]",
        "SERVING",
    ]


# --- a real server ----------------------------------------------------------------------


def test_every_rpc_and_parity_with_rest(served):
    assert wait_serving(served.grpc_target)[-1] == "SERVING"
    blobs = sample_images()[:3]
    iv = [{"class": "bag", "prototype": 1}, {"class": "0", "prototype": 0}]
    with RestClient(served.url) as rest, GrpcClient(served.grpc_target) as rpc:
        assert rpc.classify(blobs, top_k=4) == rest.classify(blobs, top_k=4)
        assert rpc.model() == rest.model()
        for kwargs in (
            {},
            {"heatmaps": False, "top_k": 6},
            {"interventions": iv},
            {"map_kind": "contribution", "top_k": 2},
        ):
            assert_same_explanation(
                rest.explain(blobs, **kwargs).model_dump(mode="json"),
                rpc.explain(blobs, **kwargs).model_dump(mode="json"),
            )
        body = rpc.explain(blobs, interventions=iv).model_dump(mode="json")
        assert rpc.prototypes() == rest.prototypes()
        assert rpc.prototypes(["bag", 3]) == rest.prototypes(["bag", 3])
        png = rpc.prototype_image("bag", 1, "nmf")
        assert png == rest.prototype_image("bag", 1, "nmf") and png.startswith(b"\x89PNG")
        with pytest.raises(RequestFailed) as e:
            rpc.prototype_image("bag", 7)
        assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "unknown_prototype")
    entry = body["explanations"][0]["top_k"][0]
    assert entry["residual_share"]["versus"] and entry["prototypes"][0]["exemplars"]
    for e in body["explanations"]:
        assert e["exactness"] <= 1e-4
        assert e["intervention"]["switched_off"] == [
            {"class": "tshirt_top", "prototype": 0},
            {"class": "bag", "prototype": 1},
        ]


def connections_to(port: int) -> set:
    import psutil  # a BentoML dependency

    return {
        c.laddr
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_client_channels_are_separate_connections(served):
    """channels=N opens N connections (gRPC would share one between channels to the same
    target), calls go round-robin: how one client reaches several SO_REUSEPORT workers."""
    port = int(served.grpc_target.rsplit(":", 1)[1])
    before = connections_to(port)
    with GrpcClient(served.grpc_target, channels=3) as c:
        infos = [c.model() for _ in range(6)]
        assert len(connections_to(port) - before) == 3
    assert all(info == infos[0] for info in infos)
    with pytest.raises(ValueError, match="channels must be >= 1"):
        GrpcClient(served.grpc_target, channels=0)


def _status(target, request) -> tuple[str, str]:
    with GrpcClient(target, timeout=30) as c:
        try:
            c._call(c.stub.Explain, request)
        except RequestFailed as e:
            return e.code, e.reason
    return "OK", ""


BLOB = sample_images()[0]
HOSTILE = {
    "zero bytes": (pb.ExplainRequest(images=[b""]), "INVALID_ARGUMENT", "empty"),
    "text file": (
        pb.ExplainRequest(images=[b"hello, world"]),
        "INVALID_ARGUMENT",
        "unsupported_format",
    ),
    "truncated jpeg": (pb.ExplainRequest(images=[half_jpeg()]), "INVALID_ARGUMENT", "corrupt"),
    "1x1": (
        pb.ExplainRequest(images=[png_bytes(Image.new("L", (1, 1)))]),
        "INVALID_ARGUMENT",
        "too_small",
    ),
    "animated png": (pb.ExplainRequest(images=[animated("PNG")]), "INVALID_ARGUMENT", "animated"),
    "bomb": (pb.ExplainRequest(images=[bomb_png()]), "INVALID_ARGUMENT", "too_many_pixels"),
    "top_k over classes": (
        pb.ExplainRequest(images=[BLOB], top_k=11),
        "INVALID_ARGUMENT",
        "top_k_out_of_range",
    ),
    "no images": (pb.ExplainRequest(), "INVALID_ARGUMENT", "no_images"),
    "too many": (pb.ExplainRequest(images=[BLOB] * 17), "INVALID_ARGUMENT", "too_many_images"),
    "top_k 0": (
        pb.ExplainRequest(images=[BLOB], top_k=0),
        "INVALID_ARGUMENT",
        "top_k_out_of_range",
    ),
    "unknown class": (
        pb.ExplainRequest(
            images=[BLOB], interventions=[pb.Intervention(class_name="unicorn", prototype=0)]
        ),
        "INVALID_ARGUMENT",
        "unknown_class",
    ),
    "unknown prototype": (
        pb.ExplainRequest(
            images=[BLOB], interventions=[pb.Intervention(class_name="bag", prototype=99)]
        ),
        "INVALID_ARGUMENT",
        "unknown_prototype",
    ),
    "unknown map kind": (
        pb.ExplainRequest(images=[BLOB], map_kind="saliency"),
        "INVALID_ARGUMENT",
        "unknown_map_kind",
    ),
    "no presence maps": (
        pb.ExplainRequest(images=[BLOB], map_kind="presence"),
        "INVALID_ARGUMENT",
        "no_presence_maps",
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs_map_to_status_codes(served, name):
    request, code, reason = HOSTILE[name]
    assert _status(served.grpc_target, request) == (code, reason)
    assert _status(served.grpc_target, pb.ExplainRequest(images=[BLOB]))[0] == "OK"


def test_message_limit_and_deadline(served):
    huge = pb.ExplainRequest(images=[b"\0" * ((8 << 20) + 1)] * 2)  # within the message limit
    with GrpcClient(served.grpc_target) as c:
        with pytest.raises(RequestFailed) as e:
            # over the message limit (16 images × 8 MiB + 1 MiB): refused by gRPC itself
            c._call(c.stub.Explain, pb.ExplainRequest(images=[b"\0" * (140 << 20)]))
        assert e.value.code == "RESOURCE_EXHAUSTED"
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Explain(pb.ExplainRequest(images=[BLOB] * 16), timeout=0.001)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(RequestFailed) as e:  # each image is over the 8 MiB byte limit
            c._call(c.stub.Explain, huge)
        assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "too_large")
    assert httpx.get(f"{served.url}/readyz").status_code == 200


def test_grpcurl_lists_and_calls_through_reflection(served):
    def run(*args, **kw):
        return subprocess.run(
            [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60, **kw
        )

    listed = run(served.grpc_target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"protonmf.v1.ProtoNMF", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    body = json.dumps({"images": [base64.b64encode(sample_images()[0]).decode()], "top_k": 2})
    called = run("-d", body, served.grpc_target, "protonmf.v1.ProtoNMF/Classify")
    assert called.returncode == 0, called.stderr
    top = json.loads(called.stdout)["predictions"][0]["top_k"]
    with RestClient(served.url) as rest:  # (grpcurl leaves out zero-valued fields)
        expected = rest.classify(sample_images()[:1], top_k=2).predictions[0].top_k
    assert [(t["class"], t["logit"]) for t in top] == [(t.class_name, t.logit) for t in expected]
    bad = run(
        "-d",
        json.dumps({"images": [base64.b64encode(b"text").decode()]}),
        served.grpc_target,
        "protonmf.v1.ProtoNMF/Explain",
    )
    assert "InvalidArgument" in bad.stderr and "[unsupported_format]" in bad.stderr


def test_concurrent_grpc_calls_share_the_batcher(served):
    blobs = sample_images()
    before = httpx.get(f"{served.url}/metrics").text

    async def burst():
        async with grpc.aio.insecure_channel(served.grpc_target) as channel:
            stub = pb_grpc.ProtoNMFStub(channel)
            return await asyncio.gather(
                *(stub.Explain(pb.ExplainRequest(images=[b]), timeout=60) for b in blobs)
            )

    responses = asyncio.run(burst())
    after = httpx.get(f"{served.url}/metrics").text
    with RestClient(served.url) as rest:
        expected = [p.top_k[0].class_name for p in rest.classify(blobs[:16], top_k=1).predictions]
    assert [r.explanations[0].top_k[0].class_name for r in responses[:16]] == expected
    name = "protonmf_inference_batch_size"
    batches = histogram_count(after, f"{name}_count") - histogram_count(before, f"{name}_count")
    assert 0 < batches < len(blobs), "32 concurrent gRPC calls should merge into fewer batches"
    stages = histogram_count(after, "protonmf_images_per_request_count") - histogram_count(
        before, "protonmf_images_per_request_count"
    )
    assert stages == len(blobs), "gRPC requests count in the same metrics as REST"
