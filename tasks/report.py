"""The pipeline's summary artifact: the lines of llmflow/report.py plus links to the
artifacts the run and its promote subflow made.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import task
from prefect.states import Completed, State

from llmflow.config import PipelineConfig
from llmflow.errors import NOT_PROMOTED
from llmflow.refs import DatasetRef, EvalReport, GateDecision, ModelRef, TrainRun
from llmflow.report import pipeline_lines, summary_markdown


def artifact_links(flow_run_ids: list[UUID], ui_url: str) -> dict[str, str]:
    """key -> UI address of the newest artifact of that key made by these flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
    links: dict[str, str] = {}
    for a in sorted(artifacts, key=lambda a: a.created):
        if a.key:
            links[a.key] = f"{ui_url}/artifacts/artifact/{a.id}"
    return links


@task(name="summarize")
def summarize(title: str, lines: list[str], subflow_run_ids: list[Any] = ()) -> str:
    """Publish the `pipeline-summary` artifact of the running flow; returns its markdown."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or ""
    ids = [UUID(str(i)) for i in [flow_run.id, *subflow_run_ids] if i]
    markdown = summary_markdown(title, lines, artifact_links(ids, ui), ui)
    create_markdown_artifact(key="pipeline-summary", markdown=markdown)
    return markdown


def ship(
    config: PipelineConfig,
    dataset: DatasetRef,
    run: TrainRun,
    candidate: ModelRef,
    reports: dict[str, EvalReport],
    decision: GateDecision,
    promoted: Any,
) -> dict | State:
    """After the promote subflow (its final state ``promoted``): the pipeline-summary
    artifact, then the pipeline's result; a rolled-back promotion fails the pipeline, after
    the summary, and a refused candidate ends it Completed but named NotPromoted (the result
    as its data)."""
    rollout = promoted.result(raise_on_failure=False)
    outcome = (
        f"rollout: {rollout.message}"
        if promoted.is_completed()
        else f"rollout {promoted.name}: {promoted.message}"
    )
    metric = config.gate.primary_metric
    lines = pipeline_lines(
        dataset, run, metric, reports["candidate"], reports["champion"], decision, outcome
    )
    title = f"Pipeline: {candidate.name}:{candidate.version}"
    summarize(title, lines, [promoted.state_details.flow_run_id])
    promoted.result()
    result = {
        "dataset": dataset.model_dump(mode="json"),
        "model": candidate.model_dump(mode="json"),
        "candidate": reports["candidate"].metrics,
        "champion": reports["champion"].metrics,
        "gate_passed": decision.passed,
        "rollout": rollout.model_dump(mode="json"),
    }
    if decision.passed:
        return result
    # Completed (a refusal is an outcome, not an error: no failure alert on a schedule), but
    # named so that the UI's run list, `llmflow run`'s exit code and a caller all see it.
    refused = "; ".join(r.reason for r in decision.rules if not r.passed)
    message = f"not promoted: the gate refused {candidate.name}:{candidate.version}: {refused}"
    return Completed(name=NOT_PROMOTED, message=message, data=result)


def skipped(dataset: DatasetRef, latest: ModelRef) -> dict:
    """The outcome of a retrain=if-data-changed run whose data did not change."""
    reason = (
        f"data unchanged: {latest.name}:{latest.version} was trained on dataset "
        f"{dataset.short_sha}; nothing to retrain"
    )
    print(reason)
    summarize(f"Pipeline: {latest.name}: skipped", [reason])
    return {
        "skipped": reason,
        "dataset": dataset.model_dump(mode="json"),
        "model": latest.model_dump(mode="json"),
    }
