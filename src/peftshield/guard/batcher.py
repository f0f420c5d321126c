"""Dynamic micro-batching: concurrent requests gathered into one forward pass.

Requests queue up; a single worker takes the first one waiting, then keeps gathering for at
most ``max_wait_ms`` or until ``max_batch`` texts are in hand, runs the whole batch in one
call on a dedicated thread (so the event loop keeps answering health checks), and hands each
request its own slice of the results. A request is never split across batches and never
waits longer than ``max_wait_ms`` for company; one larger than ``max_batch`` runs alone.

Overload is shed, never queued without bound: with ``max_queue``, a request that would put
more than that many texts in the queue is refused at once (:class:`Overloaded`, with a
retry-after estimate from the recent throughput). Each request may carry a deadline: if it
passes while the request waits, the request fails with :class:`DeadlineExceeded`, and a
request whose caller gave up (deadline, disconnect) is dropped from the queue before its
batch is formed, so no work runs for a client that is gone.

One request cannot fail the others of its batch: when a forward pass over several requests
raises, its requests run again in halves, and so on down, so that only a request that fails
on its own gets the error (a few more passes, about two per halving, for the one at fault).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

_STOP = object()


class ShuttingDown(RuntimeError):
    """A request arrived after shutdown began."""


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after`` is the estimated seconds until it has drained."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"overloaded: {queued} texts queued, the limit is {limit}; retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its batch ran."""


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
    deadline: float | None = None  # loop time
    abandoned: bool = False  # the caller stopped waiting (deadline, disconnect)


class MicroBatcher:
    """Gathers :meth:`submit` calls into batches for ``classify(texts) -> list``."""

    def __init__(self, classify: Callable[[list[str]], list], max_batch: int = 32, max_wait_ms: float = 10.0,
                 on_batch: Callable[[BatchRecord], None] | None = None, max_queue: int | None = None,
                 on_drop: Callable[[str, int], None] | None = None) -> None:
        self.classify = classify
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.on_drop = on_drop  # (reason, requests): requests dropped before their batch ran
        self.queued_texts = 0  # waiting, not yet in a batch
        self._throughput = 0.0  # texts per second of recent batches (exponential average)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftshield-batch")
        self._worker = asyncio.create_task(self._run())

    async def submit(self, texts: list[str], timeout: float | None = None) -> list:
        """The results for ``texts``, in order, once their batch has run. Raises
        :class:`Overloaded` at once when the queue is full and :class:`DeadlineExceeded`
        when ``timeout`` seconds pass first (the request is then dropped, not run)."""
        if self._queue is None or self._stopping:
            raise ShuttingDown("the service is shutting down")
        if self.max_queue is not None and self.queued_texts + len(texts) > self.max_queue and self.queued_texts > 0:
            raise self.overloaded()
        loop = asyncio.get_running_loop()
        pending = _Pending(list(texts), loop.create_future(), None if timeout is None else loop.time() + timeout)
        self.queued_texts += len(pending.texts)
        self._queue.put_nowait(pending)
        try:
            if timeout is None:
                return await asyncio.shield(pending.future)
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except asyncio.TimeoutError:
            pending.abandoned = True
            raise DeadlineExceeded(f"no answer within the request deadline of {timeout:g} s") from None
        except asyncio.CancelledError:
            pending.abandoned = True  # the client went away
            raise

    def full(self) -> bool:
        """Whether the queue holds ``max_queue`` texts already (any new request would be refused)."""
        return self.max_queue is not None and self.queued_texts >= self.max_queue

    def overloaded(self) -> Overloaded:
        """The refusal for a request that finds the queue full, with the current figures."""
        return Overloaded(self.queued_texts, self.max_queue, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until the queue has drained at the recent throughput (at least 1)."""
        rate = self._throughput or float(self.max_batch)
        return max(1, math.ceil(self.queued_texts / rate))

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

    def _take(self, item: Any, loop) -> bool:
        """Account for ``item`` leaving the queue; False when it is not to be run."""
        if item is _STOP:
            return True
        self.queued_texts -= len(item.texts)
        return self._still_wanted(item, loop)

    def _still_wanted(self, item: _Pending, loop) -> bool:
        """False (and the caller told) for a request whose caller left or whose deadline passed."""
        if item.abandoned or item.future.done():
            self._dropped("abandoned")
            return False
        if item.deadline is not None and loop.time() >= item.deadline:
            item.future.set_exception(DeadlineExceeded("the request deadline passed while it was queued"))
            self._dropped("deadline")
            return False
        return True

    def _dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason, 1)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: Any = None
        while True:
            if carry is not None:
                first, carry = carry, None  # taken from the queue already, while the last batch ran
                if first is not _STOP and not self._still_wanted(first, loop):
                    continue
            else:
                first = await self._queue.get()
                if first is not _STOP and not self._take(first, loop):
                    continue
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
                if item is not _STOP and not self._take(item, loop):
                    continue
                if item is _STOP or size + len(item.texts) > self.max_batch:
                    carry = item  # the stop signal, or the first request of the next batch (already taken)
                    break
                batch.append(item)
                size += len(item.texts)
            await self._run_batch(loop, batch, size)

    async def _run_batch(self, loop, batch: list[_Pending], size: int | None = None) -> None:
        # The callers that left (or whose deadline passed) while the batch gathered company are dropped now.
        batch = [pending for pending in batch if self._still_wanted(pending, loop)]
        if not batch:
            return
        size = sum(len(pending.texts) for pending in batch)
        texts = [text for pending in batch for text in pending.texts]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.classify, texts)
        except Exception as exc:  # the worker goes on
            if len(batch) > 1:  # which request failed it? Each half runs on its own (bisection), so the others get their answers
                middle = len(batch) // 2
                await self._run_batch(loop, batch[:middle])
                await self._run_batch(loop, batch[middle:])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        if seconds > 0:
            rate = size / seconds
            self._throughput = rate if not self._throughput else 0.8 * self._throughput + 0.2 * rate
        if self.on_batch is not None:
            self.on_batch(BatchRecord(size, len(batch), seconds))
        start = 0
        for pending in batch:
            part = results[start : start + len(pending.texts)]
            start += len(pending.texts)
            if not pending.future.done():  # the client may have gone away
                pending.future.set_result(part)
