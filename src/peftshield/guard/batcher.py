"""Dynamic micro-batching: concurrent requests gathered into one forward pass.

Requests queue up; a single worker takes the first one waiting, then keeps gathering for at
most ``max_wait_ms`` or until ``max_batch`` texts are in hand, runs the whole batch in one
call on a dedicated thread (so the event loop keeps answering health checks), and hands each
request its own slice of the results. A request is never split across batches and never
waits longer than ``max_wait_ms`` for company; one larger than ``max_batch`` runs alone.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

_STOP = object()


class ShuttingDown(RuntimeError):
    """A request arrived after shutdown began."""


@dataclass
class BatchRecord:
    """What one forward pass carried."""

    texts: int
    requests: int
    seconds: float


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Gathers :meth:`submit` calls into batches for ``classify(texts) -> list``."""

    def __init__(self, classify: Callable[[list[str]], list], max_batch: int = 32, max_wait_ms: float = 10.0,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        self.classify = classify
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftshield-batch")
        self._worker = asyncio.create_task(self._run())

    async def submit(self, texts: list[str]) -> list:
        """The results for ``texts``, in order, once their batch has run."""
        if self._queue is None or self._stopping:
            raise ShuttingDown("the service is shutting down")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(texts), future))
        return await future

    async def stop(self) -> None:
        """Finish every request already queued, then stop the worker."""
        if self._queue is None:
            return
        self._stopping = True
        await self._queue.put(_STOP)
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._queue = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: Any = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            if first is _STOP:
                break
            batch, size = [first], len(first.texts)
            deadline = loop.time() + self.max_wait_ms / 1000
            while size < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if item is _STOP or size + len(item.texts) > self.max_batch:
                    carry = item  # the stop signal, or the first request of the next batch
                    break
                batch.append(item)
                size += len(item.texts)
            await self._run_batch(loop, batch, size)

    async def _run_batch(self, loop, batch: list[_Pending], size: int) -> None:
        texts = [text for pending in batch for text in pending.texts]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.classify, texts)
        except Exception as exc:  # every request of the batch gets the error; the worker goes on
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(BatchRecord(size, len(batch), time.perf_counter() - started))
        start = 0
        for pending in batch:
            part = results[start : start + len(pending.texts)]
            start += len(pending.texts)
            if not pending.future.done():  # the client may have gone away
                pending.future.set_result(part)
