"""The pipeline summary's markdown, and the failure alert's trigger (pure parts)."""

from __future__ import annotations

from llmflow import alerts
from llmflow.report import STAGE_ARTIFACTS, summary_markdown


def test_summary_links_made_artifacts_by_id_and_the_rest_by_key():
    links = {
        "finetune-report": "http://ui/artifacts/artifact/1",
        "rollout": "http://ui/artifacts/artifact/2",
    }
    md = summary_markdown("Pipeline: m:v3", ["dataset d", "gate: passed"], links, "http://ui")
    assert md.startswith("## Pipeline: m:v3\n\n- dataset d\n- gate: passed\n")
    assert "- [training report](http://ui/artifacts/artifact/1) `finetune-report`" in md
    assert "- [rollout](http://ui/artifacts/artifact/2) `rollout`" in md
    assert (
        "- [gate decision](http://ui/artifacts/key/gate-decision) `gate-decision` "
        "(latest; not made by this run)"
    ) in md
    assert md.count("\n- [") == len(STAGE_ARTIFACTS)


def test_alert_trigger_fires_on_failed_runs_of_llmflow_flows_only():
    t = alerts.trigger()
    assert t.expect == {
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",
        "prefect.flow-run.TimedOut",
    }
    assert t.posture.value == "Reactive" and t.threshold == 1
    related = t.match_related.root
    assert related["prefect.resource.role"] == "flow"
    assert set(related["prefect.resource.name"]) >= {"pipeline", "finetune", "promote"}
