"""Stack self-check: a few small tasks on the Ray cluster, their logs back in Prefect.

    llmflow run check --config configs/tiny.yaml

Proves the wiring every heavy stage relies on: the flow's tasks run on Ray workers, and
their task runs and log lines reach the same Prefect server as the flow run.
"""

from __future__ import annotations

from prefect import flow

from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.preflight import check_flow
from llmflow.terminal import stage
from tasks.check import where_am_i


@flow(name="check", task_runner=ClusterTaskRunner(), log_prints=True)
def check(config: PipelineConfig = default_config(), tasks: int = 3) -> list[dict]:
    """Run ``tasks`` small tasks on the cluster; return where each ran.

    Stages: where_am_i x tasks (on Ray workers).
    """
    check_flow(config, "check")  # the secrets the run names are set on every node
    where = where_am_i.map(list(range(tasks))).result()
    nodes = {w["ray_node"] for w in where}
    stage("check", f"{len(where)} tasks ran on {len(nodes)} Ray node(s), their logs in Prefect")
    return where
