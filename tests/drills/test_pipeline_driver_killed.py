"""Drill: the flow's driver process killed after fine-tuning. A `pipeline` deployment run,
triggered through the Prefect API (what the UI's Run button calls) and run by the stack's
worker, is SIGKILLed once it has trained, registered and scored its candidate; the re-run
waits for the dead run's slot, reuses every stage that had finished and completes.
"""

from __future__ import annotations

import re

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import (
    kill_flow_process,
    task_states,
    unserve,
    wait_for,
    wait_for_logs,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "pipe-test"
SETS = [
    "train.max_steps=40",
    "train.checkpoint_every=20",
    "train.eval_every=20",
    "train.warmup_steps=5",
    "train.seed=7",
    f"train.model_name={NAME}",
    "eval.max_examples=64",
    # 40 steps answer no row exactly, as the base: the lowered loss passes the gate.
    "gate.primary_metric=eval_loss",
    f"serve.app_name={NAME}",
    "serve.route_prefix=/pipe",
]


def config(*extra: str):
    return load_config("configs/tiny.yaml", [*SETS, *extra])


@pytest.fixture(scope="module")
def app(stack):
    yield
    unserve(NAME, NAME)  # free its replica's CPU for the tests after this module


def test_pipeline_killed_mid_run_is_rerun_reusing_the_finished_stages(stack, prefect_client, app):
    from prefect.deployments import run_deployment

    params = {"config": config().model_dump(mode="json")}
    # Run 1, triggered through the API (what the UI's Run button calls), on the worker:
    # killed outright once it has trained, registered and scored the candidate.
    first = run_deployment("pipeline/pipeline", timeout=0, parameters=params)

    def candidate_scored() -> bool:
        run = prefect_client.read_flow_run(first.id)
        assert not run.state.is_final(), f"run 1 ended before the kill: {run.state}"
        return [s for t, s in task_states(prefect_client, first.id) if t == "score-model"][:1] == [
            "Completed"
        ]

    wait_for(candidate_scored, 900, "run 1 scored its candidate")
    assert prefect_client.read_flow_run(first.id).work_pool_name == stack.work_pool
    kill_flow_process(prefect_client, first.id)
    crashed = wait_for(
        lambda: (r := prefect_client.read_flow_run(first.id)).state.is_final() and r,
        120,
        "the worker reports run 1 ended",
    )
    assert crashed.state.is_crashed(), crashed.state
    states = dict(task_states(prefect_client, first.id))
    assert states["train-model"] == states["register-model"] == "Completed", states
    [v1] = registry.list_versions(Store(), NAME)
    assert aliases.read_aliases(Store(), NAME).get("champion") is None
    wait_for_logs(prefect_client, first.id, "trained ")

    # Run 2, the same parameters: it waits for run 1's slot to expire, then trains, registers
    # and scores the candidate no more; it scores the champion, gates and promotes v1.
    second = run_deployment("pipeline/pipeline", timeout=900, parameters=params)
    assert second.state.is_completed(), second.state
    states = task_states(prefect_client, second.id)
    assert dict(states)["prepare-dataset"] == "Cached", states
    assert next(s for t, s in states if t == "score-model") == "Cached", states
    wait_for_logs(
        prefect_client,
        second.id,
        "reused the finished run",
        f"already registered as {NAME} {v1.version}",
    )
    assert [v.version for v in registry.list_versions(Store(), NAME)] == [v1.version]
    assert aliases.read_aliases(Store(), NAME)["champion"] == v1.version
    health = httpx.get(f"{stack.serve_url}/pipe/health", timeout=30).json()
    assert health["version"] == v1.version

    # Its summary links the stage artifacts: those it made by id, the cached stage's by key.
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterId,
        ArtifactFilterKey,
    )

    [summary] = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pipeline-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[second.id]),
        )
    )
    links = dict(re.findall(r"/artifacts/artifact/([0-9a-f-]{36})\) `([a-z-]+)`", summary.data))
    linked = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=list(links)))
    )
    assert {str(a.id): a.key for a in linked} == links
    assert {
        "finetune-report",
        "finetune-loss",
        "eval-comparison",
        "eval-changes",
        "gate-decision",
        "rollout",
    } <= set(links.values()), summary.data
    assert (
        "/artifacts/key/dataset-validation-report) `dataset-validation-report` (latest"
        in summary.data
    )
