"""Acceptance run (issue #16): slow clients. ``--slow`` connections (256) each send the
headers of a POST /explain with a Content-Length and then nothing (``--trickle``: that
many of them send one body byte every 0.5 s instead, never finishing). While they hang,
real requests (REST /explain and /classify with a Fashion image, and /readyz) go out one
after another; passes when

- every real request is answered 200 within ``--max-latency`` (2 s), and
- every slow connection gets 408 ``body_timeout`` within PROTONMF_BODY_TIMEOUT_S
  (``--body-timeout``, 10 s) + 3 s (the guard reads the body before taking a concurrency
  slot, so a slow body holds a connection, never a slot), and
- the service is ready afterwards.

    .venv/bin/python -m tests.acceptance.check_slow_clients ARTIFACT
    .venv/bin/python -m tests.acceptance.check_slow_clients ARTIFACT --body-timeout 3 --slow 256

(from the repository root: tests.acceptance is a package there)

Exit 0: passed; 1: failed (what failed is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from tests.acceptance.common import fashion_images, percentile, served

SLACK_S = 3.0


async def slow_client(
    host: str, port: int, trickle: bool, ready: asyncio.Event, hold_s: float
) -> dict:
    """Headers of an /explain with a 100 kB body, then nothing (or a byte every 0.5 s)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        return {"outcome": f"connect failed: {e}", "seconds": time.monotonic() - t0}
    writer.write(
        b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=B\r\nContent-Length: 100000\r\n\r\n"
    )
    await writer.drain()
    sent = time.monotonic()
    ready.set()
    status, first = None, b""
    try:
        read = asyncio.ensure_future(reader.readline())
        while not read.done() and time.monotonic() - sent < hold_s:
            await asyncio.wait([read], timeout=0.5)
            if trickle and not read.done():
                writer.write(b"-")
                await writer.drain()
        if read.done():
            first = read.result()
        else:
            read.cancel()
    except (ConnectionError, OSError) as e:
        first = f"reset: {e}".encode()
    seconds = time.monotonic() - sent
    if first.startswith(b"HTTP/1.1 "):
        status = int(first.split()[1])
        body = await asyncio.wait_for(_rest_of_answer(reader), 5)
        reason = (
            "body_timeout" if b"body_timeout" in body else body[:120].decode("utf-8", "replace")
        )
    else:
        reason = first.decode("utf-8", "replace") or "no answer"
    writer.close()
    return {"outcome": status or reason, "reason": reason, "seconds": seconds}


async def _rest_of_answer(reader) -> bytes:
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


async def real_requests(url: str, images: list[bytes], until: asyncio.Event) -> list[dict]:
    """One request at a time, each on a new connection, until ``until`` is set."""
    import httpx

    out, i = [], 0
    while not until.is_set():
        path = ("/explain", "/classify", "/readyz")[i % 3]
        image = images[i % len(images)]
        i += 1
        t = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                if path == "/readyz":
                    r = await client.get(url + path)
                else:
                    r = await client.post(
                        url + path, files={"images": ("x.png", image, "image/png")}
                    )
            status = r.status_code
        except httpx.HTTPError as e:
            status = f"{type(e).__name__}"
        out.append({"path": path, "status": status, "seconds": time.monotonic() - t})
        await asyncio.sleep(0.05)
    return out


async def scenario(url: str, slow: int, trickle: int, hold_s: float, images) -> tuple:
    host, port = url.split("//")[1].split(":")
    events = [asyncio.Event() for _ in range(slow)]
    tasks = [
        asyncio.ensure_future(slow_client(host, int(port), i < trickle, events[i], hold_s))
        for i in range(slow)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
    connected = time.monotonic()
    stop = asyncio.Event()
    real = asyncio.ensure_future(real_requests(url, images, stop))
    slow_results = await asyncio.gather(*tasks)
    hung_for = time.monotonic() - connected
    stop.set()
    during = await real
    after = await real_requests_once(url, images)
    return slow_results, during, after, hung_for


async def real_requests_once(url, images) -> list[dict]:
    once = asyncio.Event()
    task = asyncio.ensure_future(real_requests(url, images, once))
    await asyncio.sleep(0)
    once.set()
    return await task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--slow", type=int, default=256, help="slow connections (256)")
    ap.add_argument(
        "--trickle",
        type=int,
        default=0,
        help="of those, how many send a byte every 0.5 s instead of nothing",
    )
    ap.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        help="PROTONMF_BODY_TIMEOUT_S for the server (10, the default)",
    )
    ap.add_argument("--max-latency", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    images = [b for _, b in fashion_images(1)]
    env = {"PROTONMF_BODY_TIMEOUT_S": str(args.body_timeout)}
    hold_s = args.body_timeout + SLACK_S + 5  # how long a slow client waits for its answer
    with served(args.artifact, workers=args.workers, env=env) as s:
        slow, during, after, hung_for = asyncio.run(
            scenario(s.url, args.slow, args.trickle, hold_s, images)
        )
        import httpx

        ready = httpx.get(f"{s.url}/readyz", timeout=5).status_code == 200
    outcomes = {}
    for r in slow:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    slow_408 = [r["seconds"] for r in slow if r["outcome"] == 408 and r["reason"] == "body_timeout"]
    lat = [r["seconds"] for r in during]
    bad = [r for r in during + after if r["status"] != 200 or r["seconds"] > args.max_latency]
    print(
        f"{args.slow} slow connections ({args.trickle} trickling), body timeout "
        f"{args.body_timeout:g} s, held open {hung_for:.1f} s: outcomes {outcomes}"
    )
    if slow_408:
        print(f"  408 after {min(slow_408):.2f}–{max(slow_408):.2f} s")
    print(
        f"real requests while they hung: {len(during)}, non-200 or over {args.max_latency:g} s: "
        f"{len(bad)}; latency p50 {percentile(lat, 50) * 1000:.0f} ms, p99 "
        f"{percentile(lat, 99) * 1000:.0f} ms, max {max(lat, default=0) * 1000:.0f} ms"
    )
    for r in bad[:20]:
        print("  ", r)
    late = [s_ for s_ in slow_408 if s_ > args.body_timeout + SLACK_S]
    ok = len(slow_408) == args.slow and not late and not bad and len(during) >= 3 and ready
    if len(slow_408) != args.slow:
        print(f"FAIL: {args.slow - len(slow_408)} slow connections without a 408 body_timeout")
    if late:
        print(f"FAIL: {len(late)} 408s later than {args.body_timeout + SLACK_S:g} s")
    print(f"ready after: {ready}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
