"""Micro-batching of concurrent requests' images into one onnxruntime run (asyncio).

One consumer per worker takes what is queued — up to ``max_batch`` images, from any number
of requests and transports — and runs it on one inference thread while the event loop
keeps decoding and answering. Batches form by themselves while the model is busy; with
``wait_s`` > 0 a batch also waits that long for more images once the model is free.
There is no latency model to learn or unlearn: after a burst the next image runs at once.

Optionally (``buckets``) a batch is padded with blank rows to the next of a few sizes and
the padding dropped from the outputs: the model then sees a handful of shapes, each warmed
before ready (GPUs prepare kernels per input shape). Each image names the outputs it needs;
a batch fetches their union.

Bounded: at most ``max_queue`` images wait (beyond: Overloaded, 503 with Retry-After), an
image that waited ``max_latency_s`` is refused instead of run, and a caller that went away
(client gone, deadline) has its images dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from protonmf.service.ops.errors import NotReady, Overloaded
from protonmf.service.ops.metrics import METRICS

__all__ = ["MicroBatcher"]


@dataclass
class _Pending:
    item: np.ndarray
    future: asyncio.Future
    outputs: frozenset[str] | None = None  # None: every output
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """``submit(items, outputs)`` → each item's outputs, computed by ``run(np.stack(batch),
    outputs)`` and cut per item by ``split``. ``run`` executes on one dedicated thread."""

    def __init__(
        self,
        run: Callable[..., dict],
        split: Callable[[dict], list],
        *,
        max_batch: int = 32,
        wait_s: float = 0.0,
        max_queue: int = 512,
        max_latency_s: float = 10.0,
        buckets: tuple[int, ...] | None = None,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if buckets and (max(buckets) < max_batch or min(buckets) < 1):
            raise ValueError(f"buckets {buckets} must be >= 1 and reach max_batch {max_batch}")
        self.buckets = tuple(sorted(set(buckets))) if buckets else None
        self._run, self._split = run, split
        self.max_batch, self.wait_s = max_batch, wait_s
        self.max_queue, self.max_latency_s = max_queue, max_latency_s
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="protonmf-infer")
        self._task: asyncio.Task | None = None
        self._accepting = False

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the consumer on the running event loop."""
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="batcher")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new images, give the queued ones ``grace_s`` to finish, then stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(
                    NotReady("the worker is shutting down", "shutting_down")
                )
        self._queue.clear()
        self._thread.shutdown(wait=False)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- producers ---------------------------------------------------------------------

    async def submit(
        self, items: list[np.ndarray], outputs: frozenset[str] | None = None
    ) -> list[dict]:
        """Queue ``items`` (one request's images) and wait for their ``outputs`` (names;
        None: all)."""
        if not self._accepting:
            raise NotReady("the worker is not serving (starting or shutting down)", "not_ready")
        if len(self._queue) + len(items) > self.max_queue:
            raise Overloaded(
                f"{len(self._queue)} images are waiting for the model (limit "
                f"{self.max_queue}); retry shortly",
                "queue_full",
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future(), outputs) for item in items]
        self._queue.extend(pending)
        METRICS.queued_images.inc(len(pending))
        self._wake.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        finally:  # cancelled or failed: the consumer skips the rest of this request
            for p in pending:
                p.future.cancel()

    # --- the consumer ------------------------------------------------------------------

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.wait_s and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not self._queue:
                self._wake.clear()
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self._thread, self._run_padded, batch)
                results = self._split(outputs)
            except Exception as e:  # the graph failed: every image of the batch gets it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)

    def _run_padded(self, batch: list[_Pending]) -> dict:
        """``run`` on the batch (padded to its bucket), outputs of the real rows only."""
        wanted = None
        if all(p.outputs is not None for p in batch):
            wanted = frozenset().union(*(p.outputs for p in batch))
        stacked = np.stack([p.item for p in batch])
        n = len(batch)
        size = next((b for b in self.buckets if b >= n), n) if self.buckets else n
        if size > n:
            blank = np.zeros((size - n, *stacked.shape[1:]), stacked.dtype)
            stacked = np.concatenate([stacked, blank])
        outputs = self._run(stacked, wanted)
        return outputs if size == n else {k: v[:n] for k, v in outputs.items()}

    def _take(self) -> list[_Pending]:
        """Up to max_batch live images from the queue; expired ones refused on the way."""
        batch: list[_Pending] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch:
            p = self._queue.popleft()
            METRICS.queued_images.dec()
            if p.future.done():  # its caller is gone
                continue
            waited = now - p.queued_at
            if waited > self.max_latency_s:
                p.future.set_exception(
                    Overloaded(
                        f"the image waited {waited:.1f} s for the model (limit "
                        f"{self.max_latency_s:g} s); retry shortly",
                        "queue_timeout",
                    )
                )
                continue
            METRICS.stage_seconds.labels(stage="queue").observe(waited)
            batch.append(p)
        return batch
