"""Rolling a model version out on Ray Serve: the application's arguments (hf or vLLM), the
in-place deploy, the smoke test over HTTP, the restore of what was served before, and the
checks that can run before any of it. tasks/promote.py runs them in one transaction.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from llmflow.config import ClusterConfig, ServeConfig
from llmflow.errors import ConfigError, LlmflowError
from llmflow.refs import GateDecision, ModelRef, Rollout, SmokeTest
from llmflow.settings import serve_url

SMOKE_PROMPTS = ("Reverse this number: 1234", "Reverse this number: 905")


class RolloutError(LlmflowError):
    """A deployment did not become healthy, or its smoke test failed."""


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
    except Exception:  # noqa: BLE001 - lineage is shown when found; serving never depends on it
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
    except Exception:  # noqa: BLE001 - see served_lineage
        return {}
    skip = {*PREDICTION_COLUMNS, "eval_loss"}  # eval_loss per row is not the corpus loss
    metrics = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name not in skip and values and all(isinstance(v, (int, float)) for v in values):
            metrics[name] = round(sum(values) / len(values), 4)
    return metrics


def chat_app_name(serve_cfg: ServeConfig) -> str:
    return f"{serve_cfg.app_name}-chat"


def chat_route_prefix(serve_cfg: ServeConfig) -> str:
    return f"{_prefix(serve_cfg)}/chat"


def deploy_chat(
    serve_cfg: ServeConfig, model: ModelRef, cluster: ClusterConfig | None = None
) -> None:
    """serve.chat: the chat page as its own Serve application next to the model's (an
    unchanged one is left running: Serve redeploys only what changed)."""
    from ray import serve

    from deployments.chat_app import build_app as build_chat_app
    from llmflow.chat import endpoint_for

    endpoint = endpoint_for(serve_url(cluster), serve_cfg.route_prefix)
    app = build_chat_app(
        {
            "endpoint": endpoint,
            "api_key_env": serve_cfg.api_key_env,
            "api_key_file": serve_cfg.api_key_file,
            "model": model.name,
        }
    )
    try:
        serve.run(app, name=chat_app_name(serve_cfg), route_prefix=chat_route_prefix(serve_cfg))
    except RuntimeError as exc:
        raise RolloutError(
            f"Serve app '{chat_app_name(serve_cfg)}' (the chat) failed to deploy: {str(exc)[:300]}"
        ) from None


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
        raise ConfigError(str(exc).splitlines()[0]) from None
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


def _apply_declarative(app: dict[str, Any]) -> float:
    """Deploy one declarative application, keeping every other declarative one (a Serve
    config replaces the whole declarative set; apps run with serve.run are not part of it).
    Returns the app's last deployment time before the apply (the controller's clock, not
    this machine's), to tell the new deployment's status from the old one's."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details().get("applications", {})
    keep = [
        d["deployed_app_config"]
        for name, d in details.items()
        if d.get("deployed_app_config") and name != app["name"]
    ]
    before = float((details.get(app["name"]) or {}).get("last_deployed_time_s") or 0.0)
    client.deploy_apps(ServeDeploySchema(applications=[*keep, app]))
    return before


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
        raise ConfigError(str(exc)) from None


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


def served_version(serve_cfg: ServeConfig, base_url: str) -> str | None:
    """The version the app answers with now (None when nothing is served)."""
    try:
        r = httpx.get(f"{base_url}{_prefix(serve_cfg)}/health", timeout=5)
        return r.json().get("version") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _prefix(serve_cfg: ServeConfig) -> str:
    return serve_cfg.route_prefix.rstrip("/")


def deploy(
    serve_cfg: ServeConfig,
    model: ModelRef,
    cluster: ClusterConfig | None = None,
    timeout_s: float | None = None,
) -> None:
    """Deploy (or update in place) the app on the running Serve cluster; wait until RUNNING.

    hf: serve.run from here. vllm: a declarative application in the engine environment
    (``vllm_app_schema``), whose first start loads the engine (a minute or more on CPUs).
    """
    from ray import serve

    engine = serve_engine(serve_cfg, cluster)
    timeout_s = timeout_s or (900 if engine == "vllm" else 300)
    since = -1.0  # serve.run returns once its deployment is the app's
    try:
        if engine == "vllm":
            since = _apply_declarative(vllm_app_schema(serve_cfg, model, cluster))
        else:
            # serve.run returns once the app is RUNNING and raises when it cannot get there.
            serve.run(
                build_application(serve_cfg, model),
                name=serve_cfg.app_name,
                route_prefix=serve_cfg.route_prefix,
            )
    except RuntimeError as exc:
        raise RolloutError(
            f"Serve app '{serve_cfg.app_name}' failed to deploy "
            f"{model.name}:{model.version}: {str(exc)[:300]}"
        ) from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(serve_cfg.app_name)
        status = str(getattr(app, "status", ""))
        current = getattr(app, "last_deployed_time_s", 0.0) > since  # not the old version's
        if current and status.endswith("RUNNING"):
            if serve_cfg.chat:
                deploy_chat(serve_cfg, model, cluster)
            return
        if current and status.endswith("DEPLOY_FAILED"):
            raise RolloutError(
                f"Serve app '{serve_cfg.app_name}' failed to deploy "
                f"{model.name}:{model.version}: {app.message[:300]}"
            )
        time.sleep(1)
    raise RolloutError(f"Serve app '{serve_cfg.app_name}' not RUNNING after {timeout_s:.0f}s")


def smoke_test(
    serve_cfg: ServeConfig, model: ModelRef, base_url: str, api_key: str | None = None
) -> SmokeTest:
    """Real HTTP requests against the served app: the right version answers, and answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url}{_prefix(serve_cfg)}"
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        served = models.json()["data"][0] if models.status_code == 200 else {}
        if "version" in served or models.status_code != 200:
            check(
                "models",
                served.get("version") == model.version,
                f"HTTP {models.status_code}, serving version {served.get('version')!r}",
            )
        else:  # the vllm app (ray.serve.llm) lists model ids only
            check("models", served.get("id") == model.name, f"serving model {served.get('id')!r}")
        for prompt in SMOKE_PROMPTS:
            r = httpx.post(
                f"{url}/v1/chat/completions",
                headers=headers,
                timeout=60,
                json={
                    "model": model.name,
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": prompt}],
                },
            )
            body = r.json() if r.status_code == 200 else {}
            text = body.get("choices", [{}])[0].get("message", {}).get("content")
            check(
                f"chat: {prompt}",
                r.status_code == 200
                and isinstance(text, str)
                and body["usage"]["completion_tokens"] > 0,
                f"HTTP {r.status_code}, answer {text!r}",
            )
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        check("http", False, f"{type(exc).__name__}: {exc}")
    return SmokeTest(passed=all(c["passed"] for c in checks), checks=checks)


def restore(
    serve_cfg: ServeConfig, previous: ModelRef | None, cluster: ClusterConfig | None = None
) -> None:
    """Serve ``previous`` again, or remove the app when nothing was served before."""
    from ray import serve

    if previous is not None:
        deploy(serve_cfg, previous, cluster)
    else:
        serve.delete(serve_cfg.app_name)
        if serve_cfg.chat:
            serve.delete(chat_app_name(serve_cfg))


def nothing_to_do(
    serve_cfg: ServeConfig,
    cluster: ClusterConfig,
    candidate: ModelRef,
    decision: GateDecision | None,
    champion: str | None,
    previous: str | None,
) -> Rollout | None:
    """The outcome of a promotion that changes nothing (a failed gate, or the candidate is
    already champion and served); None when there is a rollout to do."""
    live = served_version(serve_cfg, serve_url(cluster))
    url = endpoint(serve_cfg, cluster)
    if decision is not None and not decision.passed:
        failed = "; ".join(r.reason for r in decision.rules if not r.passed)
        return Rollout(served_version=live, endpoint=url, message=f"gate failed: {failed}")
    if champion == candidate.version and live == candidate.version:
        message = (
            f"{candidate.name}:{candidate.version} is already champion and served: nothing changed"
        )
        return Rollout(
            served_version=live, previous_version=previous, endpoint=url, message=message
        )
    return None


def endpoint(serve_cfg: ServeConfig, cluster: ClusterConfig) -> str:
    """The OpenAI base URL of the app (without /v1)."""
    return f"{serve_url(cluster)}{serve_cfg.route_prefix.rstrip('/')}"


def summary(rollout: Rollout) -> str:
    lines = [
        f"## Rollout: {'rolled back' if rollout.rolled_back else 'done'}",
        "",
        f"- served version: `{rollout.served_version}`",
        f"- previous version: `{rollout.previous_version}`",
        f"- endpoint: {rollout.endpoint}",
        f"- {rollout.message}",
    ]
    if rollout.smoke_test:
        lines += ["", "| check | passed | detail |", "| --- | --- | --- |"]
        lines += [
            f"| {c['check']} | {c['passed']} | {c['detail']} |" for c in rollout.smoke_test.checks
        ]
    return "\n".join(lines)
