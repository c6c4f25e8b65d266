"""Drill: the Prefect server killed (SIGKILL) in the middle of a flow run and brought back
by `llmflow up`. The run goes on (the client retries while the server is away), finishes,
and its final state and every task run reach the restarted server (same SQLite database)."""

from __future__ import annotations

import contextvars
import os
import signal
import threading
import time

import pytest

from tests.integration.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N = 16


def test_flow_run_survives_a_prefect_server_restart(stack, prefect_client):
    from prefect import flow, task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from llmflow import stack as stack_mod

    started = threading.Event()
    finished: list[int] = []

    @task(name="restart-drill-step")
    def step(i: int) -> int:
        started.set()
        time.sleep(1.0)  # the work of a step: the run lasts N seconds, the outage falls in it
        finished.append(i)
        return i

    @flow(name="restart-drill")
    def long_flow(n: int) -> int:
        return sum(step(i) for i in range(n))

    out: dict = {}
    # A copy of this context: Prefect's settings (the stack's API URL) live in a contextvar.
    t = threading.Thread(
        target=contextvars.copy_context().run,
        args=(lambda: out.update(state=long_flow(N, return_state=True)),),
    )
    t.start()
    assert started.wait(120)
    # Two steps done first, so the outage falls in the middle of the run.
    wait_for(lambda: len(finished) >= 2, 60, "two task runs finished before the kill")
    server = stack_mod.read_state(stack)["prefect-server"]
    os.kill(server["pid"], signal.SIGKILL)
    assert not stack_mod.prefect_healthy(stack.prefect_api_url, timeout=2)
    t0 = time.monotonic()
    parts = stack_mod.up(stack, with_deploy=False)  # what a user runs: restarts the dead part
    down_s = time.monotonic() - t0
    assert all(p.healthy for p in parts), parts
    t.join(300)

    state = out["state"]
    assert state.is_completed(), state
    assert state.result() == sum(range(N))
    run_id = state.state_details.flow_run_id
    assert prefect_client.read_flow_run(run_id).state.type.value == "COMPLETED"

    # Every task run's final state reached the server too (some while it was away).
    deadline = time.monotonic() + 60
    while True:
        runs = prefect_client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        done = [r for r in runs if r.state and r.state.type.value == "COMPLETED"]
        if len(done) == N or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(done) == N, (
        f"{len(done)} of {N} task runs COMPLETED on the server after a "
        f"{down_s:.0f} s outage: {sorted(r.state.name for r in runs)}"
    )
