"""The finetune stage: supervised fine-tuning on Ray Train, resumable, registered with lineage.

llmflow run finetune --config configs/tiny.yaml [--set train.max_steps=50]
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.finetune.checks import check_inputs
from llmflow.preflight import check_flow
from llmflow.prepare.sources import check_source
from llmflow.refs import DatasetRef, ModelRef
from tasks.finetune import finetune_stage
from tasks.prepare import base_model, prepare_stage


@flow(name="finetune", task_runner=ClusterTaskRunner(), log_prints=True)
def finetune(
    config: PipelineConfig = default_config(), dataset: DatasetRef | None = None
) -> ModelRef:
    """Fine-tune ``config.train.base_model`` on ``dataset`` (prepared here when not given).

    Stages:
        1. base-model (in the flow's process): resolve the base model; the tiny model is built
           once, a hub id copied into the store once per commit
        2. prepare-dataset (only without ``dataset``): as the prepare flow, cached
        3. train-model (on Ray): a TorchTrainer run keyed by its inputs, so a re-run resumes
           from its latest checkpoint; the task itself reserves no CPU or GPU, the trainer's
           workers do (ray issue #32856)
        4. register-model: the final checkpoint as a HF directory, a new registry version with
           its lineage, the loss curve as artifacts
    """
    check_inputs(config.train, dataset)  # bad model or dataset fails here, before cluster work
    check_flow(config, "finetune")  # and workers that could never be placed
    if dataset is None:
        check_source(config.data)
        model_uri, dataset = prepare_stage(config)
    else:
        model_uri = base_model(config.train)  # in the flow's process
    return finetune_stage(config, dataset, model_uri)[1]
