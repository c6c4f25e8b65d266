"""The prepare stage: load, normalise, validate (Great Expectations) and version the data.

llmflow run prepare --config configs/tiny.yaml [--set data.source=PATH]
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.prepare.sources import check_source
from llmflow.refs import DatasetRef
from tasks.prepare import prepare_stage


@flow(name="prepare", task_runner=ClusterTaskRunner(), log_prints=True)
def prepare(config: PipelineConfig = default_config()) -> DatasetRef:
    """Prepare the instruction data of ``config.data`` and return its DatasetRef.

    Stages:
        1. base-model (in the flow's process): resolve the tokenizer's model (as the
           pipeline's)
        2. prepare-dataset (on Ray): load -> normalise -> clean -> split -> validate -> store;
           cached on the source's bytes and the prep config
    """
    check_source(config.data)  # a missing path fails here, before any cluster work
    return prepare_stage(config)[1]
