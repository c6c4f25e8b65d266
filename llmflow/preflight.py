"""What can be checked of a config before any cluster work: one clear line, exit 2.

`llmflow run` calls it before it brings the stack up; the flows call it first thing, so a
run started from the UI or a schedule fails the same way, before training starts.
"""

from __future__ import annotations

import logging
import os
import time
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
    ``train.backend: llamafactory``: present, with the cluster's Ray and Python), the memory
    plan against ``cluster.gpu_memory_gb`` when set (llmflow/plan.py), and the extra metrics
    (importable, no clash with a built-in) of the stages ``flow`` runs. Raises ConfigError."""
    from llmflow.engines import check_engines

    stages = FLOW_STAGES.get(flow, ())
    if flow in TRAINS and config.train.backend == "llamafactory":
        from llmflow import engine_env

        bundle = {"GPU": 1.0} if config.train.use_gpu else {"CPU": 1.0}
        engine_env.check(config.cluster, "train.backend", [bundle], engine_env.LLAMAFACTORY)
    check_engines(config, stages)
    if config.cluster.gpu_memory_gb:  # the memory plan, from config.json alone
        from llmflow.plan import check_memory

        check_memory(config)
    if "eval" in stages:
        from llmflow.evaluate.metrics import load_metrics, metric_directions

        load_metrics(config.eval.extra_metrics)
        if config.eval.judge is not None:
            check_judge(config)
        directions = metric_directions(config.eval.extra_metrics)
        if config.eval.benchmarks is not None:  # the task files load, are generate_until
            from llmflow.evaluate.benchmarks import task_directions

            directions.update(task_directions(config.eval.benchmarks))
        if flow == "pipeline":  # the gate: each metric it names declares its direction
            from llmflow.promote.gate import check_directions

            check_directions(config.gate, directions)


def check_judge(config: PipelineConfig) -> None:
    """eval.judge can run: the vLLM engine environment for a judge model, the key's
    environment variable for an endpoint (named, never shown). Raises ConfigError."""
    judge = config.eval.judge
    if judge.engine == "vllm":
        from llmflow import engine_env

        placement = judge.vllm_placement or config.eval.vllm_placement
        engine_env.check(config.cluster, key="eval.judge.engine", placement=placement)
    elif judge.api_key_env and not os.environ.get(judge.api_key_env):
        raise ConfigError(
            f"eval.judge.api_key_env: {judge.api_key_env} is not set in this environment"
        )


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
        key, bundles = stage_bundles(config, stage, gpus)
        for bundle in bundles:
            if not any(bundles_on_node(bundle, r) for r in alive):
                wanted = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
                most = describe_nodes(bundle, alive)
                raise ConfigError(
                    f"{key}: a bundle of {wanted} fits on no node of the Ray "
                    f"cluster (nodes: {most or 'none alive'})"
                )


def stage_bundles(config: PipelineConfig, stage: str, gpus: bool) -> tuple[str, list[dict]]:
    """The config key and the resource bundles of one engine of ``stage`` ("eval" or
    "serve"): a vLLM engine's placement group, an hf scoring actor (with a GPU where the
    cluster has some), an hf Serve replica (one CPU, deployments/openai_app.py)."""
    section = getattr(config, stage)
    if section.engine == "vllm":
        return f"{stage}.vllm_placement", section.vllm_placement or [{"GPU": 1.0}]
    if stage == "eval":
        return "eval.cpus_per_actor", [
            {"CPU": section.cpus_per_actor, **({"GPU": 1.0} if gpus else {})}
        ]
    return "serve", [{"CPU": 1.0}]


# -- what the cluster holds now --------------------------------------------------------------
# Replicas of an app deleted a moment ago (`llmflow models unserve` just before a run, a test
# module's teardown) free their resources within seconds: a stage that does not fit now is
# asked again for this long before the run fails (LLMFLOW_ROOM_WAIT_S overrides it).
ROOM_WAIT_S = 20.0
UNSERVE_HINT = " (`llmflow models unserve NAME` frees a served model's)"


def held_on_nodes() -> dict[str, list[tuple[str, dict[str, float]]]]:
    """Node id -> [(holder, resources)]: what alive actors outside placement groups and
    created placement groups hold on each node now (Ray's state API, no private call). A
    holder is 'Serve app NAME', 'Ray Train workers', or an actor's class."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    # The cluster this process is connected to: without an address the state API takes the
    # last cluster started on this machine (/tmp/ray), which may be another one.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(
        address=address,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    groups = list_placement_groups(
        address=address,
        filters=[("state", "=", "CREATED")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    owner: dict[str, str] = {}
    held: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for actor in actors:
        who = holder_name(actor.class_name or "")
        if actor.placement_group_id:  # its resources are its group's bundle's
            owner.setdefault(actor.placement_group_id, who)
        elif actor.node_id and actor.required_resources:
            held.setdefault(actor.node_id, []).append((who, dict(actor.required_resources)))
    for group in groups:
        who = owner.get(group.placement_group_id) or f"placement group {group.name or '(unnamed)'}"
        for bundle in group.bundles or ():
            if bundle.get("node_id"):
                resources = dict(bundle.get("unit_resources") or {})
                held.setdefault(bundle["node_id"], []).append((who, resources))
    return held


def holder_name(class_name: str) -> str:
    """'ServeReplica:APP:DEPLOYMENT' -> 'Serve app APP'; Ray Train's worker actors by name."""
    if class_name.startswith("ServeReplica:"):
        return f"Serve app {class_name.split(':')[1]}"
    if class_name == "RayTrainWorker":
        return "Ray Train workers"
    return class_name or "an actor"


def check_room(
    key: str,
    bundle: dict[str, float],
    count: int,
    nodes: Sequence[dict[str, Any]],
    held: dict[str, list[tuple[str, dict[str, float]]]],
) -> None:
    """Raise ConfigError when fewer than ``count`` copies of ``bundle`` fit in what the alive
    ``nodes`` have free now (their totals less ``held``, from held_on_nodes), naming how much
    of each resource is held and by whom."""
    alive = [n for n in nodes if n.get("Alive")]
    free = []
    for node in alive:
        left = dict(node.get("Resources", {}))
        for _, resources in held.get(node.get("NodeID", ""), ()):
            for k, v in resources.items():
                if k in left:
                    left[k] = max(0.0, left[k] - v)
        free.append(left)
    if sum(bundles_on_node(bundle, left) for left in free) >= count:
        return
    wanted = [k for k in bundle if bundle[k] > 0]
    total = {k: sum(n.get("Resources", {}).get(k, 0.0) for n in alive) for k in wanted}
    used = {k: total[k] - sum(left.get(k, 0.0) for left in free) for k in wanted}
    holders: dict[str, dict[str, float]] = {}
    for node in alive:
        for who, resources in held.get(node.get("NodeID", ""), ()):
            for k in wanted:
                if resources.get(k, 0.0) > 0:
                    holders.setdefault(who, {}).setdefault(k, 0.0)
                    holders[who][k] += resources[k]
    by = ", ".join(
        f"{who} ({', '.join(f'{v:g} {k}' for k, v in res.items())})"
        for who, res in sorted(holders.items(), key=lambda item: -sum(item[1].values()))
    )
    ask = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    raise ConfigError(
        f"{key}: {count} x ({ask}) cannot be placed now: "
        + ", ".join(f"{used[k]:g} of {total[k]:g} {k}" for k in wanted)
        + f" held by {by or 'other work'}"
        + (UNSERVE_HINT if "Serve app " in by else "")
    )


def check_room_now(config: PipelineConfig, flow: str, nodes: Sequence[dict[str, Any]]) -> None:
    """check_room for what ``flow`` would wait on forever: every training worker at once and
    each scoring engine's bundle. (A promotion's replicas are not asked here: the rollout
    has its own deadline and rolls back.)"""
    trains, scores = flow in TRAINS, "eval" in FLOW_STAGES.get(flow, ())
    if not (trains or scores):
        return
    held = held_on_nodes()
    if trains:
        from llmflow.finetune.checks import worker_resources

        need = worker_resources(config.train)
        check_room("train.num_workers", need, config.train.num_workers, nodes, held)
    if scores:
        gpus = any(n.get("Resources", {}).get("GPU", 0) > 0 for n in nodes if n.get("Alive"))
        key, bundles = stage_bundles(config, "eval", gpus)
        for bundle in bundles:
            check_room(key, bundle, 1, nodes, held)


def wait_for_room(config: PipelineConfig, flow: str) -> None:
    """check_room_now, asked again for up to ROOM_WAIT_S while it does not fit (resources
    that were being released a moment ago); then its one line. A cluster whose state API
    does not answer (no dashboard) is not checked, with a log line."""
    import ray
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + float(os.environ.get("LLMFLOW_ROOM_WAIT_S", ROOM_WAIT_S))
    while True:
        try:
            check_room_now(config, flow, ray.nodes())
            return
        except ConfigError as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("%s; asking again for up to %.0f s", exc, deadline - time.monotonic())
        except (
            RayStateApiException,
            RuntimeError,
            ConnectionError,
            ray.exceptions.RayError,
        ) as exc:
            # The state API is the dashboard's (and ray[default]'s): a cluster may lack it, and
            # a check that cannot ask must not fail the run.
            log.warning("resources held now are not checked: %s", exc)
            return
        time.sleep(1.0)


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
        check_memory_on_nodes(config, nodes)
        check_secrets(config, nodes)
        wait_for_room(config, flow)


def check_memory_on_nodes(config: PipelineConfig, nodes: Sequence[dict[str, Any]]) -> None:
    """The memory plan against the smallest GPU of the cluster's nodes, where
    ``cluster.gpu_memory_gb`` does not say it (check_config held it against that already)
    and some stage runs on a GPU. A cluster that cannot say (no nvidia-smi) is logged, not
    failed."""
    from llmflow.plan import check_memory, gpu_memory_on_nodes, plan_uses_gpu

    if config.cluster.gpu_memory_gb or not plan_uses_gpu(config):
        return
    import ray

    try:
        gpu_gb = gpu_memory_on_nodes(list(nodes))
    except ray.exceptions.RayError as exc:  # a node whose task could not run (or in time)
        log.warning("the memory plan is not checked: the nodes' GPU memory not read: %s", exc)
        return
    if gpu_gb is None:
        log.info("the memory plan is not checked: no node says its GPU memory (nvidia-smi)")
        return
    for line in check_memory(config, gpu_gb):
        log.info("%s", line)


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
