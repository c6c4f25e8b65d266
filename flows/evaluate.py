"""The evaluate stage: batch scoring on Ray Data of a candidate and of the current champion.

llmflow run evaluate --config configs/tiny.yaml   (scores the latest registered version)
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.evaluate.models import candidate_of
from llmflow.preflight import check_flow
from llmflow.prepare.sources import check_source
from llmflow.refs import DatasetRef, EvalReport, ModelRef
from tasks.evaluate import evaluate_stage
from tasks.prepare import prepare_stage


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
        check_source(config.data)
        dataset = prepare_stage(config)[1]
    return evaluate_stage(config, candidate, dataset)
