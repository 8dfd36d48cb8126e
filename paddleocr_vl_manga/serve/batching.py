"""One worker between the requests and the model: concurrent requests' crops are read in one `read_many`.

A request hands its crops to `Batcher.read` and awaits a future. The worker takes the first waiting request,
waits `window_s` for others (10 ms by default: next to ~0.1-1 s of generation per batch on a CPU, a lone
request hardly notices it), adds waiting requests while their crops fit in `max_batch_size`, and runs one
`read_many` over all of them in its single thread, so the event loop keeps answering (health, errors, new
requests) while the model works and generation never runs twice at once. While a batch runs, the next
requests queue up and form the next batch, so under load batches fill without any window.

A request is never split: one with more crops than `max_batch_size` goes alone (read_many cuts it into
batches of that size). A request that gave up (its timeout cancelled its future) is dropped before its batch
starts; once started, its batch runs to the end and its answer is discarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

logger = logging.getLogger("paddleocr_vl_manga.serve")


@dataclass
class _Job:
    images: Sequence[Any]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """`await batcher.read(images)` -> read_many(images)'s answer, batched with other requests' crops.

    read_many(images, batch_size=...) must return one answer per image, in order (MangaOcr.read_many)."""

    def __init__(self, read_many: Callable[..., list[Any]], *, window_s: float = 0.01,
                 max_batch_size: int = 16) -> None:
        if window_s < 0 or max_batch_size <= 0:
            raise ValueError(f"window_s must be >= 0 and max_batch_size > 0, got {window_s}, "
                             f"{max_batch_size}")
        self.read_many, self.window_s, self.max_batch_size = read_many, window_s, max_batch_size
        self.batches_run = 0  # how many read_many calls so far (GET /health shows it)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # One thread: the model is never entered twice at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ocr-batcher")

    async def stop(self) -> None:
        """Stop the worker (after the server has answered its in-flight requests) and its thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def read(self, images: Sequence[Any]) -> list[Any]:
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (Batcher.start() first)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(list(images), future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        held: _Job | None = None  # a request that did not fit in the last batch: first of the next one
        while True:
            jobs = [held or await self._queue.get()]
            held = None
            if self.window_s:
                await asyncio.sleep(self.window_s)
            size = len(jobs[0].images)
            while size < self.max_batch_size and not self._queue.empty():
                job = self._queue.get_nowait()
                if size + len(job.images) > self.max_batch_size:
                    held = job
                    break
                jobs.append(job)
                size += len(job.images)
            jobs = [j for j in jobs if not j.future.done()]  # requests that timed out meanwhile
            if not jobs:
                continue
            images = [im for j in jobs for im in j.images]
            try:
                answers = await loop.run_in_executor(self._executor, partial(
                    self.read_many, images, batch_size=self.max_batch_size))
                if len(answers) != len(images):
                    raise RuntimeError(f"read_many gave {len(answers)} answers for {len(images)} images")
            except Exception as e:  # a model failure fails this batch's requests, not the server
                logger.exception("reading a batch of %d crops failed", len(images))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            finally:
                self.batches_run += 1
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(answers[start:start + len(j.images)])
                start += len(j.images)
