"""The pipeline's summary: one line per stage, then a link to every stage's own artifact.

Pure (tested without a server); tasks/report.py finds the artifacts and publishes it.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmflow.refs import DatasetRef, EvalReport, GateDecision, TrainRun

# (artifact key, what it shows), in pipeline order.
STAGE_ARTIFACTS = (
    ("dataset-validation-report", "data validation (Great Expectations)"),
    ("finetune-report", "training report"),
    ("finetune-loss", "loss curve"),
    ("eval-comparison", "candidate vs champion, with intervals"),
    ("eval-changes", "examples won and lost against the champion"),
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
            out.append(
                f"- [{what}]({ui_url}/artifacts/key/{key}) `{key}` (latest; not made by this run)"
            )
    return "\n".join(out)


def pipeline_lines(
    dataset: DatasetRef,
    run: TrainRun,
    metric: str,
    candidate: EvalReport,
    champion: EvalReport,
    decision: GateDecision,
    rollout: str,
) -> list[str]:
    """The summary's lines: dataset, training, the gate's metric for both models, the
    gate's reasons, the rollout's outcome."""
    nan = float("nan")
    reused = "reused a finished run, " if run.reused else ""
    return [
        (
            f"dataset `{dataset.uri}`: {dataset.num_train} train / {dataset.num_eval} eval, "
            f"{dataset.num_quarantined} quarantined"
        ),
        (
            f"training: {reused}loss {run.metrics.get('train_loss_first', nan):.3f} -> "
            f"{run.metrics.get('train_loss_last', nan):.3f}"
        ),
        (
            f"{metric}: candidate {candidate.metrics.get(metric, nan):.3f}, champion "
            f"({champion.model_version}) {champion.metrics.get(metric, nan):.3f}"
        ),
        f"gate: {'passed' if decision.passed else 'failed'}: "
        + "; ".join(r.reason for r in decision.rules),
        rollout,
    ]
