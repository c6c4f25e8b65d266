"""Helpers the integration tests share."""

from __future__ import annotations

import time
from uuid import UUID


def wait_for_logs(client, flow_run_id: UUID, *needles: str, timeout: float = 60) -> list:
    """The flow run's log records once every needle occurs in one of them (logs are shipped
    in batches, so they can trail the run's final state); AssertionError after ``timeout``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        missing = [n for n in needles if not any(n in log.message for log in logs)]
        if not missing:
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(f"not in the logs of flow run {flow_run_id} after {timeout} s: {missing}")
        time.sleep(1)
