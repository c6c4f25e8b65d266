"""The current Prefect flow run's id: the key of a run's directory, runs/<flow-run-id>/."""

from __future__ import annotations


def flow_run_id() -> str:
    """The running flow run's id (inside a task too), or 'local' outside any flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.id or "local")
