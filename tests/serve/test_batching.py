"""serve/batching.py: concurrent requests share read_many calls, each gets its own answers, and the model is
never entered twice at once (a fake read_many that records its calls; no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from paddleocr_vl_manga.serve.batching import Batcher


class FakeModel:
    """read_many answering each image with its own name, recording every call and the most calls that ever
    overlapped."""

    def __init__(self, seconds: float = 0.0, fail_on: str | None = None,
                 gate: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.active = self.most_active = 0
        self.seconds, self.fail_on, self.gate = seconds, fail_on, gate
        self.lock = threading.Lock()

    def read_many(self, images: list[str], batch_size: int) -> list[str]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.calls.append(list(images))
        try:
            time.sleep(self.seconds)
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.fail_on in images:
                raise RuntimeError("the model failed")
            return [f"text of {im}" for im in images]
        finally:
            with self.lock:
                self.active -= 1


def run(coro_fn, batcher: Batcher):  # noqa: ANN001, ANN201
    async def main():  # noqa: ANN202
        await batcher.start()
        try:
            return await coro_fn()
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_one_read_many_and_each_gets_its_own_answers() -> None:
    model = FakeModel()
    batcher = Batcher(model.read_many, window_s=0.2, max_batch_size=16)
    requests = [[f"r{r}c{c}" for c in range(r + 1)] for r in range(4)]  # 1 + 2 + 3 + 4 crops

    async def go():  # noqa: ANN202
        return await asyncio.gather(*(batcher.read(req) for req in requests))

    answers = run(go, batcher)
    assert answers == [[f"text of {im}" for im in req] for req in requests]
    assert model.calls == [[im for req in requests for im in req]]


def test_generation_never_runs_twice_at_once_and_batches_stay_within_max_batch_size() -> None:
    model = FakeModel(seconds=0.02)
    batcher = Batcher(model.read_many, window_s=0.0, max_batch_size=3)
    requests = [[f"r{r}c{c}" for c in range(1 + r % 2)] for r in range(20)]

    async def go():  # noqa: ANN202
        return await asyncio.gather(*(batcher.read(req) for req in requests))

    answers = run(go, batcher)
    assert answers == [[f"text of {im}" for im in req] for req in requests]
    assert model.most_active == 1
    assert all(len(call) <= 3 for call in model.calls)
    assert len(model.calls) < len(requests)  # requests queued behind a running batch were batched together
    assert batcher.batches_run == len(model.calls)


def test_a_request_with_more_crops_than_the_batch_size_is_read_whole() -> None:
    model = FakeModel()
    batcher = Batcher(model.read_many, window_s=0.0, max_batch_size=2)
    big = [f"c{i}" for i in range(5)]

    async def go():  # noqa: ANN202
        return await batcher.read(big)

    assert run(go, batcher) == [f"text of {im}" for im in big]
    assert model.calls == [big]


def test_a_failed_batch_fails_its_requests_and_the_next_batch_is_read() -> None:
    model = FakeModel(fail_on="bad")
    batcher = Batcher(model.read_many, window_s=0.0, max_batch_size=1)

    async def go():  # noqa: ANN202
        with pytest.raises(RuntimeError, match="the model failed"):
            await batcher.read(["bad"])
        return await batcher.read(["good"])

    assert run(go, batcher) == ["text of good"]


def test_a_request_that_gave_up_before_its_batch_is_not_read() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = Batcher(model.read_many, window_s=0.0, max_batch_size=1)

    async def go():  # noqa: ANN202
        first = asyncio.ensure_future(batcher.read(["first"]))
        while not model.calls:  # the first batch is running (held at the gate)
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.read(["gave up"]), 0.05)
        gate.set()
        return await first, await batcher.read(["last"])

    assert run(go, batcher) == (["text of first"], ["text of last"])
    assert ["gave up"] not in model.calls
