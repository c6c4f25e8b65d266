"""What can be checked of a config before any cluster work: one clear line, exit 2.

`llmflow run` calls it before it brings the stack up; the flows call it first thing, so a
run started from the UI or a schedule fails the same way, before training starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmflow.errors import ConfigError

if TYPE_CHECKING:
    from llmflow.config import PipelineConfig

log = logging.getLogger(__name__)

# The stages whose settings each flow uses.
FLOW_STAGES = {"pipeline": ("eval", "serve"), "evaluate": ("eval",), "promote": ("serve",)}
TRAINS = ("pipeline", "finetune")


def check_config(config: PipelineConfig, flow: str) -> None:
    """Engine environments (vLLM's for a vllm engine, LlamaFactory's for
    ``train.backend: llamafactory``: present, with the cluster's Ray and Python), and the
    extra metrics (importable, no clash with a built-in) of the stages ``flow`` runs.
    Raises ConfigError."""
    from llmflow.engines import check_engines

    stages = FLOW_STAGES.get(flow, ())
    if flow in TRAINS and config.train.backend == "llamafactory":
        from llmflow import engine_env

        bundle = {"GPU": 1.0} if config.train.use_gpu else {"CPU": 1.0}
        engine_env.check(config.cluster, "train.backend", [bundle], engine_env.LLAMAFACTORY)
    check_engines(config, stages)
    if "eval" in stages:
        from llmflow.evaluate.metrics import load_metrics, metric_directions

        load_metrics(config.eval.extra_metrics)
        if flow == "pipeline":  # the gate: each metric it names declares its direction
            from llmflow.promote.gate import check_directions

            check_directions(config.gate, metric_directions(config.eval.extra_metrics))


def bundles_on_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many copies of ``bundle`` a node's total ``resources`` hold at once."""
    return int(min(resources.get(k, 0.0) / v for k, v in bundle.items()) + 1e-9)


def describe_nodes(keys, alive: Sequence[dict[str, float]]) -> str:
    """'4 CPU, 0 GPU; 8 CPU, 1 GPU': each alive node's totals of ``keys``."""
    return "; ".join(", ".join(f"{r.get(k, 0.0):g} {k}" for k in keys) for r in alive)


def check_resources(config: PipelineConfig, flow: str, nodes: Sequence[dict[str, Any]]) -> None:
    """Whether the alive ``nodes`` (``ray.nodes()`` entries) could ever hold what the stages
    of ``flow`` ask for: every training worker at once, one scoring actor or vLLM replica,
    one Serve replica. Other jobs' usage is not counted: this catches what can never run,
    not what must wait. Raises ConfigError naming the key."""
    stages = FLOW_STAGES.get(flow, ())
    if flow in TRAINS:
        from llmflow.finetune.checks import InsufficientResources, check_placeable

        try:
            check_placeable(config.train, nodes)
        except InsufficientResources as exc:
            raise ConfigError(str(exc)) from exc
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    gpus = any(r.get("GPU", 0) > 0 for r in alive)
    for stage in stages:
        section = getattr(config, stage)
        if section.engine == "vllm":
            key, bundles = f"{stage}.vllm_placement", section.vllm_placement or [{"GPU": 1.0}]
        elif stage == "eval":  # hf: one actor of cpus_per_actor, and a GPU where there are some
            key = "eval.cpus_per_actor"
            bundles = [{"CPU": section.cpus_per_actor, **({"GPU": 1.0} if gpus else {})}]
        else:  # hf Serve replicas take one CPU (deployments/openai_app.py)
            key, bundles = "serve", [{"CPU": 1.0}]
        for bundle in bundles:
            if not any(bundles_on_node(bundle, r) for r in alive):
                wanted = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
                most = describe_nodes(bundle, alive)
                raise ConfigError(
                    f"{key}: a bundle of {wanted} fits on no node of the Ray "
                    f"cluster (nodes: {most or 'none alive'})"
                )


def check_placement(config: PipelineConfig, flow: str) -> None:
    """check_resources against the cluster the running flow's task runner connects to (it
    connects now; no task has run). Skipped, with a log line, on an autoscaling cluster
    (``cluster.autoscaling``): nodes not started yet are not in ``ray.nodes()``."""
    if config.cluster.autoscaling or os.environ.get("LLMFLOW_CLUSTER_AUTOSCALING") == "1":
        log.info("cluster.autoscaling: resources are not checked against the nodes alive now")
        return
    import ray
    from prefect.context import FlowRunContext

    from llmflow.cluster import ClusterTaskRunner

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if isinstance(runner, ClusterTaskRunner):
        runner.ensure_connected()
    if ray.is_initialized():
        nodes = ray.nodes()
        check_resources(config, flow, nodes)
        check_secrets(config, nodes)


# The Prefect client's credentials: where the flow has them, its task runs on the Ray workers
# need them too, from the nodes' own environment (llmflow/trust.py).
PREFECT_SECRETS = ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")


def check_secrets(config: PipelineConfig, nodes: Sequence[dict[str, Any]]) -> None:
    """Every name of ``cluster.secret_env``, and the Prefect credentials this process uses,
    is set on every alive node (names are asked, never values). Raises ConfigError."""
    from llmflow.trust import missing_on_nodes

    names = [*config.cluster.secret_env, *(k for k in PREFECT_SECRETS if os.environ.get(k))]
    if not names:
        return
    missing = missing_on_nodes(list(dict.fromkeys(names)), list(nodes))
    if missing:
        node, lacking = next(iter(missing.items()))
        raise ConfigError(
            f"cluster.secret_env: {', '.join(lacking)} not set on the Ray node {node} (set it "
            "in the nodes' own environment: exported before `llmflow up`, a Kubernetes Secret "
            "in infra/k8s; never in cluster.env_vars)"
        )


def check_flow(config: PipelineConfig, flow: str) -> None:
    """What each flow runs first: check_config, then check_placement (and the secrets)."""
    check_config(config, flow)
    check_placement(config, flow)
