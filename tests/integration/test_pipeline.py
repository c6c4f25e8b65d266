"""The whole pipeline as users trigger it: the `pipeline` deployment run through the Prefect
API (what the UI's Run button calls) and executed by the stack's worker; a failed run,
re-run, reuses the stages that had finished; `retrain=if-data-changed` skips unchanged data.
"""

from __future__ import annotations

import re

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.config import load_config
from llmflow.store import Store
from tests.integration.helpers import wait_for_logs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "pipe-test"
SETS = ["train.max_steps=40", "train.checkpoint_every=20", "train.eval_every=20",
        "train.warmup_steps=5", "train.seed=7", f"train.model_name={NAME}", "eval.max_examples=64",
        f"serve.app_name={NAME}", "serve.route_prefix=/pipe"]  # fmt: skip
UNSET_KEY = "LLMFLOW_PIPE_TEST_KEY_NOT_SET"  # no replica has it: the new app cannot start


def config(*extra: str):
    return load_config("configs/tiny.yaml", [*SETS, *extra])


def task_states(client, flow_run_id) -> list[tuple[str, str]]:
    """(task name, state name) of one flow run's task runs (not its subflows'), in order."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs.sort(key=lambda r: r.created)
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


@pytest.fixture(scope="module")
def app(stack):
    yield
    from ray import serve

    serve.delete(NAME)  # free its replica's CPU for the tests after this module


def test_deployment_run_fails_at_promote_and_its_rerun_reuses_the_finished_stages(
    stack, prefect_client, app
):
    from prefect.deployments import run_deployment

    # Run 1, on the worker: trains, registers and scores, then the rollout cannot start
    # (the key variable is unset on the cluster): rolled back, the run fails.
    first = run_deployment("pipeline/pipeline", timeout=900, parameters={
        "config": config(f"serve.api_key_env={UNSET_KEY}").model_dump(mode="json")})  # fmt: skip
    assert first.state.is_failed(), first.state
    assert first.work_pool_name == stack.work_pool
    assert "rolled back" in (first.state.message or ""), first.state.message
    states = dict(task_states(prefect_client, first.id))
    assert states["train-model"] == states["register-model"] == "Completed", states
    [v1] = registry.list_versions(Store(), NAME)
    assert aliases.read_aliases(Store(), NAME).get("champion") is None  # alias untouched
    wait_for_logs(prefect_client, first.id, "trained ")

    # Run 2, fixed config: nothing is trained, registered or scored again; v1 is promoted.
    second = run_deployment("pipeline/pipeline", timeout=600,
                            parameters={"config": config().model_dump(mode="json")})  # fmt: skip
    assert second.state.is_completed(), second.state
    states = task_states(prefect_client, second.id)
    assert dict(states)["prepare-dataset"] == "Cached", states
    assert [s for t, s in states if t == "score-model"] == ["Cached", "Cached"], states
    wait_for_logs(prefect_client, second.id, "reused the finished run",
                  f"already registered as {NAME} {v1.version}")  # fmt: skip
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

    [summary] = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["pipeline-summary"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[second.id])))  # fmt: skip
    links = dict(re.findall(r"/artifacts/artifact/([0-9a-f-]{36})\) `([a-z-]+)`", summary.data))
    linked = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=list(links))))
    assert {str(a.id): a.key for a in linked} == links
    assert {"finetune-report", "finetune-loss", "eval-comparison", "gate-decision",
            "rollout"} <= set(links.values()), summary.data  # fmt: skip
    assert "/artifacts/key/dataset-validation-report) `dataset-validation-report` (latest" in summary.data


def test_retrain_if_data_changed_skips_when_the_latest_version_saw_this_data(stack, app):
    from flows.pipeline import pipeline

    versions = registry.list_versions(Store(), NAME)
    assert versions, "runs after the deployment test, which registers pipe-test"
    state = pipeline(config=config(), retrain="if-data-changed", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["model"]["version"] == versions[-1].version
    assert result["skipped"].startswith("data unchanged") and result["dataset"]["sha256"] == versions[-1].dataset_sha256
    assert registry.list_versions(Store(), NAME) == versions  # nothing trained or registered
