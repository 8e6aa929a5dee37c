"""Decoding in processes: untrusted image bytes → uint8 crops, in child processes.

With ``PROTONMF_DECODE_PROCESSES`` = N > 0 each worker decodes its images in N processes of
its own instead of its threads, so that decoding scales with the cores while one worker
(one per GPU) runs the model. Each child runs ``decode_crop``, the function
``Model.prepare`` runs, with the worker's ``Limits`` and ``Preprocessing`` (sent once, when
it starts): the same crops, the same errors.

One duplex pipe per child, one image at a time per child:

    parent → child   the encoded image
    child → parent   a JSON header: {"ok": shape, "s": seconds}, the crop in the child's slot
                     of a shared-memory segment (one slot per child: a child's slot is free
                     whenever the child is); or {"error": class name, "message", "reason",
                     "s"} for the ``InvalidInput`` family (rebuilt in the parent: class,
                     message, reason and so status intact); or {"raise": builtin exception
                     name, "message"} for anything else (a bug, MemoryError)

The parent never unpickles what a child sends (a child parses hostile bytes; what it says
back is data, not code). The parent copies the crop out of the slot (the batcher and the
overlay keep crops past the child's next image). Measured (benchmarks/bench_decode.py,
docs/architecture.md "Decoding in processes"): the slot costs the worker less CPU per image
than reading the crop from the pipe (``transport="pipe"``, kept for that comparison), and
the child as much. The segment is unlinked by ``close``; if the worker is killed first,
multiprocessing's resource tracker unlinks it.

A child that dies (a crash in a codec, the OOM killer, a kill) fails only the image it was
decoding (``DecoderCrashed``, 500) and is replaced; a child that hangs past the
decode-time limit (the deadline inside ``decode_image`` did not stop it: a decoder stuck
between two reads) is killed and replaced, the image refused with the in-process
``decode_timeout`` (413). Children start with 'forkserver' (forked from a small server
process that imported this module, not from the worker with its onnxruntime threads and
event loop), else 'spawn'. As with any multiprocessing child, a child imports the worker's
main module again: a script that starts a pool keeps its work under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import time
from collections import deque
from functools import partial
from multiprocessing import shared_memory

import numpy as np

from protonmf.artifact import Preprocessing, resize_crop
from protonmf.service.decode.images import Limits, _too_slow, decode_image
from protonmf.service.ops import errors
from protonmf.service.ops.errors import NotReady, ServiceError

__all__ = ["DecodePool", "DecoderCrashed", "decode_crop"]

log = logging.getLogger("protonmf.decode")

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# the service errors a child may name in a reply (by class name: nothing is unpickled)
_ERRORS = {name: getattr(errors, name) for name in errors.__all__}


def decode_crop(data: bytes, limits: Limits, spec: Preprocessing, jpeg=None) -> np.ndarray:
    """Untrusted bytes → the uint8 crop the model reads (``Model.prepare`` and the decode
    processes both run this). Raises the ``InvalidInput`` family. ``jpeg``: see
    ``decode_image`` (the GPU's JPEG decoder, in the worker only)."""
    return resize_crop(decode_image(data, limits, spec, jpeg), spec)


class DecoderCrashed(ServiceError):
    """The decode process died while decoding the image (a crash in a codec, the OOM
    killer, a kill): not known to be the image's fault, so not a 4xx."""

    status = 500
    reason = "decoder_crashed"


# --- the child ---------------------------------------------------------------------------


def _warm(limits: Limits, spec: Preprocessing) -> None:
    """Import the codecs' plugins before saying ready."""
    import io

    from PIL import Image

    for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, format=fmt)
        decode_crop(out.getvalue(), limits, spec)


def _reply(
    seconds: float, crop: np.ndarray | None = None, error: BaseException | None = None
) -> bytes:
    if error is None:
        head = {"ok": list(crop.shape), "s": seconds}
    elif isinstance(error, ServiceError) and _ERRORS.get(type(error).__name__) is type(error):
        head = {
            "error": type(error).__name__,
            "message": error.message,
            "reason": error.reason,
            "s": seconds,
        }
    else:
        head = {"raise": type(error).__name__, "message": str(error), "s": seconds}
    return json.dumps(head).encode()


def _child_main(
    conn, limits: Limits, spec: Preprocessing, slot: tuple[str, int] | None = None
) -> None:
    """One decode process: images in, crops (or errors) out, until the pipe closes.
    ``slot``: (shared memory segment, offset) to write crops into instead of the pipe."""
    # Ctrl-C reaches the whole process group: the worker stops its children itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = out = None
    if slot is not None:
        shm = shared_memory.SharedMemory(name=slot[0])
        out = np.ndarray((_crop_bytes(spec),), np.uint8, shm.buf, slot[1])
    _warm(limits, spec)
    conn.send_bytes(json.dumps({"ready": True}).encode())
    while True:
        try:
            blob = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the worker closed the pipe (close()) or is gone
        start = time.perf_counter()
        crop, error = None, None
        try:
            crop = decode_crop(blob, limits, spec)
            if out is not None:
                out[:] = crop.reshape(-1)
        except Exception as e:  # noqa: BLE001 - sent back and raised in the worker
            crop, error = None, e
        del blob
        try:
            conn.send_bytes(_reply(time.perf_counter() - start, crop, error))
            if crop is not None and out is None:
                conn.send_bytes(np.ascontiguousarray(crop).reshape(-1))  # flat: bytes
        except OSError:
            return


# --- the worker's side ---------------------------------------------------------------------


class _Child:
    __slots__ = ("index", "process", "conn", "fd", "state", "future", "timer")

    def __init__(self, index: int, process, conn):
        self.index, self.process, self.conn = index, process, conn
        self.fd = conn.fileno()
        self.state = "starting"  # → idle ⇄ busy; → dying (killed) → dead
        self.future: asyncio.Future | None = None  # the image being decoded
        self.timer: asyncio.TimerHandle | None = None


def _crop_bytes(spec: Preprocessing) -> int:
    return spec.height * spec.width * (1 if spec.color_mode == "L" else 3)


def _rebuild(head: dict) -> BaseException:
    """The exception a child reported: a service error as it was raised, a builtin
    exception by its class, anything else as a RuntimeError naming it."""
    if "error" in head:
        cls = _ERRORS.get(head["error"], ServiceError)
        return cls(head["message"], head["reason"])
    cls = getattr(builtins, head["raise"], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(head["message"])
        except (TypeError, ValueError):  # a builtin with another signature
            pass
    return RuntimeError(f"decode process: {head['raise']}: {head['message']}")


class _CropSlots:
    """One shared-memory slot per child, where it leaves its crop (no copy through the
    pipe); the name is unlinked at close, so nothing is left in /dev/shm."""

    def __init__(self, processes: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self.shm = shared_memory.SharedMemory(
            name=f"protonmf-decode-{os.getpid()}-{secrets.token_hex(4)}",
            create=True,
            size=processes * slot_bytes,
        )
        self.array = np.ndarray((processes, slot_bytes), np.uint8, self.shm.buf)

    def slot(self, index: int) -> tuple[str, int]:
        """What child ``index`` is told: the segment's name and its slot's offset."""
        return self.shm.name, index * self.slot_bytes

    def close(self) -> None:
        self.array = None
        self.shm.unlink()  # the name first: nothing is left in /dev/shm, whatever happens next
        with contextlib.suppress(BufferError):  # a view still held: unmapped with it
            self.shm.close()


def _read_reply(child: _Child, slots: _CropSlots | None) -> tuple[dict, np.ndarray | None]:
    """A child's message: its JSON head and, for a crop, the crop (from its slot, or from
    the pipe). Raises EOFError/OSError when the child is gone."""
    head = json.loads(child.conn.recv_bytes())
    if "ok" not in head:
        return head, None
    crop = np.empty(head["ok"], np.uint8)
    if slots is None:
        child.conn.recv_bytes_into(crop.reshape(-1))  # flat: bytes
    else:
        crop.reshape(-1)[:] = slots.array[child.index, : crop.size]
    return head, crop


class _FreeChildren:
    """Idle children and the images waiting for one, first come first served."""

    def __init__(self):
        self.idle: deque[_Child] = deque()
        self.waiters: deque[asyncio.Future] = deque()

    async def take(self, loop) -> _Child:
        if self.idle:
            return self.idle.popleft()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a child, then cancelled
                self.give(waiter.result())
            raise

    def give(self, child: _Child) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                return
        self.idle.append(child)

    def forget(self, child: _Child) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(child)

    def fail(self, error: BaseException) -> None:
        """Every waiting image gets ``error``; nothing is idle any more."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self.waiters.clear()
        self.idle.clear()


class DecodePool:
    """``processes`` child processes decoding for one event loop (the one ``start`` ran on).

    ``timeout_s``: how long one image may keep its child before the child is killed
    (default twice ``max_decode_ms`` + 1 s: the deadline inside ``decode_image`` should
    have stopped it long before). ``transport``: crops back through shared memory
    (``"shm"``) or the pipe (``"pipe"``: only to measure the difference)."""

    def __init__(
        self,
        processes: int,
        limits: Limits,
        spec: Preprocessing,
        timeout_s: float | None = None,
        transport: str = "shm",
    ):
        if processes < 1:
            raise ValueError(f"processes must be ≥ 1, got {processes}")
        if transport not in ("pipe", "shm"):
            raise ValueError(f"transport must be 'pipe' or 'shm', got {transport!r}")
        self.transport = transport
        self._slots: _CropSlots | None = None  # crops back through shared memory
        self.processes = processes
        self.limits, self.spec = limits, spec
        self.timeout_s = timeout_s if timeout_s is not None else 2 * limits.max_decode_ms / 1000 + 1
        self.crashes = 0  # images failed with DecoderCrashed
        self.timeouts = 0  # children killed by the watchdog
        self._ctx = multiprocessing.get_context(START_METHOD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: list[_Child | None] = [None] * processes
        self._free = _FreeChildren()
        self._ready: asyncio.Future | None = None
        self._closed = False
        self._observe = None

    # --- life cycle -----------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the children; returns once each has imported the decoders and said ready."""
        # the worker's metrics: imported here, never in a child
        from protonmf.service.ops.metrics import METRICS

        self._observe = METRICS.stage_seconds.labels(stage="decode").observe
        self._loop = loop = asyncio.get_running_loop()
        if START_METHOD == "forkserver":  # children fork from a server that imported this
            self._ctx.set_forkserver_preload([__name__])
        self._ready = loop.create_future()
        try:
            if self.transport == "shm":
                self._slots = _CropSlots(self.processes, _crop_bytes(self.spec))
            spawned = await asyncio.gather(
                *(loop.run_in_executor(None, self._spawn, i) for i in range(self.processes))
            )
            for child in spawned:
                self._adopt(child)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the children (their pipes closed: they exit; killed after ``timeout_s``);
        images waiting or being decoded get NotReady."""
        if self._closed:
            return
        self._closed = True
        stopping = NotReady("the decode processes are stopping")
        self._free.fail(stopping)
        children = [c for c in self._children if c is not None]
        for child in children:
            self._unwatch(child)
            if child.future is not None and not child.future.done():
                child.future.set_exception(stopping)
            child.state = "dead"
            child.conn.close()
        deadline = time.monotonic() + timeout_s
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.exitcode is None:
                child.process.kill()
                child.process.join(1.0)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(stopping)
        if self._slots is not None:
            slots, self._slots = self._slots, None
            slots.close()

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c is not None and c.state != "dead"]

    # --- one image --------------------------------------------------------------------------

    async def prepare(self, blob: bytes) -> np.ndarray:
        """Encoded image → uint8 crop, decoded in a child. Raises what ``Model.prepare``
        raises, ``DecoderCrashed`` if the child died with the image, NotReady once closed."""
        if self._loop is None:
            raise RuntimeError("DecodePool.prepare before start")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("a DecodePool serves the event loop it was started on")
        while True:
            child = await self._acquire()
            future = self._loop.create_future()
            child.state, child.future = "busy", future
            try:
                child.conn.send_bytes(blob)
            except OSError:  # it died while idle: not this image's doing; another child
                child.future = None
                self._lost(child)
                continue
            child.timer = self._loop.call_later(self.timeout_s, self._on_timeout, child, future)
            crop, seconds = await future
            return crop

    async def _acquire(self) -> _Child:
        if self._closed:
            raise NotReady("the decode processes are stopping")
        return await self._free.take(self._loop)

    def _release(self, child: _Child) -> None:
        child.state = "idle"
        self._free.give(child)

    # --- the children, seen from the event loop ------------------------------------------------

    def _spawn(self, index: int) -> _Child:
        """Start child ``index`` (any thread: with forkserver, a few ms)."""
        ours, theirs = self._ctx.Pipe(duplex=True)
        slot = None if self._slots is None else self._slots.slot(index)
        process = self._ctx.Process(
            target=_child_main,
            args=(theirs, self.limits, self.spec, slot),
            name=f"protonmf-decode-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        return _Child(index, process, ours)

    def _adopt(self, child: _Child) -> None:
        self._children[child.index] = child
        self._loop.add_reader(child.fd, self._on_readable, child)

    def _unwatch(self, child: _Child) -> None:
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(child.fd)

    def _on_readable(self, child: _Child) -> None:
        """A child's message: ready, a crop, an error; or end of file: it died."""
        try:
            head, crop = _read_reply(child, self._slots)
        except (EOFError, OSError):  # it died
            self._lost(child)
            return
        except (ValueError, TypeError, KeyError):  # not our protocol: not to be trusted again
            log.exception("decode process %d sent a malformed reply: killed", child.index)
            self._lost(child)
            return
        if child.state == "dying":  # killed by the watchdog: a late reply changes nothing
            return
        if child.state == "starting":
            if (
                self._ready is not None
                and not self._ready.done()
                and all(
                    c is not None and c.state != "starting"
                    for c in self._children
                    if c is not child
                )
            ):
                self._ready.set_result(None)
            self._release(child)
            return
        future, child.future = child.future, None
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        self._release(child)
        self._observe(head["s"])
        if future is None or future.done():  # its caller went away, or the watchdog fired
            return
        if crop is not None:
            future.set_result((crop, head["s"]))
        else:
            future.set_exception(_rebuild(head))

    def _on_timeout(self, child: _Child, future: asyncio.Future) -> None:
        """The image kept its child past ``timeout_s``: refuse it as a decode timeout and
        kill the child (replaced when its end of file is read)."""
        if child.future is not future:
            return
        self.timeouts += 1
        child.state, child.future, child.timer = "dying", None, None
        if not future.done():
            future.set_exception(_too_slow(self.limits))
        log.warning(
            "decode process %d (pid %s) still decoding after %.1f s: killed",
            child.index,
            child.process.pid,
            self.timeout_s,
        )
        child.process.kill()

    def _lost(self, child: _Child) -> None:
        """The child is gone (or its pipe broke): fail its image, start a replacement."""
        if child.state == "dead":
            return
        was, child.state = child.state, "dead"
        self._unwatch(child)
        self._free.forget(child)
        if child.process.exitcode is None:
            child.process.kill()
        child.process.join(1.0)
        code = child.process.exitcode
        child.conn.close()
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        future, child.future = child.future, None
        if future is not None and not future.done():
            self.crashes += 1
            future.set_exception(
                DecoderCrashed(
                    f"the decode process died while decoding this image ({how}); it has been "
                    "replaced",
                    "decoder_crashed",
                )
            )
        if self._closed:
            return
        if was == "starting" and self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                RuntimeError(f"decode process {child.index} ended ({how}) before it was ready")
            )
            return
        log.warning(
            "decode process %d (pid %s) ended (%s); starting another",
            child.index,
            child.process.pid,
            how,
        )
        self._respawn(child.index, delay=1.0 if was == "starting" else 0.0)

    def _respawn(self, index: int, delay: float = 0.0) -> None:
        if self._closed or self._loop.is_closed():
            return
        if delay:
            self._loop.call_later(delay, self._respawn, index)
            return
        done = self._loop.run_in_executor(None, self._spawn, index)
        done.add_done_callback(partial(self._on_spawned, index))

    def _on_spawned(self, index: int, done: asyncio.Future) -> None:
        if done.cancelled():
            return
        if (e := done.exception()) is not None:
            log.error("cannot start decode process %d: %r; trying again in 1 s", index, e)
            self._respawn(index, delay=1.0)
            return
        child = done.result()
        if self._closed:
            child.conn.close()
            child.process.kill()
            child.process.join(1.0)
            return
        self._adopt(child)
