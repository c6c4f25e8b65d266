"""Prefect run helpers: the current flow run's id, and the one-run-per-model slot."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
LEASE_S = 60  # the shortest lease Prefect's server grants


def flow_run_id() -> str:
    """The running flow run's id (inside a task too), or 'local' outside any flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.id or "local")


def slot_name(model_name: str, kind: str = "pipeline") -> str:
    """The Prefect global concurrency limit that serialises one model's pipelines (or its
    promotions: a pipeline holds its own slot while its promote subflow takes this one)."""
    return f"llmflow-{kind}-{model_name}"


@contextmanager
def model_slot(
    model_name: str, timeout_s: float | None = None, kind: str = "pipeline"
) -> Iterator[None]:
    """Hold the pipeline slot of ``model_name``: at most one pipeline run per model name at a
    time, whoever started it (UI, schedule, CLI). A second run waits here until the first
    leaves (or ``timeout_s`` passes: TimeoutError).

    The slot is a Prefect global concurrency limit of 1, created on first use (an operator
    may raise it: ``prefect gcl update llmflow-pipeline-<name> --limit 2``). Its lease is
    renewed while the run lives; a run killed outright frees the slot when its lease expires
    (``LEASE_S``, the server's minimum, plus the server's 15 s repossessor pass), instead of
    holding it forever. A failed renewal (say, the server restarting) is logged and the run
    goes on: the slot guards against a second run, it is no reason to stop this one.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    name = slot_name(model_name, kind)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
    log.info("taking the slot %r (one %s run per model at a time)", name, kind)
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=timeout_s,
        strict=True,
        lease_duration=LEASE_S,
        raise_on_lease_renewal_failure=False,
    ):
        yield
