"""Point 6 of the foundation: task runs executed on Ray workers land in the flow's Prefect
server, with their log lines."""

from __future__ import annotations

import os
import time

from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from llmflow.config import PipelineConfig
from tests.integration.helpers import settled_task_runs


def test_tasks_on_ray_report_runs_and_logs_to_the_server(stack, prefect_client):
    from flows.check import check

    state = check(config=PipelineConfig(), tasks=3, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    # Each ran in a Ray worker process, not in this one, and knew the server's address.
    assert all(r["pid"] != os.getpid() and r["ray_node"] for r in results)
    assert {r["prefect_api_url"] for r in results} == {stack.prefect_api_url}

    flow_run_id = state.state_details.flow_run_id
    task_runs = settled_task_runs(prefect_client, flow_run_id, count=3)
    assert [tr.state.type.value if tr.state else None for tr in task_runs] == ["COMPLETED"] * 3

    # Logs are shipped in batches: wait for the workers' lines to reach the server.
    wanted = {f"check task {i} on pid" for i in range(3)}
    found: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and found != wanted:
        logs = prefect_client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        task_run_ids = {tr.id for tr in task_runs}
        found = {
            w
            for w in wanted
            for log in logs
            if w in log.message and log.task_run_id in task_run_ids
        }
        time.sleep(1)
    assert found == wanted
