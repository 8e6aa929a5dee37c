"""API keys, request ids, the JSON access log and per-transport metrics, on a real server
(REST and gRPC) and on the REST guard alone."""

import asyncio
import json
import re
import time

import grpc
import httpx
import pytest
from helpers import FASHION_DATA, memory_exporter
from served import serve

from protonmf.service.grpc.server import pb, pb_grpc
from protonmf.service.ops.observability import ApiKeys, presented_key, request_id

KEYS = ("key-one", "key-two")
IMAGE = (FASHION_DATA / "test" / "bag" / "00030.png").read_bytes()


def test_keys_compare_every_key_and_read_both_headers(tmp_path):
    keys = ApiKeys(list(KEYS))
    assert keys.allows("key-two") and not keys.allows("key-on") and not keys.allows(None)
    assert ApiKeys([]).allows(None)  # no keys: no authentication
    assert presented_key("Bearer  key-one ", None) == "key-one"
    assert presented_key("bearer key-one", "key-two") == "key-two"  # X-API-Key first
    assert presented_key("Basic abc", None) is None
    secret = tmp_path / "keys"
    secret.write_text("# one per line\nkey-three\n\n")
    from protonmf.service.ops.settings import Settings

    s = Settings.from_env({"PROTONMF_API_KEYS": "a, b", "PROTONMF_API_KEYS_FILE": str(secret)})
    assert all(ApiKeys.from_settings(s).allows(k) for k in ("a", "b", "key-three"))
    assert "a, b" not in repr(s)  # a secret: not in reprs or logs


def test_request_ids_are_taken_when_sane_and_made_otherwise():
    assert request_id("abc-123.x") == "abc-123.x"
    for bad in (None, "", "a b", "x" * 200, "id\nInjected: 1"):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id(bad))


@pytest.fixture(scope="module")
def keyed(fashion_artifact, tmp_path_factory):
    env = {"PROTONMF_API_KEYS": ",".join(KEYS)}
    with serve(fashion_artifact, tmp_path_factory.mktemp("keyed"), env=env) as s:
        yield s


def test_rest_refuses_without_a_key_and_serves_with_one(keyed):
    files = {"images": ("bag.png", IMAGE, "image/png")}
    url = keyed.url
    r = httpx.post(f"{url}/classify", files=files)
    assert r.status_code == 401 and r.json()["reason"] == "unauthenticated"
    assert (
        httpx.post(
            f"{url}/classify", files=files, headers={"Authorization": "Bearer nope"}
        ).status_code
        == 401
    )
    assert httpx.post(f"{url}/model", json={}).status_code == 401
    assert httpx.get(f"{url}/ui/").status_code == 401
    for headers in ({"Authorization": "Bearer key-one"}, {"X-API-Key": "key-two"}):
        r = httpx.post(f"{url}/classify", files=files, headers=headers)
        assert r.status_code == 200 and r.json()["predictions"][0]["top_k"][0]["class"] == "bag"
    for open_path in ("/readyz", "/livez", "/metrics"):  # probes and metrics stay open
        assert httpx.get(f"{url}{open_path}").status_code == 200, open_path
    text = httpx.get(f"{url}/metrics").text
    assert re.search(r'protonmf_rejected_requests_total\{reason="unauthenticated"\} [3-9]', text)


def test_grpc_refuses_without_a_key_and_serves_with_one(keyed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        async with grpc.aio.insecure_channel(keyed.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            stub = pb_grpc.ProtoNMFStub(channel)
            request = pb.ClassifyRequest(images=[IMAGE], top_k=1)
            codes = []
            for metadata in ((), (("authorization", "Bearer nope"),)):
                try:
                    await stub.Classify(request, metadata=metadata)
                except grpc.aio.AioRpcError as e:
                    codes.append((e.code().name, e.details().endswith("[unauthenticated]")))
            call = stub.Classify(
                request, metadata=(("x-api-key", "key-one"), ("x-request-id", "grpc-req-1"))
            )
            answer = await call
            echoed = dict(await call.initial_metadata())["x-request-id"]
            return status, codes, answer, echoed

    status, codes, answer, echoed = asyncio.run(scenario())
    assert status == 1  # SERVING, without a key
    assert codes == [("UNAUTHENTICATED", True)] * 2
    assert answer.predictions[0].top_k[0].class_name == "bag" and echoed == "grpc-req-1"


def test_one_json_log_line_per_request_with_its_id(keyed):
    r = httpx.post(
        f"{keyed.url}/classify",
        files={"images": ("bag.png", IMAGE, "image/png")},
        headers={"X-API-Key": "key-one", "X-Request-ID": "rest-req-42"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "rest-req-42"
    made = httpx.get(f"{keyed.url}/readyz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)  # every answer has one
    lines = []
    for _ in range(50):  # the worker's stderr reaches the log file asynchronously
        lines = [
            json.loads(line[line.index("{") :])
            for line in keyed.log.read_text().splitlines()
            if '"protonmf.access"' in line and "rest-req-42" in line
        ]
        if lines:
            break
        time.sleep(0.1)
    (line,) = lines
    # and only that one: BentoML's plain-text access line is off (not JSON, a duplicate)
    assert not [ln for ln in keyed.log.read_text().splitlines() if "path=/classify" in ln]
    assert line["transport"] == "rest" and line["endpoint"] == "/classify"
    assert line["status"] == 200 and line["images"] == 1 and line["latency_ms"] > 0
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        pb_grpc.ProtoNMFStub(channel).Classify(
            pb.ClassifyRequest(images=[IMAGE]),
            metadata=(("x-api-key", "key-one"), ("x-request-id", "grpc-req-log")),
        )
    grpc_lines = []
    for _ in range(50):
        grpc_lines = [
            line
            for line in keyed.log.read_text().splitlines()
            if "grpc-req-log" in line and '"transport": "grpc"' in line
        ]
        if grpc_lines:
            break
        time.sleep(0.1)
    assert grpc_lines, "gRPC calls are logged the same way"
    text = httpx.get(f"{keyed.url}/metrics").text
    assert re.search(
        r'protonmf_requests_total\{endpoint="/classify",status="200",transport="rest"\}', text
    )
    assert re.search(
        r'protonmf_requests_total\{endpoint="Classify",status="OK",transport="grpc"\}', text
    )


def test_grpc_over_tls(make_engine, tmp_path):
    """PROTONMF_GRPC_TLS_CERT/KEY: the port speaks TLS; a plaintext client is refused."""
    import subprocess

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from served import free_port

    from protonmf.service.grpc.server import GrpcServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    env = {
        "PROTONMF_GRPC_TLS_CERT": str(cert),
        "PROTONMF_GRPC_TLS_KEY": str(key),
        "PROTONMF_GRPC_PORT": str(port),
        "PROTONMF_GRPC_HOST": "127.0.0.1",
    }

    async def scenario():
        plane = make_engine(env)
        await plane.start()
        server = GrpcServer(plane, plane.settings)
        await server.start()
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
                answer = await pb_grpc.ProtoNMFStub(channel).Classify(
                    pb.ClassifyRequest(images=[IMAGE], top_k=1), timeout=30
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                    plaintext = "OK"
                except grpc.aio.AioRpcError as e:
                    plaintext = e.code().name
            return answer, plaintext
        finally:
            await server.stop()
            await plane.stop()

    answer, plaintext = asyncio.run(scenario())
    assert answer.predictions[0].top_k[0].class_name == "bag"
    assert plaintext == "UNAVAILABLE"


def test_a_traced_request_exports_decode_infer_explain_spans(make_engine):
    """The data plane's spans: decode, infer, explain (over REST they sit under BentoML's
    server span); a gRPC call opens its server span, continuing the caller's trace from
    the metadata, with the three under it."""
    from protonmf.service.engine.options import ExplainOptions
    from protonmf.service.grpc.server import ProtoNMFServicer, add_servicer

    exporter = memory_exporter()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario():
        plane = make_engine()
        await plane.start()
        await plane.explain([IMAGE], ExplainOptions(top_k=2))
        server = grpc.aio.server()
        servicer = ProtoNMFServicer(plane)
        servicer.ready = True
        add_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await pb_grpc.ProtoNMFStub(channel).Explain(
                pb.ExplainRequest(images=[IMAGE]), metadata=(("traceparent", traceparent),)
            )
        await server.stop(0)
        await plane.stop()

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("decode") == names.count("infer") == names.count("explain") == 2, names
    (rpc,) = [s for s in spans if s.name == "grpc Explain"]
    assert format(rpc.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    children = {s.name for s in spans if s.parent and s.parent.span_id == rpc.context.span_id}
    assert children == {"decode", "infer", "explain"}
    decode = next(s for s in spans if s.name == "decode")
    assert decode.attributes["images"] == 1
