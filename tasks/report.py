"""The pipeline's summary artifact: the lines of llmflow/report.py plus links to the
artifacts the run and its promote subflow made.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import task

from llmflow.report import summary_markdown


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
