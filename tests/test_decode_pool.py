"""Decoding in processes (service/decode_pool.py, PROTONMF_DECODE_PROCESSES): the same crops
and the same errors as ``Model.prepare`` in the worker, a dead or stuck child replaced
without breaking the pool, nothing left in /dev/shm after ``close``."""

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import hostile_corpus as H
import numpy as np
import pytest
from helpers import FASHION_DATA, imagenet_photo_files, run_images, stub_core
from PIL import Image

from protonmf.artifact import Preprocessing
from protonmf.service.decode.images import Limits
from protonmf.service.decode.pool import DecodePool, DecoderCrashed, _rebuild, _reply
from protonmf.service.engine.options import ExplainOptions
from protonmf.service.ops.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    UnsupportedMediaType,
)

RGB = Preprocessing(height=224, width=224, resize=256, interpolation="bicubic")
GREY = Preprocessing(height=56, width=56, resize=56, color_mode="L", mean=(0.3,), std=(0.35,))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def users_images() -> dict[str, bytes]:
    """What users send: photos, PNG, grey, EXIF-rotated, transparency, 16-bit."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (90, 140, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rgba = noise.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (90, 140), np.uint8)))
    photos = imagenet_photo_files()
    return {
        "jpeg photo": photos[0].read_bytes(),
        "jpeg photo 1024x683": photos[10].read_bytes(),
        "png rgb": encode(noise, "PNG"),
        "png grey": encode(noise.convert("L"), "PNG"),
        "jpeg grey": encode(noise.convert("L"), "JPEG", quality=90),
        "jpeg exif rotated": encode(noise, "JPEG", quality=90, exif=exif),
        "png rgba": encode(rgba, "PNG"),
        "png palette transparency": encode(noise.convert("P"), "PNG", transparency=0),
        "png grey16": encode(
            Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG"
        ),
        "webp": encode(noise, "WEBP", quality=80),
    }


def hostile_images() -> dict[str, bytes]:
    """A representative subset of tests/hostile_corpus.py's refusals (each reason once)."""
    jpeg = encode(Image.new("RGB", (64, 64), "grey"), "JPEG")
    return {
        "empty": b"",
        "text": b"hello, this is text\n" * 10,
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "1x1": encode(Image.new("L", (1, 1)), "PNG"),
        "declares 1e10 pixels": H.png_declaring(100_000, 100_000),
        "5000x5000 pixels": H.png_flat(5000, 5000),
        "8x3000000 side": H.png_flat(8, 3_000_000),
        "8x16384 aspect": H.png_flat(8, 16384),
        "rgba 4097x4096 raster": H.png_flat(4097, 4096, colour=6),
        "jpeg 65 scans": H.jpeg_scan_bomb(1000, 1000, 65),
        "animated png": H.animated("PNG", 3),
        "gif": H.animated("GIF", 3),
        "over byte limit": jpeg + b"\0" * (9 * 2**20),
    }


def slow_png() -> bytes:
    """A 4000 × 6000 grey PNG: ~0.2 s to decode and resize on one core (allowed)."""
    return H.png_flat(4000, 6000)


@contextlib.asynccontextmanager
async def started(
    processes: int = 2, spec: Preprocessing = RGB, limits: Limits | None = None, **kw
):
    pool = DecodePool(processes, limits or Limits(), spec, **kw)
    await pool.start()
    try:
        yield pool
    finally:
        pool.close()


def outcome(fn):
    """(crop, None) or (None, (class, status, reason, message))."""
    try:
        return fn(), None
    except ServiceError as e:
        return None, (type(e), e.status, e.reason, e.message)


async def aoutcome(coro):
    try:
        return await coro, None
    except ServiceError as e:
        return None, (type(e), e.status, e.reason, e.message)


async def replaced(pool: DecodePool, pid: int) -> None:
    """Until the pool has noticed that ``pid`` died and started another child."""
    for _ in range(500):
        if pid not in pool.pids() and len(pool.pids()) == pool.processes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"decode process {pid} not replaced within 5 s")


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("protonmf-decode")}


# --- the same crops, the same errors ---------------------------------------------------------


@pytest.mark.parametrize("spec", [RGB, GREY], ids=["rgb224", "grey56"])
def test_crops_are_bit_identical_to_core_prepare(spec):
    core = stub_core(spec)
    images = users_images()

    async def scenario():
        async with started(1, spec) as pool:  # one child: every crop through the same slot
            return {name: await pool.prepare(blob) for name, blob in images.items()}

    got = asyncio.run(scenario())
    for name, blob in images.items():
        expected = core.prepare(blob)
        assert got[name].dtype == np.uint8 and got[name].shape == core.crop_shape, name
        # the crops came out of the slot: later images did not overwrite earlier crops
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
        assert got[name].flags.writeable and got[name].flags.owndata, name


def test_refusals_are_the_same_as_in_process():
    core = stub_core(RGB)
    images = hostile_images()

    async def scenario():
        async with started(2) as pool:
            return {name: await aoutcome(pool.prepare(blob)) for name, blob in images.items()}

    got = asyncio.run(scenario())
    reasons = set()
    for name, blob in images.items():
        crop, error = got[name]
        assert crop is None and error is not None, name
        assert error == outcome(lambda b=blob: core.prepare(b))[1], name
        reasons.add(error[2])
    assert {
        "empty",
        "unsupported_format",
        "corrupt",
        "too_small",
        "too_many_pixels",
        "side_too_long",
        "aspect_ratio",
        "raster_too_large",
        "too_many_scans",
        "animated",
        "too_large",
    } <= reasons
    classes = {e[0] for _, e in got.values()}
    assert {InvalidInput, PayloadTooLarge, Unprocessable, UnsupportedMediaType} <= classes


def test_decode_timeout_is_the_same_as_in_process():
    """The deadline inside decode_image runs in the child: 413 decode_timeout, same text."""
    limits = Limits(max_decode_ms=1)
    blob = H.png_flat(4000, 4000)

    async def scenario():
        async with started(1, limits=limits) as pool:
            return await aoutcome(pool.prepare(blob))

    _, error = asyncio.run(scenario())
    expected = outcome(lambda: stub_core(RGB, limits).prepare(blob))[1]
    assert error == expected and error[0] is PayloadTooLarge and error[2] == "decode_timeout"


def test_replies_name_errors_without_pickles():
    """What a child reports is rebuilt from JSON: service errors intact, builtins by class,
    anything else a RuntimeError naming it."""

    class Odd(Exception):
        pass

    for error, cls in [
        (Unprocessable("image is 1×1", "too_small"), Unprocessable),
        (PayloadTooLarge("too big"), PayloadTooLarge),
        (MemoryError("no room"), MemoryError),
        (Odd("odd"), RuntimeError),
    ]:
        rebuilt = _rebuild(json.loads(_reply(0.01, error=error)))
        assert type(rebuilt) is cls
        if isinstance(error, ServiceError):
            assert (rebuilt.message, rebuilt.reason, rebuilt.status) == (
                error.message,
                error.reason,
                error.status,
            )
        else:
            assert str(error) in str(rebuilt)


def test_decode_processes_import_neither_the_model_nor_metrics():
    """A child imports this module, the limits' and the preprocessing's: not onnxruntime
    (threads, memory), not prometheus_client (its multiprocess files), not torch."""
    code = (
        "import sys, protonmf.service.decode.pool, protonmf.service.decode.images, "
        "protonmf.artifact; bad = {'onnxruntime', 'prometheus_client', 'torch'} & "
        "set(sys.modules); sys.exit(str(sorted(bad)) if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- concurrency, crashes, hangs, shutdown -----------------------------------------------------


def test_64_concurrent_prepares_get_their_own_crops():
    core = stub_core(RGB)
    images = list(users_images().values())
    blobs = [images[i % len(images)] for i in range(64)]
    expected = [core.prepare(b) for b in images]

    async def scenario():
        async with started(2) as pool:
            return await asyncio.gather(*(pool.prepare(b) for b in blobs))

    crops = asyncio.run(scenario())
    for i, crop in enumerate(crops):
        np.testing.assert_array_equal(crop, expected[i % len(images)], err_msg=str(i))


def test_a_child_killed_while_decoding_fails_its_image_only():
    photo = imagenet_photo_files()[0].read_bytes()
    expected = stub_core(RGB).prepare(photo)

    async def scenario():
        async with started(2) as pool:
            slow = asyncio.ensure_future(pool.prepare(slow_png()))
            await asyncio.sleep(0)  # sent to a child
            (busy,) = [c for c in pool._children if c.state == "busy"]
            others = [asyncio.ensure_future(pool.prepare(photo)) for _ in range(4)]
            os.kill(busy.process.pid, signal.SIGKILL)
            killed = await aoutcome(slow)
            answers = await asyncio.gather(*others)
            after = await asyncio.gather(*(pool.prepare(photo) for _ in range(6)))
            return killed, busy.process.pid, answers + after, pool.pids(), pool.crashes

    (crop, error), pid, answers, pids, crashes = asyncio.run(scenario())
    assert crop is None and error[0] is DecoderCrashed and error[1:3] == (500, "decoder_crashed")
    assert "signal 9" in error[3]
    assert crashes == 1 and len(pids) == 2 and pid not in pids  # replaced
    for a in answers:
        np.testing.assert_array_equal(a, expected)


def test_a_child_killed_while_idle_costs_no_image():
    photo = imagenet_photo_files()[1].read_bytes()
    expected = stub_core(RGB).prepare(photo)

    async def scenario():
        async with started(1) as pool:
            (pid,) = pool.pids()
            os.kill(pid, signal.SIGKILL)
            await replaced(pool, pid)  # noticed while idle (its end of the pipe closed)
            crops = [await pool.prepare(photo) for _ in range(3)]
            return crops, pid, pool.pids(), pool.crashes

    crops, pid, pids, crashes = asyncio.run(scenario())
    assert crashes == 0 and len(pids) == 1 and pids != [pid]
    for c in crops:
        np.testing.assert_array_equal(c, expected)


def test_a_stuck_child_is_killed_and_its_image_refused_as_a_timeout():
    """The watchdog (a decoder the in-child deadline did not stop): simulated by a slow image
    and a watchdog shorter than it."""
    photo = imagenet_photo_files()[2].read_bytes()

    async def scenario():
        async with started(1, timeout_s=0.05) as pool:
            (pid,) = pool.pids()
            stuck = await aoutcome(pool.prepare(slow_png()))
            pool.timeout_s = 30.0
            after = await pool.prepare(photo)
            return stuck, pid, pool.pids(), pool.timeouts, after

    (_, error), pid, pids, timeouts, after = asyncio.run(scenario())
    assert error[0] is PayloadTooLarge and error[1:3] == (413, "decode_timeout")
    assert timeouts == 1 and pids and pids != [pid]
    np.testing.assert_array_equal(after, stub_core(RGB).prepare(photo))


def test_a_cancelled_caller_gives_its_child_back():
    photo = imagenet_photo_files()[3].read_bytes()

    async def scenario():
        async with started(1) as pool:
            gone = asyncio.ensure_future(pool.prepare(slow_png()))
            waiting = asyncio.ensure_future(pool.prepare(photo))  # waits for the one child
            await asyncio.sleep(0.01)
            gone.cancel()
            waiting.cancel()
            await asyncio.gather(gone, waiting, return_exceptions=True)
            return await asyncio.wait_for(pool.prepare(photo), 10)

    np.testing.assert_array_equal(asyncio.run(scenario()), stub_core(RGB).prepare(photo))


def test_close_stops_the_children_and_unlinks_shared_memory():
    before = shm_segments()

    async def scenario():
        pool = DecodePool(2, Limits(), RGB)
        await pool.start()
        name = pool._slots.shm.name
        during = shm_segments()
        pid = pool.pids()[0]
        os.kill(pid, signal.SIGKILL)  # a replaced child too
        await replaced(pool, pid)
        await pool.prepare(imagenet_photo_files()[0].read_bytes())
        processes = [c.process for c in pool._children]
        pool.close()
        with pytest.raises(ServiceError) as e:
            await pool.prepare(b"")
        return name, during, processes, e.value

    name, during, processes, refused = asyncio.run(scenario())
    assert name.lstrip("/") in during  # the segment existed while the pool was open
    assert shm_segments() == before  # and nothing is left
    assert all(p.exitcode is not None for p in processes)
    assert refused.reason == "not_ready" and refused.status == 503


def test_prepare_needs_start_and_its_loop():
    pool = DecodePool(1, Limits(), RGB)
    with pytest.raises(RuntimeError, match="before start"):
        asyncio.run(pool.prepare(b""))
    with pytest.raises(ValueError):
        DecodePool(0, Limits(), RGB)


# --- through the data plane (a converted artifact: service tier) ----------------------------


def test_dataplane_answers_the_same_with_decode_processes(make_engine):
    """classify, explain, overlay and a refusal: equal bodies with 2 decode processes and
    with the worker's threads (batches of one image: no float differences between batch
    compositions); the process path never calls Model.prepare."""
    blobs = [p.read_bytes() for p in sorted((FASHION_DATA / "test" / "bag").glob("*.png"))[:2]]
    blobs.append(imagenet_photo_files()[0].read_bytes())  # colour JPEG → grey crop

    async def answers(processes: int):
        plane = make_engine(
            {"PROTONMF_DECODE_PROCESSES": str(processes), "PROTONMF_MAX_BATCH_SIZE": "1"}
        )
        if processes:

            def in_worker(blob):
                raise AssertionError("decoded in the worker")

            plane.model.prepare = in_worker
        await plane.start()
        try:
            options = ExplainOptions(top_k=3, map_kind="contribution")
            classified = await plane.classify(blobs, 3)
            explained = await plane.explain(blobs, options)
            overlay = await plane.overlay(blobs[:1], 0, "contribution")
            refused = await aoutcome(plane.explain([b"GIF89a"], options))
            pids = plane.decoder.pids() if plane.decoder else []
            return classified, explained, overlay, refused[1], pids, plane.decoder
        finally:
            await plane.stop()

    threads = asyncio.run(answers(0))
    processes = asyncio.run(answers(2))
    assert threads[4] == [] and len(processes[4]) == 2
    assert processes[0] == threads[0]
    assert processes[1] == threads[1]
    assert processes[2] == threads[2]  # the PNG drawn over the crop: the same bytes
    assert processes[3] == threads[3] and processes[3][2] == "unsupported_format"
    assert all(c.process.exitcode is not None for c in processes[5]._children)  # stop() closed


@pytest.mark.e2e
def test_served_with_decode_processes_answers_and_cleans_up(fashion_artifact, core_all, tmp_path):
    """Under BentoML (`protonmf serve`): the worker's decode processes start, answer as the
    in-process core does, refuse like it, and leave no process or /dev/shm segment behind
    once the server stops."""
    import httpx
    import orjson
    import psutil
    from served import serve

    blob = next((FASHION_DATA / "test").glob("*/*.png")).read_bytes()
    (out,) = run_images(core_all, [blob])
    want = orjson.loads(
        orjson.dumps({"predictions": [core_all.explanations.classification(out, 3)]})
    )
    with serve(fashion_artifact, tmp_path, env={"PROTONMF_DECODE_PROCESSES": "2"}) as s:
        r = httpx.post(
            f"{s.url}/classify",
            files={"images": ("x.png", blob, "image/png")},
            data={"top_k": "3"},
            timeout=60,
        )
        bad = httpx.post(
            f"{s.url}/classify", files={"images": ("x.png", b"nope", "image/png")}, timeout=60
        )
        tree = psutil.Process(s.proc.pid).children(recursive=True)
        segments = [p for p in os.listdir("/dev/shm") if p.startswith("protonmf-decode")]
    assert r.status_code == 200 and r.json() == want, r.text
    assert bad.status_code == 415 and bad.json()["reason"] == "unsupported_format"
    # the server, its worker, the worker's forkserver and 2 decode processes (at least)
    assert len(tree) >= 4, tree
    assert segments, "the worker's shared-memory segment exists while it serves"
    left = [p for p in os.listdir("/dev/shm") if p in segments]
    assert not left, f"shared memory left after stop: {left}"
    alive = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left after stop: {alive}"
