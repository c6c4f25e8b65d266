"""The end-to-end pipeline: prepare -> finetune -> evaluate -> gate -> promote.

    llmflow run pipeline --config configs/tiny.yaml

Stages land one issue at a time; this flow runs the ones that exist.
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from tasks.check import where_am_i


@flow(name="pipeline", task_runner=ClusterTaskRunner(), log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """Fine-tune and ship a model.

    Stages:
        1. check the cluster (a task on Ray reports where it ran)
    """
    where = where_am_i.submit(0).result()
    return {"cluster_check": where}
