"""Schedules on the session stack: registered paused, so no scheduled run ever starts among
the tests whatever the clock says (a CI run between 00:00 and 01:00 UTC once met the 02:00
Berlin retrain), while the cron, timezone and next run time stay checked."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path

import yaml

from tests.integration.helpers import delete_if_present, wait_for

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC


def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def test_retrain_nightly_is_registered_with_its_cron_timezone_and_next_run(stack, prefect_client):
    from prefect.server.schemas.schedules import CronSchedule

    dep = prefect_client.read_deployment_by_name("pipeline/retrain-nightly")
    [sched] = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert (
        dep.parameters == {"retrain": "if-data-changed"} and dep.work_pool_name == stack.work_pool
    )
    assert not sched.active  # the session stack registers every schedule paused
    assert _runs_of(prefect_client, dep.id) == []
    # The next run, as the server's own schedule model computes it, from fixed instants: the
    # same answer whenever the tests run. 02:00 Berlin is 01:00 UTC in winter, 00:00 in summer.
    server_schedule = CronSchedule(cron=sched.schedule.cron, timezone=sched.schedule.timezone)
    for start, expected in [
        (dt.datetime(2026, 12, 2, 0, 12, tzinfo=UTC), dt.datetime(2026, 12, 2, 1, 0, tzinfo=UTC)),
        (dt.datetime(2026, 12, 2, 1, 0, 1, tzinfo=UTC), dt.datetime(2026, 12, 3, 1, 0, tzinfo=UTC)),
        (dt.datetime(2026, 7, 1, 23, 30, tzinfo=UTC), dt.datetime(2026, 7, 2, 0, 0, tzinfo=UTC)),
        # The night clocks go forward (29 March 2026): 02:00 does not exist in Berlin.
        (dt.datetime(2026, 3, 28, 12, 0, tzinfo=UTC), dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
    ]:
        [next_run] = asyncio.run(server_schedule.get_dates(n=1, start=start))
        assert next_run == expected, (start, next_run)


def _deployment(nightly: dict, name: str, work_pool: dict) -> dict:
    """retrain-nightly's shape with a cron that is due within a minute, whatever the time."""
    [schedule] = nightly["schedules"]
    return {
        **nightly,
        "name": name,
        "work_pool": work_pool,
        "schedules": [{**schedule, "cron": "* * * * *", "active": True}],
    }


def test_a_schedule_due_within_the_session_starts_no_run_on_the_test_stack(
    stack, prefect_client, tmp_path
):
    """The session stack's deploy step (stack.deploy under LLMFLOW_PAUSE_SCHEDULES=1) with a
    schedule due every minute: it succeeds, and no run is created or started. A control, the
    same deployment registered active on a pool with no worker, gets its scheduled runs in the
    same time: the scheduler was running, so the paused one's silence proves something."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from llmflow import stack as stack_mod

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [nightly] = [d for d in doc["deployments"] if d["name"] == "retrain-nightly"]
    idle_pool = "llmflow-test-no-worker"
    prefect_client.create_work_pool(WorkPoolCreate(name=idle_pool, type="process"), overwrite=True)

    def write(name: str, work_pool: dict) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump({**doc, "deployments": [_deployment(nightly, name, work_pool)]})
        )
        return path

    assert stack.pause_schedules  # the session fixture's setting
    stack_mod.deploy(stack, prefect_file=write("due-every-minute", nightly["work_pool"]))
    control_settings = dataclasses.replace(stack, pause_schedules=False)
    stack_mod.deploy(
        control_settings, prefect_file=write("due-every-minute-control", {"name": idle_pool})
    )
    due = prefect_client.read_deployment_by_name("pipeline/due-every-minute")
    control = prefect_client.read_deployment_by_name("pipeline/due-every-minute-control")
    try:
        assert due.work_pool_name == stack.work_pool  # the pool the session's worker polls
        assert [s.active for s in due.schedules] == [False]
        assert [s.active for s in control.schedules] == [True]
        control_runs = wait_for(
            lambda: _runs_of(prefect_client, control.id),
            90,
            "the scheduler to create the control's runs",
        )
        soon = dt.datetime.now(UTC) + dt.timedelta(minutes=2)
        assert any(r.expected_start_time <= soon for r in control_runs)  # due within the window
        assert _runs_of(prefect_client, due.id) == []  # none created, so none started
    finally:
        for dep in (due, control):
            delete_if_present(
                prefect_client.delete_deployment, dep.id, what=f"deployment {dep.name}"
            )
        delete_if_present(prefect_client.delete_work_pool, idle_pool, what=f"work pool {idle_pool}")
