"""What a version is served as: the hf Serve application's arguments and lineage, the vLLM
application's schema, the chat page beside it, and the checks that can run before a
deployment (route prefix, API key source).
"""

from __future__ import annotations

import logging
from typing import Any

from llmflow.config import ClusterConfig, ServeConfig
from llmflow.errors import ConfigError
from llmflow.refs import ModelRef

log = logging.getLogger(__name__)


def app_args(serve_cfg: ServeConfig, model: ModelRef) -> dict[str, Any]:
    """The hf Serve application's arguments for a model version (no secrets: only the key's
    environment variable name travels). Replicas: autoscaling when configured, else fixed."""
    args: dict[str, Any] = {
        "model_path": model.uri,
        "model_name": model.name,
        "version": model.version,
        "lineage": served_lineage(model),
        "api_key_env": serve_cfg.api_key_env,
        "api_key_file": serve_cfg.api_key_file,
        "max_batch_size": serve_cfg.max_batch_size,
        "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s,
        "max_surge_percent": serve_cfg.max_surge_percent,
    }
    if serve_cfg.autoscaling is not None:
        args["autoscaling_config"] = serve_cfg.autoscaling.model_dump()
    else:
        args["num_replicas"] = serve_cfg.num_replicas
    if serve_cfg.max_ongoing_requests is not None:
        args["max_ongoing_requests"] = serve_cfg.max_ongoing_requests
    if serve_cfg.start_attempts is not None:
        args["max_constructor_retry_count"] = serve_cfg.start_attempts
    return args


def served_lineage(model: ModelRef) -> dict[str, Any]:
    """The lineage /v1/models shows (and the chat page with it): base model, dataset and train
    metrics from the ref; from the version's manifest, when it can be read, the flow run that
    registered it, the dataset's row counts, and the eval metrics that run scored it with
    (the means of the per-example metric columns of runs/<flow run>/eval/candidate)."""
    lineage: dict[str, Any] = {
        "base_model": model.base_model,
        "dataset_sha256": model.dataset_sha256,
        "train_metrics": model.train_metrics,
    }
    try:
        from llmflow.store import Store

        manifest = Store(model.uri).read_json("manifest.json")
    except Exception as exc:  # noqa: BLE001 - lineage is shown when found; serving never depends on it
        log.warning("%s:%s: no lineage manifest to show (%s)", model.name, model.version, exc)
        return lineage
    if manifest.get("gate"):
        gate = manifest["gate"]
        lineage["gate"] = {
            "passed": gate.get("passed"),
            "approved_by": gate.get("approved_by"),
            "rules": [r.get("reason") for r in gate.get("rules", [])],
        }
    dataset = manifest.get("dataset") or {}
    if dataset:
        lineage["dataset"] = {k: dataset.get(k) for k in ("uri", "sha256", "num_train", "num_eval")}
    if manifest.get("flow_run_id"):
        lineage["flow_run_id"] = manifest["flow_run_id"]
        recorded = (manifest.get("eval") or {}).get("metrics")
        metrics = recorded or _eval_metrics(manifest["flow_run_id"])
        if metrics:
            lineage["eval_metrics"] = metrics
    return lineage


def _eval_metrics(run_id: str) -> dict[str, float]:
    try:
        import pyarrow.parquet as pq

        from llmflow.evaluate.scoring import PREDICTION_COLUMNS, PREDICTIONS_FILE
        from llmflow.store import Store

        store = Store()
        if not store.exists("runs", run_id, "eval", "candidate", PREDICTIONS_FILE):
            return {}
        table = pq.read_table(store.uri("runs", run_id, "eval", "candidate", PREDICTIONS_FILE))
    except Exception as exc:  # noqa: BLE001 - see served_lineage
        log.warning("run %s: no eval predictions to show in the lineage (%s)", run_id, exc)
        return {}
    # eval_loss per row is not the corpus loss, its token count not a metric
    skip = {*PREDICTION_COLUMNS, "eval_loss", "eval_loss_tokens"}
    metrics = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name not in skip and values and all(isinstance(v, (int, float)) for v in values):
            metrics[name] = round(sum(values) / len(values), 4)
    return metrics


def chat_app_name(serve_cfg: ServeConfig) -> str:
    return f"{serve_cfg.app_name}-chat"


def chat_route_prefix(serve_cfg: ServeConfig) -> str:
    return f"{route_prefix(serve_cfg)}/chat"


def vllm_app_args(serve_cfg: ServeConfig, model: ModelRef) -> dict[str, Any]:
    """The vllm application's arguments (deployments/vllm_app.py): the hf ones, less what
    vLLM does itself (batching), plus its engine arguments, placement and accelerator type."""
    args = app_args(serve_cfg, model)
    for key in ("max_batch_size", "batch_wait_timeout_s"):
        args.pop(key)
    args["engine_kwargs"] = dict(serve_cfg.vllm_engine_kwargs)
    args["accelerator_type"] = serve_cfg.accelerator_type
    args["placement"] = serve_cfg.vllm_placement
    return args


def serve_engine(serve_cfg: ServeConfig, cluster: ClusterConfig | None = None) -> str:
    """'hf' or 'vllm' (llmflow.engines.select_engine, for serving)."""
    from llmflow.engines import select_engine

    return select_engine(serve_cfg.engine, cluster, serve_cfg.vllm_placement, key="serve.engine")


VLLM_IMPORT_PATH = "deployments.vllm_app:build_app"
# The ingress deployment of each engine's app (deployments/openai_app.py's "llm";
# ray.serve.llm names the vllm one after its class): a router in front of either takes this
# name, so switching between the plain app and the router is a rolling update of one
# deployment, old replicas answering until the new ones are ready.
INGRESS_DEPLOYMENT = {"hf": "llm", "vllm": "LlmflowIngress"}


def vllm_app_schema(
    serve_cfg: ServeConfig, model: ModelRef, cluster: ClusterConfig | None = None
) -> dict[str, Any]:
    """The declarative Serve application of a version on the vllm engine: its builder runs in
    the vLLM engine environment (the app's runtime_env), since ray.serve.llm cannot be
    imported here. A setting vllm serving cannot honour fails here, as a ConfigError."""
    from deployments.vllm_app import llm_config
    from llmflow import engine_env

    args = vllm_app_args(serve_cfg, model)
    try:
        llm_config(args)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    return {
        "name": serve_cfg.app_name,
        "route_prefix": serve_cfg.route_prefix,
        "import_path": VLLM_IMPORT_PATH,
        "args": args,
        "runtime_env": engine_env.runtime_env(cluster),
    }


def build_application(serve_cfg: ServeConfig, model: ModelRef):
    """The hf Serve application that serves ``model`` (deployments/openai_app.py)."""
    from deployments.openai_app import build_app

    return build_app(app_args(serve_cfg, model))


def check_route_prefix(serve_cfg: ServeConfig) -> None:
    """ConfigError, one line, when another Serve application holds ``serve.route_prefix``
    (Serve would refuse the deploy only after the whole pipeline ran)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return  # Serve not started yet: nothing holds a prefix
    prefix = serve_cfg.route_prefix.rstrip("/") or "/"
    for name, app in client.get_serve_details().get("applications", {}).items():
        held = (app.get("route_prefix") or "").rstrip("/") or "/"
        if name != serve_cfg.app_name and app.get("route_prefix") and held == prefix:
            raise ConfigError(
                f"serve.route_prefix: {serve_cfg.route_prefix!r} is served by the Serve "
                f"application {name!r}; give serve.app_name={serve_cfg.app_name!r} "
                f"its own prefix (e.g. /{serve_cfg.app_name})"
            )


def check_api_key_source(serve_cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """ConfigError, one line, when the configured key source holds no key. Checked where it
    can be: on the local stack the replicas read this machine's environment and files; on a
    remote cluster (cluster.ray_address) only its nodes can say, and the deploy does."""
    from llmflow.apikey import resolve_api_key

    if cluster.ray_address:
        return
    try:
        resolve_api_key(serve_cfg.api_key_env, serve_cfg.api_key_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_serving(serve_cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """What can be checked of serving before any work: the API key's source, and the route
    prefix is free or this app's (on the cluster the config names)."""
    check_api_key_source(serve_cfg, cluster)
    connect(cluster)
    check_route_prefix(serve_cfg)


def connect(cluster: ClusterConfig) -> None:
    import ray

    from llmflow.cluster import ray_init_kwargs, resolve_ray_address

    if not ray.is_initialized():
        ray.init(resolve_ray_address(cluster), **ray_init_kwargs(cluster))


def route_prefix(serve_cfg: ServeConfig) -> str:
    return serve_cfg.route_prefix.rstrip("/")
