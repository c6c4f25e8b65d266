"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

    llmflow run pipeline --config configs/tiny.yaml

Stages land one issue at a time; this flow runs the ones that exist (prepare, finetune).
"""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig, default_config
from tasks.data import source_files
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
    """
    source_files(config.data.source)  # a missing path fails here, before any cluster work
    check_inputs(config.train, None)
    model_uri = base_model.submit(config.train).result()
    dataset = prepare_dataset.submit(config.data, model_uri).result()
    with remote_options(num_cpus=0, num_gpus=0):  # the trainer's workers hold the resources
        run = train_model.submit(config.train, dataset, model_uri).result()
    model = register_model.submit(
        config.train, dataset, model_uri, run, config.model_dump(mode="json")
    ).result()
    return {
        "base_model": model_uri,
        "dataset": dataset.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
    }
