"""Tiers 2 and 3: the BentoML service in-process (ASGI) and as a real `protonmf serve`."""

import asyncio
import base64
import io
import json
import os
import re

import httpx
import pytest
from helpers import animated, bomb_png, half_jpeg, histogram_count, png_bytes, sample_images
from PIL import Image
from served import serve

# --- tier 2: ASGI in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def client(fashion_artifact):
    from starlette.testclient import TestClient

    os.environ["PROTONMF_ARTIFACT"] = str(fashion_artifact)
    os.environ["PROTONMF_GRPC_PORT"] = "0"  # in-process: no gRPC listener (tested elsewhere)
    from protonmf.service.service import ProtoNMFService

    with TestClient(ProtoNMFService.to_asgi()) as c:
        yield c


def test_asgi_explain_multipart_and_json_agree(client):
    blob = sample_images()[0]
    a = client.post(
        "/explain", files={"images": ("bag.png", blob, "image/png")}, data={"top_k": "2"}
    )
    b = client.post(
        "/explain", json={"images_base64": [base64.b64encode(blob).decode()], "top_k": 2}
    )
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ea, eb = a.json()["explanations"][0], b.json()["explanations"][0]
    assert ea["top_k"][0]["class"] == "bag" and ea == eb
    assert ea["exactness"] <= 1e-4


def test_asgi_classify_model_overlay(client):
    blob = sample_images()[0]
    r = client.post("/classify", files={"images": ("x.png", blob, "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["top_k"][0]["class"] == "bag"
    m = client.post("/model", json={})
    assert m.status_code == 200 and m.json()["p"] == 3
    o = client.post("/overlay", files={"images": ("x.png", blob, "image/png")})
    assert o.status_code == 200 and o.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(o.content)).format == "PNG"


def test_asgi_reads_a_prebuilt_multipart_body_as_an_upload(client):
    """Load generators (wrk in benchmarks/bench_service.py) send pre-built multipart bodies
    with their own boundary: the service must read one as it reads a client's upload."""
    blob, boundary = sample_images()[0], "protonmf-bench-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="bag.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    a = client.post(
        "/explain",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    b = client.post("/explain", files={"images": ("bag.png", blob, "image/png")})
    assert a.status_code == b.status_code == 200, a.text
    assert a.json() == b.json()


def test_asgi_openapi_documents_every_endpoint(client):
    r = client.get("/docs.json")
    assert r.status_code == 200, r.text
    spec = r.json()
    assert {
        "/classify",
        "/explain",
        "/overlay",
        "/model",
        "/prototypes",
        "/prototype_image",
    } <= spec["paths"].keys()
    text = json.dumps(spec)
    assert '"prototype": 1' in text  # the intervention example is in the schema
    for documented in (
        "map_kind",
        "residual_share",
        "nmf_contribution",
        "explained_share",
        "no_exemplars",
        '"kind": "augmented"',
    ):
        assert documented in text, documented
    schemas = spec["components"]["schemas"]
    assert {
        "ExplainResponse",
        "ClassifyResponse",
        "PrototypesResponse",
        "ModelInfo",
        "ErrorBody",
    } <= schemas.keys()
    explain = spec["paths"]["/explain"]["post"]["responses"]
    typed = explain["200"]["content"]["application/json"]["schema"]
    assert typed.get("title") == "ExplainResponse" and "explanations" in typed["properties"]
    for status in ("400", "408", "413", "415", "422", "429", "503", "504"):
        error = explain[status]["content"]["application/json"]
        assert error["schema"]["$ref"].endswith("/ErrorBody"), status
        assert error["example"]["status"] == int(status)


def test_asgi_explain_residual_split_map_kind_exemplars(client):
    body = {"images_base64": [b64(sample_images()[0])], "top_k": 2, "map_kind": "contribution"}
    r = client.post("/explain", json=body)
    assert r.status_code == 200, r.text
    entry = r.json()["explanations"][0]["top_k"][0]
    assert entry["class"] == "bag" and entry["residual_share"]["versus"]
    assert set(entry["residual_share"]) == {"logit", "margin", "versus"}
    for proto in entry["prototypes"]:
        assert proto["heatmap"]["kind"] == "contribution"
        parts = proto["nmf_contribution"] + proto["residual_contribution"]
        assert parts == pytest.approx(proto["contribution"], rel=1e-9, abs=1e-12)
        assert proto["exemplars"] and set(proto["exemplars"][0]) == {"image", "source", "presence"}


def test_asgi_prototypes_and_prototype_image(client):
    r = client.post("/prototypes", json={"classes": ["bag", 0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["class"] for c in body["classes"]] == ["bag", "tshirt_top"]
    assert body["exemplar_kinds"] == ["augmented", "nmf"]
    assert len(client.post("/prototypes", json={}).json()["classes"]) == 10
    png = client.post("/prototype_image", json={"class": "bag", "prototype": 1})
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    nmf = client.post("/prototype_image", json={"class": 8, "prototype": 1, "kind": "nmf"})
    assert nmf.status_code == 200 and nmf.content != png.content
    for body, reason in (
        ({"class": "zebra", "prototype": 0}, "unknown_class"),
        ({"class": "bag", "prototype": 9}, "unknown_prototype"),
        ({"class": "bag", "prototype": 0, "kind": "x"}, "unknown_exemplar_kind"),
    ):
        bad = client.post("/prototype_image", json=body)
        assert bad.status_code == 422 and reason in bad.text, bad.text
    assert client.post("/prototypes", json={"classes": ["zebra"]}).status_code == 422


def test_asgi_intervention(client):
    blob = sample_images()[0]
    r = client.post(
        "/explain",
        json={
            "images_base64": [base64.b64encode(blob).decode()],
            "interventions": [{"class": "bag", "prototype": 1}],
        },
    )
    assert r.status_code == 200, r.text
    iv = r.json()["explanations"][0]["intervention"]
    assert iv["switched_off"] == [{"class": "bag", "prototype": 1}]


def b64(blob):
    return base64.b64encode(blob).decode()


BAD_REQUESTS = [
    ("zero bytes", dict(files={"images": ("a.png", b"", "image/png")}), 400, "empty"),
    (
        "text file",
        dict(files={"images": ("a.txt", b"hello" * 20, "text/plain")}),
        415,
        "unsupported_format",
    ),
    ("truncated JPEG", dict(json={"images_base64": [b64(half_jpeg())]}), 400, "corrupt"),
    (
        "1x1",
        dict(json={"images_base64": [b64(png_bytes(Image.new("L", (1, 1))))]}),
        422,
        "too_small",
    ),
    ("bomb", dict(json={"images_base64": [b64(bomb_png())]}), 413, "too_many_pixels"),
    ("animated", dict(json={"images_base64": [b64(animated("PNG"))]}), 415, "animated"),
    ("bad base64", dict(json={"images_base64": ["***"]}), 400, "bad_base64"),
    ("wrong JSON types", dict(json={"images_base64": "x", "top_k": "many"}), 400, "validation"),
    ("no images", dict(json={}), 422, "no images"),
    ("too many images", dict(json={"images_base64": [b64(b"x")] * 17}), 413, "too_many_images"),
    (
        "unknown class",
        dict(
            json={
                "images_base64": [b64(b"x")],
                "interventions": [{"class": "zebra", "prototype": 0}],
            }
        ),
        422,
        "unknown_class",
    ),
    (
        "unknown prototype",
        dict(
            json={"images_base64": [b64(b"x")], "interventions": [{"class": "bag", "prototype": 9}]}
        ),
        422,
        "unknown_prototype",
    ),
    (
        "top_k over classes",
        dict(json={"images_base64": [b64(b"x")], "top_k": 11}),
        422,
        "top_k_out_of_range",
    ),
    (
        "unknown map kind",
        dict(json={"images_base64": [b64(b"x")], "map_kind": "saliency"}),
        422,
        "unknown_map_kind",
    ),
    (
        "presence without presence maps",
        dict(json={"images_base64": [b64(b"x")], "map_kind": "presence"}),
        422,
        "no_presence_maps",
    ),
]


@pytest.mark.parametrize(
    "name, kwargs, status, reason", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_asgi_bad_input_gets_4xx(client, name, kwargs, status, reason):
    r = client.post("/explain", **kwargs)
    assert r.status_code == status, r.text
    assert reason in r.text
    assert client.get("/readyz").status_code == 200


# --- tier 3: a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(fashion_artifact, request, tmp_path_factory):
    """param: {"workers": N} (default 1)."""
    param = getattr(request, "param", {})
    with serve(
        fashion_artifact, tmp_path_factory.mktemp("server"), param.get("workers", 1), {}
    ) as served:
        yield served.url


async def explain_all(url, blobs):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        rs = await asyncio.gather(
            *(c.post("/explain", files={"images": ("x.png", b, "image/png")}) for b in blobs)
        )
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json()["explanations"][0] for r in rs]


def test_concurrent_requests_are_batched_and_identical(server):
    blobs = sample_images()
    singles = [asyncio.run(explain_all(server, [b]))[0] for b in blobs[:4]]
    before = httpx.get(f"{server}/metrics").text
    merged = asyncio.run(explain_all(server, blobs))
    after = httpx.get(f"{server}/metrics").text
    for s, m in zip(singles, merged[:4], strict=True):
        assert [e["class"] for e in s["top_k"]] == [e["class"] for e in m["top_k"]]
        for es, em in zip(s["top_k"], m["top_k"], strict=True):
            assert em["logit"] == pytest.approx(es["logit"], rel=1e-5, abs=1e-5)
    name = "protonmf_inference_batch_size"
    batches = histogram_count(after, f"{name}_count") - histogram_count(before, f"{name}_count")
    ones = histogram_count(after, f"{name}_bucket", "1.0") - histogram_count(
        before, f"{name}_bucket", "1.0"
    )
    assert 0 < batches < 32, "32 concurrent requests should merge into fewer batches"
    assert batches - ones >= 1, "at least one batch should hold more than one request"
    assert all(e["exactness"] <= 1e-4 for e in merged)
    assert re.search(r"^protonmf_batch_queue_images 0\.0$", after, re.M), "the queue drained"
    queue = [
        line
        for line in after.splitlines()
        if line.startswith("protonmf_stage_duration_seconds_count") and 'stage="queue"' in line
    ]
    assert queue and float(queue[0].rsplit(" ", 1)[1]) >= 32, "time in the queue is measured"


def test_sustained_concurrency_has_no_server_errors(server):
    """Five bursts of 32 concurrent requests: every one answered 200."""
    blobs = sample_images()

    async def bursts():
        codes = []
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            for _ in range(5):  # 5 × 32 concurrent requests: 160 internal calls
                rs = await asyncio.gather(
                    *(
                        c.post("/classify", files={"images": ("x.png", b, "image/png")})
                        for b in blobs
                    )
                )
                codes += [r.status_code for r in rs]
        return codes

    codes = asyncio.run(bursts())
    assert codes.count(200) == len(codes), {c: codes.count(c) for c in set(codes)}


def test_single_request_latency_recovers_right_after_a_burst(server):
    """The batcher keeps no latency model: single requests are as fast right after a burst
    of 64 clients as before it (BentoML's adaptive batcher left them 10-30x slower for
    minutes, issue #16)."""
    import statistics
    import time

    blob = sample_images()[0]

    def single_ms(n=15) -> float:
        times = []
        with httpx.Client(base_url=server, timeout=60) as c:
            for _ in range(n):
                t = time.perf_counter()
                assert (
                    c.post("/classify", files={"images": ("x.png", blob, "image/png")}).status_code
                    == 200
                )
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    async def burst(seconds=5.0, clients=64):
        async def client(c):
            while time.perf_counter() < end:
                await c.post("/explain", files={"images": ("x.png", blob, "image/png")})

        end = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            await asyncio.gather(*(client(c) for _ in range(clients)))

    before = single_ms()
    asyncio.run(burst())
    after = single_ms()
    assert after <= 1.5 * before + 5, (before, after)


def test_server_metrics_and_hostile_input(server):
    asyncio.run(explain_all(server, sample_images()[:2]))
    r = httpx.post(f"{server}/explain", files={"images": ("a.gif", animated("GIF"), "image/gif")})
    assert r.status_code == 415
    assert httpx.get(f"{server}/readyz").status_code == 200
    text = httpx.get(f"{server}/metrics").text
    for metric in (
        "protonmf_stage_duration_seconds",
        "protonmf_inference_batch_size",
        "protonmf_predictions_total",
        "protonmf_prototype_top_contribution_total",
        "protonmf_rejected_requests_total",
        "protonmf_exactness_gap_max",
    ):
        assert metric in text, metric
    assert re.search(r'protonmf_rejected_requests_total\{reason="unsupported_format"\} [1-9]', text)


@pytest.mark.parametrize("server", [{"workers": 2}], indirect=True)
def test_metrics_with_two_workers(server):
    asyncio.run(explain_all(server, sample_images()[:8]))
    text = httpx.get(f"{server}/metrics").text
    assert "protonmf_stage_duration_seconds" in text
    assert histogram_count(text, "protonmf_inference_batch_size_count") >= 1
