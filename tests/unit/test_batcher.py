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


def submit_while_first_is_held(rec: Recorder, batcher: ContinuousBatcher, later: int) -> list:
    """Job 0, held in its batch until jobs 1..``later`` are queued; then each job's result,
    or its exception, in submission order."""

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 10)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, later + 1)]
        await asyncio.sleep(0.05)  # all of them queue while the first batch is held
        rec.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    return run(main())


def test_requests_that_queue_during_a_batch_form_the_next_batch(thread):
    rec = Recorder(hold_first=True)
    results = submit_while_first_is_held(rec, ContinuousBatcher(rec, thread, 16), 5)
    assert results == [f"out-{i}" for i in range(6)]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]


def test_a_batch_holds_at_most_max_batch_size_in_arrival_order(thread):
    rec = Recorder(hold_first=True)
    results = submit_while_first_is_held(rec, ContinuousBatcher(rec, thread, 4), 10)
    assert results == [f"out-{i}" for i in range(11)]
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_jobs_with_different_keys_never_share_a_batch(thread):
    rec = Recorder(hold_first=True)
    batcher = ContinuousBatcher(rec, thread, 16, key=lambda j: j % 2)
    assert submit_while_first_is_held(rec, batcher, 6) == [f"out-{i}" for i in range(7)]
    # The oldest waiting job's key goes first: 1 (odd) before the even ones queued after it.
    assert rec.batches == [[0], [1, 3, 5], [2, 4, 6]]


def test_a_failed_batch_fails_its_own_requests_and_the_next_batch_is_served(thread):
    rec = Recorder(hold_first=True, fail_on=0)
    failed, served = submit_while_first_is_held(rec, ContinuousBatcher(rec, thread, 16), 1)
    assert isinstance(failed, ValueError) and str(failed) == "bad job 0"
    assert served == "out-1"
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
