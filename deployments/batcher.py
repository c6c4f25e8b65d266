"""Continuous batching for the hf Serve replica: a batch starts as soon as the model is free,
with every request that queued up while the previous batch generated.

Why not `@serve.batch`: it closes a batch `batch_wait_timeout_s` after its first request and
then queues the closed batch behind the one generating, so under load it formed many small
batches in a row (measured on 2 cores at 32 concurrent clients: 236 of 448 batches held one
request, the median two; bench/RESULTS.md). Here the batch is formed when the model thread
frees up, so its size follows the arrival rate times the generation time, as in vLLM's and
TGI's schedulers, and a lone request on an idle replica starts at once (no fixed wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class ContinuousBatcher(Generic[Job, Result]):
    """Queue jobs; one loop runs them in batches of at most ``max_batch_size`` on ``executor``.

    Args:
        run_batch: generates a list of jobs, returns one result each (in order); it runs on
            ``executor`` (the replica's one model thread), never on the event loop.
        executor: where ``run_batch`` runs.
        max_batch_size: the most jobs in one call.
        wait_s: how long an idle model waits for more jobs once the first arrives (0: start
            at once; under load the queue fills while the previous batch generates anyway).
        key: jobs with different keys never share a batch (e.g. sampling settings); a batch
            takes the first job's key and the queued jobs with the same key, in order.
        on_batch: called on the event loop with each generated batch's results (metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], Sequence[Result]],
        executor: Executor,
        max_batch_size: int = 16,
        wait_s: float = 0.0,
        key: Callable[[Job], object] = lambda job: None,
        on_batch: Callable[[Sequence[Result]], None] | None = None,
    ):
        self.run_batch, self.executor, self.key = run_batch, executor, key
        self.max_batch_size, self.wait_s, self.on_batch = max(1, max_batch_size), wait_s, on_batch
        self._pending: list[tuple[Job, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, job: Job) -> Result:
        """The result of ``job``, generated in the next batch it fits in."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            # Started on the loop that serves requests (the replica's constructor may run on
            # another one).
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
        future: asyncio.Future = loop.create_future()
        self._pending.append((job, future))
        self._arrived.set()
        return await future

    def _take(self) -> list[tuple[Job, asyncio.Future]]:
        """The next batch: the oldest job and the queued ones sharing its key."""
        first_key = self.key(self._pending[0][0])
        batch, rest = [], []
        for item in self._pending:
            if len(batch) < self.max_batch_size and self.key(item[0]) == first_key:
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not self._pending:
                self._arrived.clear()
            batch = [(job, fut) for job, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(
                    self.executor, self.run_batch, [job for job, _ in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
            if self.on_batch is not None:
                self.on_batch(results)
