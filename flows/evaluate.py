"""The evaluate stage: batch scoring on Ray Data of a candidate and of the current champion.

llmflow run evaluate --config configs/tiny.yaml   (scores the latest registered version)
"""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from flows.prepare import prepare_stage
from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.evaluate.models import candidate_of, champion_model
from llmflow.preflight import check_flow
from llmflow.prepare.sources import source_files
from llmflow.progress import listening
from llmflow.refs import DatasetRef, EvalReport, ModelRef
from llmflow.runs import flow_run_id
from llmflow.terminal import stage
from tasks.evaluate import compare_reports, score_model


def evaluate_stage(
    config: PipelineConfig, candidate: ModelRef, dataset: DatasetRef
) -> dict[str, EvalReport]:
    """score-model for the candidate, then for the champion; compare-reports."""
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
    compare_reports(reports["candidate"], reports["champion"])
    stage("evaluate", eval_line(reports, config.gate.primary_metric))
    return reports


def eval_line(reports: dict[str, EvalReport], metric: str) -> str:
    cand, champ = reports["candidate"], reports["champion"]
    nan = float("nan")
    return (
        f"{metric} {cand.metrics.get(metric, nan):.3f} (candidate {cand.model_version}) vs "
        f"{champ.metrics.get(metric, nan):.3f} (champion {champ.model_version}) on "
        f"{cand.num_examples} rows, {cand.engine} engine, "
        f"{cand.throughput.get('examples_per_s', 0):.0f} rows/s"
    )


@flow(name="evaluate", task_runner=ClusterTaskRunner(), log_prints=True)
def evaluate(
    config: PipelineConfig = default_config(),
    model: ModelRef | None = None,
    dataset: DatasetRef | None = None,
) -> dict[str, EvalReport]:
    """Score ``model`` (default: the latest version of train.model_name) and the champion
    (the base model when there is none) on the same eval split.

    Stages:
        1. prepare-dataset (only without ``dataset``): cached, as the prepare flow
        2. score-model, candidate then champion (Ray Data; the tasks reserve no CPU, the
           scoring actors do): cached on model version, dataset and eval config
        3. compare-reports: side-by-side table and the ten worst examples
    """
    check_flow(config, "evaluate")  # a missing vLLM environment fails here, in one line
    candidate = candidate_of(model, config.train)
    if dataset is None:
        source_files(config.data.source)
        dataset = prepare_stage(config)[1]
    return evaluate_stage(config, candidate, dataset)
