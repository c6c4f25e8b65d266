"""The hf replica's continuous batcher: what queues while a batch generates forms the next
batch, batches respect their size and key, and a failed batch fails only its own requests."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.batcher import ContinuousBatcher


class Recorder:
    """A batch function that records each batch and can hold the first one until released."""

    def __init__(self, hold_first: bool = False, fail_on: object = None):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, jobs: list) -> list:
        self.batches.append(list(jobs))
        self.started.set()
        self.release.wait(10)
        if self.fail_on in jobs:
            raise ValueError(f"bad job {self.fail_on}")
        return [f"out-{j}" for j in jobs]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def thread():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_requests_that_queue_during_a_batch_form_the_next_batch(thread):
    rec = Recorder(hold_first=True)

    async def main():
        b = ContinuousBatcher(rec, thread, max_batch_size=16)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 10)
        later = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)  # all five are queued while the first batch is held
        rec.release.set()
        return await first, await asyncio.gather(*later)

    first, later = run(main())
    assert first == "out-0"
    assert later == [f"out-{i}" for i in range(1, 6)]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]


def test_a_batch_holds_at_most_max_batch_size_in_arrival_order(thread):
    rec = Recorder(hold_first=True)

    async def main():
        b = ContinuousBatcher(rec, thread, max_batch_size=4)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 10)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        rec.release.set()
        return await asyncio.gather(first, *rest)

    assert run(main()) == [f"out-{i}" for i in range(11)]
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_jobs_with_different_keys_never_share_a_batch(thread):
    rec = Recorder(hold_first=True)

    async def main():
        b = ContinuousBatcher(rec, thread, max_batch_size=16, key=lambda j: j % 2)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 10)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        rec.release.set()
        return await asyncio.gather(first, *rest)

    assert run(main()) == [f"out-{i}" for i in range(7)]
    # The oldest waiting job's key goes first: 1 (odd) before the even ones queued after it.
    assert rec.batches == [[0], [1, 3, 5], [2, 4, 6]]


def test_a_failed_batch_fails_its_own_requests_and_the_next_batch_is_served(thread):
    rec = Recorder(hold_first=True, fail_on=0)

    async def main():
        b = ContinuousBatcher(rec, thread, max_batch_size=16)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 10)
        later = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        rec.release.set()
        with pytest.raises(ValueError, match="bad job 0"):
            await first
        return await later

    assert run(main()) == "out-1"
    assert rec.batches == [[0], [1]]


def test_on_batch_sees_each_batch_and_a_wrong_result_count_is_an_error(thread):
    seen: list[int] = []

    async def main():
        b = ContinuousBatcher(lambda jobs: ["one"], thread, on_batch=lambda r: seen.append(len(r)))
        assert await b.submit("a") == "one"
        b2 = ContinuousBatcher(lambda jobs: [], thread)
        with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
            await b2.submit("a")

    run(main())
    assert seen == [1]
