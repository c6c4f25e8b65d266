"""Prefect tasks of the evaluate stage: score a model with Ray Data
(llmflow/evaluate/scoring.py), cached on its inputs; record the candidate's metrics in its
lineage; publish the candidate-vs-champion comparison.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import task
from prefect_ray.context import remote_options

from llmflow import registry
from llmflow.config import ClusterConfig, EvalConfig, GateConfig, PipelineConfig
from llmflow.evaluate.metrics import metric_directions
from llmflow.evaluate.models import champion_model
from llmflow.progress import listening
from llmflow.refs import Comparison, DatasetRef, EvalReport, ModelRef
from llmflow.runs import flow_run_id
from llmflow.store import Store
from llmflow.terminal import stage


def _score_cache_key(context, parameters: dict[str, Any]) -> str:
    """Same weights (uri + version) on the same dataset with the same eval config: same report."""
    eval_cfg: EvalConfig = parameters["eval_cfg"]
    blob = json.dumps(
        {
            "model": parameters["model_uri"],
            "version": parameters["model_version"],
            "dataset": parameters["dataset"].sha256,
            "eval": eval_cfg.model_dump(mode="json"),
            "store": Store().root,
        },
        sort_keys=True,
    )
    return "score-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


@task(name="score-model", cache_key_fn=_score_cache_key, persist_result=True)
def score_model(
    eval_cfg: EvalConfig,
    model_uri: str,
    model_version: str,
    dataset: DatasetRef,
    label: str,
    cluster: ClusterConfig | None = None,
) -> EvalReport:
    """Generate on the eval split with the configured engine and score it."""
    from prefect import get_run_logger

    from llmflow.evaluate.scoring import score_dataset

    out = Store().uri("runs", flow_run_id(), "eval", label)
    report = score_dataset(
        eval_cfg,
        model_uri,
        dataset.uri,
        out,
        model_version=model_version,
        dataset_sha256=dataset.sha256,
        cluster=cluster,
        progress_run=flow_run_id(),  # the terminal's bar of scored rows (llmflow.progress)
        progress_key=f"score-{label}",
    )
    get_run_logger().info(
        "%s %s: %s", label, model_version, {k: round(v, 4) for k, v in report.metrics.items()}
    )
    return report


@task(name="record-eval")
def record_eval(candidate: ModelRef, report: EvalReport, champion_version: str) -> None:
    """The candidate's eval metrics into its lineage manifest (`llmflow models list` and
    /v1/models show them)."""
    registry.annotate(
        Store(),
        candidate.name,
        candidate.version,
        eval={
            "metrics": {k: round(v, 6) for k, v in report.metrics.items()},
            "engine": report.engine,
            "dataset_sha256": report.dataset_sha256,
            "num_examples": report.num_examples,
            "against": champion_version,
            # Its per-row scores: `llmflow models diff` pairs two versions' rows.
            "predictions_uri": report.predictions_uri,
        },
    )


@task(name="compare-reports")
def compare_reports(
    candidate: EvalReport, champion: EvalReport, gate: GateConfig, directions: dict[str, str]
) -> Comparison | None:
    """The two models row by row (paired intervals at gate.confidence), as Prefect artifacts:
    the side-by-side table, the examples the candidate won and lost on the gate's metric, and
    its ten worst examples."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from llmflow.evaluate.compare import changes_markdown, comparison_rows, worst_examples
    from llmflow.evaluate.metrics import LOWER
    from llmflow.evaluate.paired import benchmark_rows, compare, read_predictions

    cand_rows = read_predictions(candidate.predictions_uri)
    comparison = None
    if champion.predictions_uri:
        # Every per-row score: the eval split's and the benchmark documents'.
        cand_all = cand_rows + benchmark_rows(candidate)
        champ_all = read_predictions(champion.predictions_uri) + benchmark_rows(champion)
        comparison = compare(
            cand_all,
            champ_all,
            directions,
            gate.confidence,
            candidate_version=candidate.model_version,
            champion_version=champion.model_version,
        )
        metric = gate.primary_metric
        lower = directions.get(metric) == LOWER
        if (paired := comparison.metrics.get(metric)) and paired.low is not None:
            from prefect import get_run_logger

            get_run_logger().info(
                "%d paired rows resolve %s to about +-%.3g at %.0f%% confidence (half the "
                "interval's width): a smaller true difference cannot pass the gate",
                paired.num_pairs,
                metric,
                (paired.high - paired.low) / 2,
                gate.confidence * 100,
            )
        create_markdown_artifact(
            key="eval-changes",
            markdown=changes_markdown(cand_all, champ_all, metric, lower, k=5),
            description=f"where candidate {candidate.model_version} and champion "
            f"{champion.model_version} differ most on {metric}",
        )
    create_table_artifact(
        key="eval-comparison",
        table=comparison_rows(candidate, champion, comparison),
        description=f"candidate {candidate.model_version} vs champion "
        f"{champion.model_version} on dataset {candidate.dataset_sha256[:16]}",
    )
    create_markdown_artifact(key="eval-worst-examples", markdown=worst_examples(cand_rows, k=10))
    return comparison


@task(name="judge-answers")
def judge_answers(
    eval_cfg: EvalConfig, cluster: ClusterConfig, candidate: EvalReport, champion: EvalReport
) -> tuple[EvalReport, EvalReport]:
    """eval.judge on the two models' answers (Ray Data: a vLLM judge model or an HTTP
    endpoint): both reports gain the judge metric, their predictions the judge column; the
    raw verdicts are kept in the store and the unparseable ones counted."""
    import os

    from prefect import get_run_logger

    from llmflow.evaluate import judge
    from llmflow.evaluate.paired import read_predictions

    cfg = eval_cfg.judge
    requests = judge.judge_requests(
        read_predictions(candidate.predictions_uri), read_predictions(champion.predictions_uri), cfg
    )
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    verdicts = judge.ask_judge(requests, cfg, eval_cfg, cluster, key)
    out = Store().uri("runs", flow_run_id(), "eval", "judge")
    cand, champ = judge.judged_reports(candidate, champion, verdicts, cfg.mode, out)
    unparseable = int(cand.metrics[judge.UNPARSEABLE])
    get_run_logger().info(
        "judge %s (%s, %s): %d verdicts, %d unparseable; candidate %.3f, champion %.3f; raw "
        "verdicts in %s",
        cfg.model,
        cfg.engine,
        cfg.mode,
        len(verdicts),
        unparseable,
        cand.metrics[judge.JUDGE],
        champ.metrics[judge.JUDGE],
        f"{out}/{judge.VERDICTS_FILE}",
    )
    return cand, champ


def _benchmarks_cache_key(context, parameters: dict[str, Any]) -> str:
    """The same weights under the same tasks and engine settings: the same scores."""
    eval_cfg: EvalConfig = parameters["eval_cfg"]
    report: EvalReport = parameters["report"]
    blob = json.dumps(
        {
            "model": report.model_uri,
            "version": report.model_version,
            "eval": eval_cfg.model_dump(mode="json", exclude={"judge"}),
            "store": Store().root,
        },
        sort_keys=True,
    )
    return "benchmarks-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


@task(name="run-benchmarks", cache_key_fn=_benchmarks_cache_key, persist_result=True)
def run_benchmarks(
    eval_cfg: EvalConfig, cluster: ClusterConfig, report: EvalReport, label: str
) -> EvalReport:
    """eval.benchmarks (lm-evaluation-harness tasks) on the report's model with the eval
    engine: the report gains ``<task>/<metric>`` metrics and its documents' rows."""
    from prefect import get_run_logger

    from llmflow.evaluate import benchmarks

    metrics, rows, directions = benchmarks.run_benchmarks(
        eval_cfg.benchmarks, eval_cfg, report.model_uri, cluster
    )
    out = ("runs", flow_run_id(), "eval", "benchmarks", label, benchmarks.BENCHMARKS_FILE)
    uri = Store().write_parquet(rows, *out)
    get_run_logger().info(
        "%s %s benchmarks: %s",
        label,
        report.model_version,
        {k: round(v, 4) for k, v in metrics.items()},
    )
    return report.model_copy(
        update={
            "metrics": {**report.metrics, **metrics},
            "benchmarks_uri": uri,
            "directions": {**report.directions, **directions},
        }
    )


def evaluate_stage(
    config: PipelineConfig, candidate: ModelRef, dataset: DatasetRef
) -> dict[str, EvalReport]:
    """score-model for the candidate, then for the champion; run-benchmarks
    (eval.benchmarks) and judge-answers (eval.judge) for both; compare-reports."""
    champ_uri, champ_version = champion_model(config.train)
    models = {
        "candidate": (candidate.uri, candidate.version),
        "champion": (champ_uri, champ_version),
    }
    reports = {}
    # One after the other: two Ray Data jobs at once would each hold their actors' CPUs and
    # could starve each other's read tasks on a small cluster.
    with listening(flow_run_id()) as rows, remote_options(num_cpus=0):  # actors hold the CPUs
        for label, (uri, version) in models.items():
            future = score_model.submit(config.eval, uri, version, dataset, label, config.cluster)
            reports[label] = rows.wait(future, f"score-{label}", label)
    if config.eval.benchmarks is not None:  # the harness's tasks join both reports
        for label in ("candidate", "champion"):
            reports[label] = run_benchmarks(config.eval, config.cluster, reports[label], label)
    if config.eval.judge is not None:  # the judge metric joins both reports
        reports["candidate"], reports["champion"] = judge_answers(
            config.eval, config.cluster, reports["candidate"], reports["champion"]
        )
    directions = metric_directions(config.eval.extra_metrics, reports.values())
    comparison = compare_reports(reports["candidate"], reports["champion"], config.gate, directions)
    stage("evaluate", eval_line(reports, config.gate, comparison))
    return reports


def eval_line(
    reports: dict[str, EvalReport], gate: GateConfig, comparison: Comparison | None = None
) -> str:
    cand, champ = reports["candidate"], reports["champion"]
    metric, nan = gate.primary_metric, float("nan")
    paired = comparison.metrics.get(metric) if comparison else None
    return (
        f"{metric} {cand.metrics.get(metric, nan):.3f} (candidate {cand.model_version}) vs "
        f"{champ.metrics.get(metric, nan):.3f} (champion {champ.model_version})"
        + (f": {paired.interval(gate.confidence)}" if paired else "")
        + f" on {cand.num_examples} rows, {cand.engine} engine, "
        f"{cand.throughput.get('examples_per_s', 0):.0f} rows/s"
    )
