"""What is served, recorded so that it can be brought back: models/<name>/serving.json.

A promotion's last step writes the version it made champion and the serve and cluster
sections it was served with. Ray Serve keeps its applications in the Ray head (GCS): a
restarted head, `llmflow down` then `up`, or a rebooted machine serves nothing. `llmflow up`
reads these records and deploys each champion that does not answer, exactly as its
promotion deployed it (`restore_champions`); `llmflow models serve-config` renders the same
applications as a Serve config for a KubeRay RayService. `llmflow models unserve` removes
an app and its record (the champion alias stays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmflow.config import ClusterConfig, ServeConfig
from llmflow.errors import LlmflowError
from llmflow.refs import ModelRef
from llmflow.store import Store

SERVING = "serving.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One recorded Serve application: the champion of ``name`` and how it is served."""

    name: str
    version: str
    serve: ServeConfig
    cluster: ClusterConfig
    recorded_at: str


def record(
    store: Store, model: ModelRef, serve_cfg: ServeConfig, cluster: ClusterConfig, engine: str
) -> str:
    """Record that ``model`` is served with ``serve_cfg`` on ``cluster`` by ``engine`` (the
    one 'auto' chose then: a restore does not choose again), written atomically."""
    doc = {
        "version": model.version,
        "serve": serve_cfg.model_copy(update={"engine": engine}).model_dump(mode="json"),
        "cluster": cluster.model_dump(mode="json"),
        "recorded_at": datetime.now(UTC).isoformat(),
    }
    return store.write_json(doc, "models", model.name, SERVING)


def forget(store: Store, name: str) -> bool:
    """Remove ``name``'s record; False when there was none."""
    if not store.exists("models", name, SERVING):
        return False
    store.fs.rm(store.path("models", name, SERVING))
    return True


def recorded(store: Store) -> list[Served]:
    """Every recorded application, the champion's version in each (the alias is what a
    promotion moves last). Two models recorded on one app name: the later one is served
    there (it replaced the other), so only that one is returned."""
    from llmflow import aliases

    by_app: dict[str, Served] = {}
    for name in store.listdir("models"):
        if name.startswith(("_", ".")) or not store.exists("models", name, SERVING):
            continue
        doc = store.read_json("models", name, SERVING)
        try:
            serve_cfg = ServeConfig.model_validate(doc["serve"])
            cluster = ClusterConfig.model_validate(doc.get("cluster") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise LlmflowError(
                f"{store.uri('models', name, SERVING)}: not a serving record ({exc})"
            ) from exc
        version = aliases.read_aliases(store, name).get("champion") or doc["version"]
        served = Served(name, version, serve_cfg, cluster, str(doc.get("recorded_at", "")))
        held = by_app.get(serve_cfg.app_name)
        if held is None or held.recorded_at < served.recorded_at:
            by_app[serve_cfg.app_name] = served
    return sorted(by_app.values(), key=lambda s: s.serve.app_name)


def restore_champions(
    store: Store,
    ray_address: str,
    echo: Callable[[str], None] = lambda _: None,
) -> tuple[list[str], list[str]]:
    """Deploy every recorded champion whose app does not answer with its version, on the Ray
    cluster at ``ray_address`` (the local stack's head). Records of another cluster (their
    ``cluster.ray_address`` names one) are left to it. Returns (restored, failed), each as
    "name:version"; a failure is echoed with its reason and does not stop the others."""
    from llmflow import registry
    from llmflow.promote.rollout import deploy, served_version
    from llmflow.settings import serve_url

    todo = []
    for s in recorded(store):
        if s.cluster.ray_address and s.cluster.ray_address != ray_address:
            echo(f"serving: {s.name}:{s.version} is served on {s.cluster.ray_address}, not here")
        elif served_version(s.serve, serve_url(s.cluster)) == s.version:
            echo(f"serving: {s.name}:{s.version} answers on app '{s.serve.app_name}'")
        else:
            todo.append(s)
    restored: list[str] = []
    failed: list[str] = []
    if not todo:
        return restored, failed
    _connect(ray_address, todo[0].cluster)
    for s in todo:
        label = f"{s.name}:{s.version}"
        try:
            deploy(s.serve, registry.get_version(store, s.name, s.version), s.cluster)
        except LlmflowError as exc:
            failed.append(label)
            echo(f"serving: {label} NOT restored on app '{s.serve.app_name}': {exc}")
            continue
        restored.append(label)
        echo(
            f"serving: restored {label} on app '{s.serve.app_name}' "
            f"({serve_url(s.cluster)}{s.serve.route_prefix.rstrip('/')}/v1)"
        )
    return restored, failed


def _connect(ray_address: str, cluster: ClusterConfig) -> None:
    import ray

    from llmflow.cluster import ray_init_kwargs

    if not ray.is_initialized():
        ray.init(ray_address, **ray_init_kwargs(cluster))


def unserve(store: Store, name: str, cluster: ClusterConfig | None = None) -> str | None:
    """Delete ``name``'s recorded app (and its chat page) from Serve and forget the record,
    so no `llmflow up` brings it back; returns the app name (None: nothing was recorded)."""
    from ray import serve

    from llmflow.promote.apps import chat_app_name, connect

    served = {s.name: s for s in recorded(store)}.get(name)
    if served is None:
        forget(store, name)  # a record shadowed by a later app on the same name
        return None
    connect(cluster or served.cluster)
    serve.delete(served.serve.app_name)
    if served.serve.chat:
        serve.delete(chat_app_name(served.serve))
    forget(store, name)
    return served.serve.app_name


def serve_applications(store: Store) -> list[dict[str, Any]]:
    """The recorded champions as the applications of a Serve config (declarative: what a
    KubeRay RayService's serveConfigV2 lists), each as its promotion deployed it."""
    from llmflow import registry
    from llmflow.promote.apps import VLLM_IMPORT_PATH, app_args, vllm_app_args

    apps = []
    for s in recorded(store):
        model = registry.get_version(store, s.name, s.version)
        vllm = s.serve.engine == "vllm"  # recorded as resolved: never 'auto'
        apps.append(
            {
                "name": s.serve.app_name,
                "route_prefix": s.serve.route_prefix,
                "import_path": VLLM_IMPORT_PATH if vllm else HF_IMPORT_PATH,
                "args": vllm_app_args(s.serve, model) if vllm else app_args(s.serve, model),
            }
        )
    return apps


HF_IMPORT_PATH = "deployments.openai_app:build_app"


def served_status(store: Store, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Each recorded app as it answers now: the version it serves (None: down) against the
    champion, and the replica's last-minute request and error rates from its /health (the
    hf app reports them; a replica answers for itself, so with several it is one's share)."""
    import httpx

    from llmflow.settings import serve_url

    rows = []
    for s in recorded(store):
        url = f"{serve_url(s.cluster)}{s.serve.route_prefix.rstrip('/')}"
        try:
            r = httpx.get(f"{url}/health", timeout=timeout)
            health = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            health = {}
        rows.append(
            {
                "app": s.serve.app_name,
                "model": s.name,
                "champion": s.version,
                "serving": health.get("version"),
                "engine": s.serve.engine,
                "requests_per_s": health.get("requests_per_s"),
                "errors_per_s": health.get("errors_per_s"),
                "url": f"{url}/v1",
            }
        )
    return rows
