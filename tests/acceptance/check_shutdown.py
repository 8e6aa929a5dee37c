"""Acceptance run (issue #16): SIGTERM under load. ``--rest`` + ``--grpc`` clients (16 + 16: 32 in flight)
send /explain (1–4 Fashion images) back to back on kept-alive connections; after
``--warmup`` seconds the server process (the PID `protonmf serve` became: what a container
runtime signals) gets SIGTERM. From then on, every ``--probe-every`` seconds, a request on a
*new* connection goes out on each transport until the server has exited (or
``--max-wait`` s). Passes when

- 0 in-flight requests are lost: every request sent before SIGTERM is answered 200 / OK;
- no new-connection probe hangs (no answer within ``--hang`` s) on either transport;
- no new-connection probe is *served* later than ``--accept-window`` s (1) after SIGTERM
  (the time the signal takes to reach the worker): after that, new connections must be
  refused (connection refused/reset, 503, gRPC UNAVAILABLE);
- the server exits with the drain within ``--max-wait`` s.

REST and gRPC are measured and judged separately; the printed timeline shows what each
transport did after SIGTERM.

    .venv/bin/python -m tests.acceptance.check_shutdown ARTIFACT
    .venv/bin/python -m tests.acceptance.check_shutdown ARTIFACT --rest 4 --grpc 4 --warmup 2

(from the repository root: tests.acceptance is a package there)

Exit 0: passed; 1: failed (what failed is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from tests.acceptance.common import fashion_images, served

CLEAN = ("refused", "reset", "503", "UNAVAILABLE")
DETAILS: dict[str, str] = {}  # outcome → the first error text seen with it


def _rest_outcome(e: Exception) -> str:
    import httpx

    DETAILS.setdefault(type(e).__name__, str(e)[:200])
    if isinstance(e, httpx.TimeoutException):
        return "hung"
    if isinstance(e, httpx.ConnectError):
        return "refused"
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "reset"
    return type(e).__name__


def _grpc_outcome(e: Exception) -> str:
    import grpc

    if isinstance(e, grpc.aio.AioRpcError):
        DETAILS.setdefault(e.code().name, (e.details() or "")[:200])
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "hung"
        return e.code().name
    return type(e).__name__


async def rest_call(client, url: str, images: list[bytes], timeout: float) -> str:
    try:
        r = await client.post(
            f"{url}/explain",
            timeout=timeout,
            files=[("images", ("x.png", b, "image/png")) for b in images],
        )
        return "200" if r.status_code == 200 else str(r.status_code)
    except Exception as e:  # noqa: BLE001 - the outcome is the point
        return _rest_outcome(e)


async def grpc_call(stub, pb, images: list[bytes], timeout: float) -> str:
    try:
        await stub.Explain(pb.ExplainRequest(images=images, top_k=3), timeout=timeout)
        return "200"
    except Exception as e:  # noqa: BLE001
        return _grpc_outcome(e)


def _grpc_stub(target: str):
    import grpc

    from protonmf.api.proto.protonmf.v1 import protonmf_pb2, protonmf_pb2_grpc
    from protonmf.client import grpc_channel_options

    channel = grpc.aio.insecure_channel(target, options=grpc_channel_options(own_connection=True))
    return channel, protonmf_pb2_grpc.ProtoNMFStub(channel), protonmf_pb2


async def load_client(i, transport, s, images, state, log) -> None:
    """Back to back on one connection until the server is gone."""
    import httpx

    rng = random.Random(i)
    if transport == "rest":
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
    else:
        channel, stub, pb = _grpc_stub(s.grpc_target)
    try:
        while not state["exited"]:
            batch = rng.sample(images, rng.randint(1, 4))
            t = time.monotonic()
            if transport == "rest":
                outcome = await rest_call(client, s.url, batch, 30)
            else:
                outcome = await grpc_call(stub, pb, batch, 30)
            log.append((transport, t, time.monotonic(), outcome))
            if outcome != "200" and state["sigterm"] is not None:
                await asyncio.sleep(0.1)  # the server is going away: do not spin
    finally:
        await (client.aclose() if transport == "rest" else channel.close())


async def probe(transport, s, image, hang: float) -> str:
    """One request on a new connection."""
    import httpx

    if transport == "rest":
        async with httpx.AsyncClient() as client:
            return await rest_call(client, s.url, [image], hang)
    channel, stub, pb = _grpc_stub(s.grpc_target)
    try:
        return await grpc_call(stub, pb, [image], hang)
    finally:
        await channel.close()


async def scenario(s, images, args) -> dict:
    state = {"exited": False, "sigterm": None, "exit_at": None}
    log, probes = [], []
    clients = [
        asyncio.ensure_future(load_client(i, t, s, images, state, log))
        for i, t in enumerate(["rest"] * args.rest + ["grpc"] * args.grpc)
    ]
    await asyncio.sleep(args.warmup)
    state["sigterm"] = t_sig = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    pending = set()

    async def one(transport, t):
        probes.append(
            (
                transport,
                t - t_sig,
                await probe(transport, s, images[0], args.hang),
                time.monotonic() - t,
            )
        )

    while time.monotonic() - t_sig < args.max_wait:
        if s.proc.poll() is not None:
            state["exit_at"] = state["exit_at"] or time.monotonic() - t_sig
            if time.monotonic() - t_sig > state["exit_at"] + 1:  # probes after exit: 1 s
                break
        t = time.monotonic()
        pending |= {asyncio.ensure_future(one(tr, t)) for tr in ("rest", "grpc")}
        pending = {p for p in pending if not p.done()}
        await asyncio.sleep(args.probe_every)
    state["exited"] = True
    await asyncio.gather(*pending)
    await asyncio.wait_for(asyncio.gather(*clients), 60)
    return {"t_sig": t_sig, "log": log, "probes": probes, "exit_at": state["exit_at"]}


def timeline(probes) -> str:
    """Runs of equal outcomes: "+0.0–0.8 s served ×4 | +1.0–9.9 s refused ×36"."""
    runs = []
    for _, at, outcome, _ in sorted(probes, key=lambda p: p[1]):
        if runs and runs[-1][2] == outcome:
            runs[-1][1], runs[-1][3] = at, runs[-1][3] + 1
        else:
            runs.append([at, at, outcome, 1])
    name = {"200": "served"}
    return " | ".join(f"+{a:.1f}–{b:.1f} s {name.get(o, o)} ×{n}" for a, b, o, n in runs)


def judge(transport: str, result: dict, args) -> bool:
    t_sig = result["t_sig"]
    mine = [r for r in result["log"] if r[0] == transport]
    before = [r for r in mine if r[1] < t_sig]
    in_flight = [r for r in before if r[2] >= t_sig]
    lost = [r for r in before if r[3] != "200"]
    after = Counter(r[3] for r in mine if r[1] >= t_sig)
    probes = [p for p in result["probes"] if p[0] == transport]
    hung = [p for p in probes if p[2] == "hung"]
    late = [p for p in probes if p[2] == "200" and p[1] > args.accept_window]
    unclean = [p for p in probes if p[2] not in CLEAN + ("200", "hung")]
    print(
        f"{transport.upper()}: {len(before)} requests sent before SIGTERM, {len(in_flight)} "
        f"in flight at SIGTERM, lost {len(lost)} {dict(Counter(r[3] for r in lost))}; "
        f"sent on kept-alive connections after SIGTERM: {dict(after)}"
    )
    served_after = [p[1] for p in probes if p[2] == "200"]
    print(
        f"  new connections after SIGTERM: {dict(Counter(p[2] for p in probes))}; last served at "
        f"+{max(served_after, default=0):.1f} s; hung (> {args.hang:g} s) {len(hung)}"
    )
    print(f"  timeline: {timeline(probes)}")
    problems = []
    if lost:
        problems.append(f"{len(lost)} requests sent before SIGTERM not answered 200")
    if hung:
        problems.append(f"{len(hung)} new connections hung")
    if late:
        problems.append(
            f"{len(late)} new connections served later than "
            f"{args.accept_window:g} s after SIGTERM (until +{late[-1][1]:.1f} s)"
        )
    if unclean:
        problems.append(
            f"{len(unclean)} new connections answered otherwise: "
            f"{dict(Counter(p[2] for p in unclean))}"
        )
    for p in problems:
        print(f"  FAIL ({transport}): {p}")
    return not problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rest", type=int, default=16, help="REST load clients")
    ap.add_argument("--grpc", type=int, default=16, help="gRPC load clients")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before SIGTERM")
    ap.add_argument("--probe-every", type=float, default=0.25)
    ap.add_argument("--hang", type=float, default=5.0, help="a probe unanswered this long hangs")
    ap.add_argument("--accept-window", type=float, default=1.0)
    ap.add_argument("--max-wait", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="serve from this folder: its server.log stays")
    args = ap.parse_args(argv)
    images = [b for _, b in fashion_images(2)]
    with served(args.artifact, workers=args.workers, keep=args.keep) as s:
        result = asyncio.run(scenario(s, images, args))
        code = s.proc.poll()
    exit_at = result["exit_at"]
    print(
        f"SIGTERM to PID {s.proc.pid}: exited "
        + (
            f"after {exit_at:.1f} s with code {code}"
            if exit_at is not None
            else f"not within {args.max_wait:g} s (then stopped by the harness)"
        )
    )
    for outcome, text in sorted(DETAILS.items()):
        print(f"  {outcome}: {text!r}")
    ok_rest = judge("rest", result, args)
    ok_grpc = judge("grpc", result, args)
    ok = ok_rest and ok_grpc and exit_at is not None
    print(
        f"REST {'PASS' if ok_rest else 'FAIL'}, gRPC {'PASS' if ok_grpc else 'FAIL'}, "
        f"exit {'in time' if exit_at is not None else 'FAIL'}"
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
