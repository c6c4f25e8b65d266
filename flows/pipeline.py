"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

    llmflow run pipeline --config configs/tiny.yaml

Stages land one issue at a time; this flow runs the ones that exist (prepare).
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig, default_config
from tasks.data import source_files
from tasks.prepare import base_model, prepare_dataset


@flow(name="pipeline", task_runner=ClusterTaskRunner(), log_prints=True)
def pipeline(config: PipelineConfig = default_config()) -> dict:
    """Fine-tune and ship a model.

    Stages:
        1. base-model: resolve the base model (the tiny model is built once and kept)
        2. prepare-dataset: load, normalise, validate and version the data (cached)
    """
    source_files(config.data.source)  # a missing path fails here, before any cluster work
    model_uri = base_model.submit(config.train).result()
    dataset = prepare_dataset.submit(config.data, model_uri).result()
    return {"base_model": model_uri, "dataset": dataset.model_dump(mode="json")}
