"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

    llmflow run pipeline --config configs/tiny.yaml [--retrain if-data-changed]
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect_ray.context import remote_options

from flows.promote import promote
from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig, default_config
from llmflow.preflight import check_flow
from llmflow.refs import GateDecision, GateRule
from llmflow.runs import model_slot
from tasks.data import source_files
from tasks.evaluation import champion_model, compare_reports, record_eval, score_model
from tasks.gating import ask_for_approval, gate
from tasks.prepare import base_model, prepare_dataset
from tasks.report import summarize
from tasks.rollout import check_serving
from tasks.training import check_inputs, register_model, train_model, trained_on_same_data

Retrain = Literal["always", "if-data-changed"]


@flow(name="pipeline", task_runner=ClusterTaskRunner(), log_prints=True)
def pipeline(config: PipelineConfig = default_config(), retrain: Retrain = "always") -> dict:
    """Fine-tune and ship a model. At most one pipeline run per model name runs at a time
    (a Prefect concurrency limit); a re-run reuses the stages that finished.

    Stages:
        1. base-model: resolve the base model (the tiny model is built once and kept)
        2. prepare-dataset: load, normalise, validate and version the data (cached)
        3. check-data-changed (retrain=if-data-changed): stop here when the latest version
           was trained on this very dataset (the content hash decides)
        4. train-model (on Ray Train): a finished run of the same inputs is reused, an
           interrupted one resumes from its checkpoint
        5. register-model: a new registry version with its lineage and loss curve (a
           checkpoint already registered returns its version)
        6. score-model: the candidate, then the champion (the base model when there is
           none), on the same eval split with Ray Data (cached); compare-reports
        7. gate: the metric policy, then a human decision in the UI when required
        8. promote (subflow): rolling Serve update, smoke test, champion alias; rollback
        9. summarize: the pipeline-summary artifact, linking every stage's artifacts
    """
    source_files(config.data.source)  # bad inputs fail here, before any cluster work
    check_inputs(config.train, None)
    check_flow(config, "pipeline")
    check_serving(config.serve, config.cluster)
    with model_slot(config.train.model_name):
        model_uri = base_model.submit(config.train).result()
        dataset = prepare_dataset.submit(config.data, model_uri).result()
        if retrain == "if-data-changed":
            latest = trained_on_same_data(config.train, dataset)
            if latest is not None:
                reason = (f"data unchanged: {latest.name}:{latest.version} was trained on "
                          f"dataset {dataset.short_sha}; nothing to retrain")  # fmt: skip
                print(reason)
                summarize(f"Pipeline: {latest.name}: skipped", [reason])
                return {"skipped": reason, "dataset": dataset.model_dump(mode="json"),
                        "model": latest.model_dump(mode="json")}  # fmt: skip
        with remote_options(num_cpus=0, num_gpus=0):  # the trainer's workers hold the resources
            run = train_model.submit(config.train, dataset, model_uri).result()
        candidate = register_model.submit(
            config.train, dataset, model_uri, run, config.model_dump(mode="json")
        ).result()
        champ_uri, champ_version = champion_model(config.train)
        with remote_options(num_cpus=0):  # the scoring actors hold the CPUs
            cand_report = score_model.submit(config.eval, candidate.uri, candidate.version,
                                             dataset, "candidate", config.cluster).result()  # fmt: skip
            champ_report = score_model.submit(config.eval, champ_uri, champ_version,
                                              dataset, "champion", config.cluster).result()  # fmt: skip
        compare_reports(cand_report, champ_report)
        record_eval(candidate, cand_report, champ_version)
        if champ_version == candidate.version:  # a re-run after this version was promoted
            decision = GateDecision(passed=True, rules=[GateRule(
                name="already-champion", passed=True,
                reason=f"{candidate.version} is the champion already: not gated again")])  # fmt: skip
        else:
            decision = gate(config.gate, cand_report, champ_report)
            if config.gate.require_approval:
                decision = ask_for_approval(decision, config.gate.approval_timeout_s)
        promoted = promote(config=config, candidate=candidate, decision=decision, return_state=True)
        rollout = promoted.result(raise_on_failure=False)
        metric = config.gate.primary_metric
        summarize(f"Pipeline: {candidate.name}:{candidate.version}", [
            f"dataset `{dataset.uri}`: {dataset.num_train} train / {dataset.num_eval} eval, "
            f"{dataset.num_quarantined} quarantined",
            f"training: {'reused a finished run, ' if run.reused else ''}loss "
            f"{run.metrics.get('train_loss_first', float('nan')):.3f} -> "
            f"{run.metrics.get('train_loss_last', float('nan')):.3f}",
            f"{metric}: candidate {cand_report.metrics.get(metric, float('nan')):.3f}, champion "
            f"({champ_version}) {champ_report.metrics.get(metric, float('nan')):.3f}",
            (f"gate: {'passed' if decision.passed else 'failed'}: "
             + "; ".join(r.reason for r in decision.rules)),
            (f"rollout: {rollout.message}" if promoted.is_completed()
             else f"rollout {promoted.name}: {promoted.message}"),
        ], [promoted.state_details.flow_run_id])  # fmt: skip
        if not promoted.is_completed():
            promoted.result()  # a rolled-back promotion fails the pipeline, after the summary
    return {
        "dataset": dataset.model_dump(mode="json"),
        "model": candidate.model_dump(mode="json"),
        "candidate": cand_report.metrics,
        "champion": champ_report.metrics,
        "gate_passed": decision.passed,
        "rollout": rollout.model_dump(mode="json"),
    }
