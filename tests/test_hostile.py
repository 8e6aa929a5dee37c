"""The hostile corpus (tests/hostile_corpus.py): every case refused with its 4xx and
reason, or answered — through the core (fast), and against a served REST + gRPC server
(slow): no 5xx or gRPC UNKNOWN/INTERNAL, every answer within 5 s, the worker's memory back
to where it was.

    .venv/bin/python -m pytest tests/test_hostile.py            # both
    .venv/bin/python tests/hostile_corpus.py OUT_DIR            # the corpus as files
"""

import base64
import json
import re
import time
from pathlib import Path

import grpc
import hostile_corpus
import httpx
import numpy as np
import pytest
from helpers import REPO, stub_core
from served import serve

from protonmf.artifact import Preprocessing
from protonmf.service.decode.images import Limits, count_jpeg_scans, decode_image
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import Intervention
from protonmf.service.grpc.server import pb
from protonmf.service.ops.errors import ServiceError
from protonmf.service.ops.settings import Settings, SettingsError

REQUEST_SECONDS = 5.0  # every answer, refusal or not, within this
RSS_GROWTH = 1.2  # worker RSS after the corpus ≤ this × before
PEAK_RSS = 1 << 30  # worker peak RSS (VmHWM) below 1 GiB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[dict]:
    """The corpus written by the script; each index entry with its bytes as ``data``."""
    folder = tmp_path_factory.mktemp("hostile")
    assert hostile_corpus.main([str(folder)]) == 0
    index = json.loads((folder / "index.json").read_text())["cases"]
    return [dict(c, data=(folder / c["file"]).read_bytes()) for c in index]


def test_corpus_is_large_and_covers_every_kind(corpus):
    kinds = {c["kind"] for c in corpus}
    assert len(corpus) >= 50 and len([c for c in corpus if c["kind"] == "image"]) >= 50
    assert kinds == {"image", "class", "base64", "multipart", "protobuf"}
    assert {c["expect"] for c in corpus} == {"2xx", "4xx"}
    names = " ".join(c["name"] for c in corpus)
    for kind in (
        "png_8x3000000",
        "jpeg_scans",
        "gif",
        "webp",
        "tiff",
        "bmp",
        "truncated",
        "exif",
        "palette",
        "1x16384",
        "cmyk",
        "grey16",
        "frames",
        "then_zip",
    ):
        assert kind in names, kind


# --- through the core: no model needed, a stub explainer with Fashion's manifest layout ----


SPECS = {
    "grey56": Preprocessing(
        height=56, width=56, resize=56, color_mode="L", mean=(0.3,), std=(0.35,)
    ),
    "rgb224": Preprocessing(height=224, width=224, resize=256, interpolation="bicubic"),
}


def core_answer(core: Model, case: dict) -> tuple[str, str]:
    """(status class, reason) the core gives the case; "5xx" for anything untyped."""
    try:
        if case["kind"] == "image":
            crop = core.prepare(case["data"])
            assert crop.shape == core.crop_shape and crop.dtype == np.uint8
        else:
            core.resolve([Intervention(case["data"].decode(), 0)])
        return "2xx", ""
    except ServiceError as e:
        return f"{e.status // 100}xx", e.reason
    except Exception as e:  # noqa: BLE001 - the test's point: nothing untyped gets out
        return "5xx", repr(e)[:200]


def mismatch(case: dict, got: str, reason: str, seconds: float) -> str | None:
    if got != case["expect"]:
        return f"{case['name']}: {got} {reason!r}, expected {case['expect']} {case['reason']}"
    if case["reason"] and case["reason"] not in reason:
        return f"{case['name']}: reason {reason!r}, expected {case['reason']!r}"
    if seconds > REQUEST_SECONDS:
        return f"{case['name']}: {seconds:.1f} s"
    return None


@pytest.mark.parametrize("spec", list(SPECS))
def test_corpus_through_the_core(corpus, spec):
    core = stub_core(SPECS[spec])
    failures = []
    for case in corpus:
        if case["kind"] not in ("image", "class"):
            continue
        t = time.perf_counter()
        got, reason = core_answer(core, case)
        failures.append(mismatch(case, got, reason, time.perf_counter() - t))
    assert [f for f in failures if f] == []


def test_limits_from_env_and_their_defaults():
    limits = Settings.from_env(
        {
            "PROTONMF_MAX_SIDE": "4096",
            "PROTONMF_MAX_ASPECT": "4",
            "PROTONMF_MAX_SCANS": "16",
            "PROTONMF_MAX_DECODE_MS": "500",
            "PROTONMF_MAX_RASTER_BYTES": "1048576",
        }
    ).limits()
    assert (
        limits.max_side,
        limits.max_aspect,
        limits.max_scans,
        limits.max_decode_ms,
        limits.max_raster_bytes,
    ) == (4096, 4, 16, 500, 1 << 20)
    default = Limits()
    assert (default.max_side, default.max_aspect, default.max_scans) == (16384, 32, 64)
    core = stub_core(SPECS["grey56"])
    core.limits = limits
    wide = hostile_corpus.png_flat(512, 64)  # within the defaults, not within these
    with pytest.raises(ServiceError, match="at most 4× the shorter"):
        core.prepare(wide)
    with pytest.raises(SettingsError, match="PROTONMF_MAX_SCANS: Input should be greater"):
        Settings.from_env({"PROTONMF_MAX_SCANS": "0"})


def test_jpeg_scans_are_counted_exactly_on_real_files():
    module = hostile_corpus
    photo = module._photo((256, 256))
    for kw, scans in (({}, 1), ({"progressive": True}, None)):
        blob = module._save(photo, "JPEG", **kw)
        real = sum(1 for s in module.jpeg_segments(blob) if s[0] == 0xDA)
        assert count_jpeg_scans(blob) == real == (scans or real)
    assert real > 1  # the progressive one has several
    assert count_jpeg_scans(module.jpeg_scan_bomb(64, 64, 100)) == 100


def test_decoding_stops_at_its_deadline_in_the_decoding_thread():
    """A JPEG of 200,000 comment segments (within every other limit) costs ~0.4 s of
    header reading: with a 50 ms budget it is refused, and promptly."""
    module = hostile_corpus
    blob = module.jpeg_with_segments(
        module._save(module._photo(), "JPEG"), b"\xff\xfe\x00\x02", 200_000
    )
    t = time.perf_counter()
    with pytest.raises(ServiceError, match="ms to decode") as e:
        decode_image(blob, Limits(max_decode_ms=50))
    assert e.value.reason == "decode_timeout" and time.perf_counter() - t < 0.3
    assert decode_image(blob, Limits()).size == (96, 64)


def grpc_codes(register, requests: list[bytes]) -> list[tuple[str, str]]:
    """(code, details) of Explain calls with raw ``requests`` on an in-process grpc.aio
    server whose data plane has the stub core (``register``: how it is added)."""
    import asyncio

    from protonmf.service.engine.pipeline import Engine
    from protonmf.service.grpc.server import ProtoNMFServicer

    async def scenario():
        server = grpc.aio.server()
        plane = Engine(stub_core(SPECS["grey56"]), Settings.from_env({}))
        servicer = ProtoNMFServicer(plane)
        servicer.ready = True
        register(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/protonmf.v1.ProtoNMF/Explain")
                for request in requests:
                    try:
                        await call(request, timeout=10)
                        out.append(("OK", ""))
                    except grpc.aio.AioRpcError as e:
                        out.append((e.code().name, e.details()))
        finally:
            await server.stop(0)
        return out

    return asyncio.run(scenario())


def test_grpc_malformed_messages_and_unicode_digits_are_invalid_argument(corpus):
    from protonmf.service.grpc.server import add_servicer, pb_grpc

    malformed = [c["data"] for c in corpus if c["kind"] == "protobuf"]
    names = [c["data"].decode() for c in corpus if c["kind"] == "class"]
    image = corpus[0]["data"]
    unknown = [
        pb.ExplainRequest(
            images=[image], interventions=[pb.Intervention(class_name=n, prototype=0)]
        ).SerializeToString()
        for n in names
    ]
    answers = grpc_codes(add_servicer, malformed + unknown)
    first, then = answers[: len(malformed)], answers[len(malformed) :]
    assert all(
        code == "INVALID_ARGUMENT" and details.endswith("[malformed_message]")
        for code, details in first
    ), first
    assert all(
        code == "INVALID_ARGUMENT" and details.endswith("[unknown_class]") for code, details in then
    ), then
    # the bug, with the generated registration: grpc.aio answers UNKNOWN and the exception
    generated = grpc_codes(pb_grpc.add_ProtoNMFServicer_to_server, malformed)
    assert {code for code, _ in generated} == {"UNKNOWN"}


# --- against a served REST + gRPC server ----------------------------------------------------


def descendants(pid: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def worker_pid(root: int) -> int:
    """The one BentoML worker under ``protonmf serve`` (where the model and gRPC live)."""
    workers = [
        p
        for p in descendants(root)
        if b"_bentoml_impl.worker.service" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, workers
    return workers[0]


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of ``pid``, in kB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])


def rest_requests(case: dict, image: bytes) -> list[tuple[str, dict]]:
    """(label, httpx.post keyword arguments to /explain or another endpoint) for ``case``."""
    data, kind = case["data"], case["kind"]
    if kind == "image":
        return [
            ("rest-multipart", {"files": {"images": ("x", data, "application/octet-stream")}}),
            ("rest-json", {"json": {"images_base64": [base64.b64encode(data).decode()]}}),
        ]
    if kind == "class":
        name = data.decode()
        return [
            (
                "rest-json",
                {
                    "json": {
                        "images_base64": [base64.b64encode(image).decode()],
                        "interventions": [{"class": name, "prototype": 0}],
                    }
                },
            ),
            ("rest-prototypes", {"url": "/prototypes", "json": {"classes": [name]}}),
        ]
    if kind == "base64":
        return [("rest-json", {"json": {"images_base64": [data.decode()]}})]
    if kind == "multipart":
        return [("rest-raw", {"content": data, "headers": {"content-type": case["content_type"]}})]
    return []


def grpc_requests(case: dict, image: bytes) -> list[tuple[str, str, bytes]]:
    """(label, method, serialized request) for ``case``."""
    data, kind = case["data"], case["kind"]
    if kind == "image":
        return [("grpc", "Explain", pb.ExplainRequest(images=[data]).SerializeToString())]
    if kind == "class":
        name = data.decode()
        explain = pb.ExplainRequest(
            images=[image], interventions=[pb.Intervention(class_name=name, prototype=0)]
        )
        return [
            ("grpc", "Explain", explain.SerializeToString()),
            (
                "grpc-prototypes",
                "Prototypes",
                pb.PrototypesRequest(classes=[name]).SerializeToString(),
            ),
        ]
    if kind == "protobuf":
        return [("grpc", "Explain", data)]
    return []


def rest_answer(client: httpx.Client, kwargs: dict) -> tuple[str, str]:
    kwargs = dict(kwargs)
    r = client.post(kwargs.pop("url", "/explain"), **kwargs)
    return f"{r.status_code // 100}xx", r.text[:300]


def grpc_answer(channel: grpc.Channel, method: str, request: bytes) -> tuple[str, str]:
    call = channel.unary_unary(f"/protonmf.v1.ProtoNMF/{method}")  # bytes in, bytes out
    try:
        call(request, timeout=30)
        return "2xx", ""
    except grpc.RpcError as e:
        code = e.code().name
        return ("4xx" if code == "INVALID_ARGUMENT" else code), f"{code} {e.details()}"


def test_corpus_against_served_rest_and_grpc(corpus, fashion_artifact, tmp_path_factory):
    image = next((REPO / "data" / "fashion-mnist" / "test" / "bag").glob("*.png")).read_bytes()
    with (
        serve(fashion_artifact, tmp_path_factory.mktemp("hostile-server")) as served,
        httpx.Client(base_url=served.url, timeout=30) as client,
        grpc.insecure_channel(
            served.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel,
    ):
        worker = worker_pid(served.proc.pid)
        grpc.channel_ready_future(channel).result(timeout=30)
        for _ in range(20):  # the steady state the corpus is compared with
            assert client.post("/explain", files={"images": ("x", image)}).status_code == 200
            assert (
                grpc_answer(
                    channel, "Explain", pb.ExplainRequest(images=[image]).SerializeToString()
                )[0]
                == "2xx"
            )
        before = memory_kb(worker, "VmRSS")
        failures, slowest = [], (0.0, "")
        for case in corpus:
            calls = [
                (label, lambda kw=kw: rest_answer(client, kw))
                for label, kw in rest_requests(case, image)
            ]
            calls += [
                (label, lambda m=m, r=r: grpc_answer(channel, m, r))
                for label, m, r in grpc_requests(case, image)
            ]
            for label, call in calls:
                t = time.perf_counter()
                got, text = call()
                seconds = time.perf_counter() - t
                slowest = max(slowest, (seconds, f"{case['name']} {label}"))
                if (problem := mismatch(case, got, text, seconds)) is not None:
                    failures.append(f"{label} {problem}")
        time.sleep(1.0)  # let the last request's garbage go
        after, peak = memory_kb(worker, "VmRSS"), memory_kb(worker, "VmHWM")
        still_fine = client.post("/explain", files={"images": ("x", image)}).status_code
        ready = client.get("/readyz").status_code
    print(
        f"worker RSS {before / 1024:.0f} → {after / 1024:.0f} MB, peak {peak / 1024:.0f} MB; "
        f"slowest {slowest[0]:.2f} s ({slowest[1]})"
    )
    assert failures == []
    assert (still_fine, ready) == (200, 200)
    assert after <= RSS_GROWTH * before, (before, after)
    assert peak * 1024 < PEAK_RSS, peak
