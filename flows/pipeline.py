"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

    llmflow run pipeline --config configs/tiny.yaml
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect_ray.context import remote_options

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig, default_config
from flows.promote import promote
from tasks.data import source_files
from tasks.evaluation import champion_model, compare_reports, score_model
from tasks.gating import ask_for_approval, gate
from tasks.prepare import base_model, prepare_dataset
from tasks.training import check_inputs, register_model, train_model


@flow(name="pipeline", task_runner=ClusterTaskRunner(), log_prints=True)
def pipeline(config: PipelineConfig = default_config()) -> dict:
    """Fine-tune and ship a model.

    Stages:
        1. base-model: resolve the base model (the tiny model is built once and kept)
        2. prepare-dataset: load, normalise, validate and version the data (cached)
        3. train-model (on Ray Train; resumes a run of the same inputs from its checkpoint)
        4. register-model: a new registry version with its lineage and loss curve
        5. score-model: the candidate, then the champion (the base model when there is
           none), on the same eval split with Ray Data; compare-reports
        6. gate: the metric policy, then a human decision in the UI when required
        7. promote (subflow): rolling Serve update, smoke test, champion alias; rollback
    """
    source_files(config.data.source)  # bad inputs fail here, before any cluster work
    check_inputs(config.train, None)
    model_uri = base_model.submit(config.train).result()
    dataset = prepare_dataset.submit(config.data, model_uri).result()
    with remote_options(num_cpus=0, num_gpus=0):  # the trainer's workers hold the resources
        run = train_model.submit(config.train, dataset, model_uri).result()
    candidate = register_model.submit(
        config.train, dataset, model_uri, run, config.model_dump(mode="json")
    ).result()
    champ_uri, champ_version = champion_model(config.train)
    with remote_options(num_cpus=0):  # the scoring actors hold the CPUs
        cand_report = score_model.submit(config.eval, candidate.uri, candidate.version,
                                         dataset, "candidate").result()  # fmt: skip
        champ_report = score_model.submit(config.eval, champ_uri, champ_version,
                                          dataset, "champion").result()  # fmt: skip
    compare_reports(cand_report, champ_report)
    decision = gate(config.gate, cand_report, champ_report)
    if config.gate.require_approval:
        decision = ask_for_approval(decision, config.gate.approval_timeout_s)
    rollout = promote(config=config, candidate=candidate, decision=decision)
    create_markdown_artifact(key="pipeline-summary", markdown=(
        f"## Pipeline: {candidate.name}:{candidate.version}\n\n"
        f"- dataset `{dataset.uri}` ({dataset.num_train} train / {dataset.num_eval} eval, "
        f"{dataset.num_quarantined} quarantined): artifact `dataset-validation-report`\n"
        f"- training: loss {run.metrics.get('train_loss_first', float('nan')):.3f} -> "
        f"{run.metrics.get('train_loss_last', float('nan')):.3f}: artifact `finetune-report`\n"
        f"- {config.gate.primary_metric}: candidate "
        f"{cand_report.metrics.get(config.gate.primary_metric, float('nan')):.3f}, champion "
        f"({champ_version}) {champ_report.metrics.get(config.gate.primary_metric, float('nan')):.3f}"
        f": artifacts `eval-comparison`, `eval-worst-examples`\n"
        f"- gate: {'passed' if decision.passed else 'failed'}: artifact `gate-decision`\n"
        f"- rollout: {rollout.message}; endpoint {rollout.endpoint}: artifact `rollout`\n"
    ))  # fmt: skip
    return {
        "dataset": dataset.model_dump(mode="json"),
        "model": candidate.model_dump(mode="json"),
        "candidate": cand_report.metrics,
        "champion": champ_report.metrics,
        "gate_passed": decision.passed,
        "rollout": rollout.model_dump(mode="json"),
    }
