"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

llmflow run pipeline --config configs/tiny.yaml [--retrain if-data-changed]
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.promote import promote
from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.finetune.checks import check_inputs
from llmflow.preflight import check_flow
from llmflow.prepare.sources import check_source
from llmflow.promote.apps import check_serving
from llmflow.runs import model_slot
from tasks.evaluate import evaluate_stage, record_eval
from tasks.finetune import finetune_stage, trained_on_same_data
from tasks.prepare import prepare_stage
from tasks.promote import gate_stage
from tasks.report import ship, skipped

Retrain = Literal["always", "if-data-changed"]


@flow(name="pipeline", task_runner=ClusterTaskRunner(), log_prints=True)
def pipeline(config: PipelineConfig = default_config(), retrain: Retrain = "always") -> dict:
    """Fine-tune and ship a model. At most one pipeline run per model name runs at a time
    (a Prefect concurrency limit); a re-run reuses the stages that finished.

    Stages:
        1. base-model (in the flow's process): resolve the base model; the tiny model is built
           once, a hub id copied into the store once per commit
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
    check_source(config.data)  # bad inputs fail here, before any cluster work
    check_inputs(config.train, None)
    check_flow(config, "pipeline")
    check_serving(config.serve, config.cluster)
    with model_slot(config.train.model_name):
        model_uri, dataset = prepare_stage(config)
        if retrain == "if-data-changed" and (latest := trained_on_same_data(config.train, dataset)):
            return skipped(dataset, latest)
        run, candidate = finetune_stage(config, dataset, model_uri)
        reports = evaluate_stage(config, candidate, dataset)
        record_eval(candidate, reports["candidate"], reports["champion"].model_version)
        decision = gate_stage(config, candidate, reports)
        promoted = promote(config=config, candidate=candidate, decision=decision, return_state=True)
        return ship(config, dataset, run, candidate, reports, decision, promoted)
