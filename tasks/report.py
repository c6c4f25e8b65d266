"""The pipeline's summary: one markdown artifact that links each stage's own artifacts.

`summary_markdown` is pure (tested without a server); `summarize` finds the artifacts the
run and its promote subflow made and publishes the summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from prefect import task

# (artifact key, what it shows), in pipeline order.
STAGE_ARTIFACTS = (
    ("dataset-validation-report", "data validation (Great Expectations)"),
    ("finetune-report", "training report"),
    ("finetune-loss", "loss curve"),
    ("eval-comparison", "candidate vs champion"),
    ("eval-worst-examples", "worst examples"),
    ("gate-decision", "gate decision"),
    ("rollout", "rollout"),
)


def summary_markdown(title: str, lines: Iterable[str], links: dict[str, str], ui_url: str) -> str:
    """The summary: ``lines`` (one per stage), then a link to every stage artifact. An
    artifact this run did not make (a cached stage made it earlier) links to the newest
    artifact of its key."""
    out = [f"## {title}", "", *[f"- {line}" for line in lines], "", "### Stage artifacts", ""]
    for key, what in STAGE_ARTIFACTS:
        if key in links:
            out.append(f"- [{what}]({links[key]}) `{key}`")
        else:
            out.append(f"- [{what}]({ui_url}/artifacts/key/{key}) `{key}` (latest; not made by this run)")
    return "\n".join(out)


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
