"""Rolling a model version out on Ray Serve: the in-place deploy (hf or vLLM, as apps.py
describes it), the smoke test over HTTP, the restore of what was served before, and the
outcome of a promotion that has nothing to do. tasks/promote.py runs them in one transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import tenacity

from llmflow.config import ClusterConfig, ServeConfig
from llmflow.errors import LlmflowError
from llmflow.promote.apps import (
    build_application,
    chat_app_name,
    chat_route_prefix,
    route_prefix,
    serve_engine,
    vllm_app_schema,
)
from llmflow.refs import GateDecision, ModelRef, Rollout, SmokeTest
from llmflow.settings import serve_url

SMOKE_PROMPTS = ("Reverse this number: 1234", "Reverse this number: 905")
# One read-modify-write of the declarative set at a time: two apps applied side by side (a
# canary's internal apps) would each keep the set read before the other's was applied.
_APPLY = threading.Lock()


class RolloutError(LlmflowError):
    """A deployment did not become healthy, or its smoke test failed."""


def deploy_chat(
    serve_cfg: ServeConfig, model: ModelRef, cluster: ClusterConfig | None = None
) -> None:
    """serve.chat: the chat page as its own Serve application next to the model's (an
    unchanged one is left running: Serve redeploys only what changed)."""
    from ray import serve

    from deployments.chat_app import build_app as build_chat_app
    from llmflow.chat_backend import endpoint_for

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
        ) from exc
    wait_routed(serve_url(cluster), chat_route_prefix(serve_cfg), chat_app_name(serve_cfg))


def apply_declarative(app: dict[str, Any]) -> float:
    """Deploy one declarative application, keeping every other declarative one (a Serve
    config replaces the whole declarative set; apps run with serve.run are not part of it).
    Returns the app's last deployment time before the apply (the controller's clock, not
    this machine's), to tell the new deployment's status from the old one's."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    with _APPLY:
        details = client.get_serve_details().get("applications", {})
        keep = [
            d["deployed_app_config"]
            for name, d in details.items()
            if d.get("deployed_app_config") and name != app["name"]
        ]
        before = float((details.get(app["name"]) or {}).get("last_deployed_time_s") or 0.0)
        client.deploy_apps(ServeDeploySchema(applications=[*keep, app]))
    return before


def served_version(serve_cfg: ServeConfig, base_url: str) -> str | None:
    """The version the app answers with now (None when nothing is served)."""
    try:
        r = httpx.get(f"{base_url}{route_prefix(serve_cfg)}/health", timeout=5)
        return r.json().get("version") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


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
            since = apply_declarative(vllm_app_schema(serve_cfg, model, cluster))
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

    wait_running(serve_cfg.app_name, since, timeout_s, f"{model.name}:{model.version}")
    wait_routed(serve_url(cluster), serve_cfg.route_prefix, serve_cfg.app_name)
    if serve_cfg.chat:
        deploy_chat(serve_cfg, model, cluster)


def wait_running(app_name: str, since: float, timeout_s: float, what: str) -> None:
    """Wait until the app's deployment after ``since`` (controller clock) is RUNNING; a
    RolloutError when it failed or did not get there in ``timeout_s``."""
    from ray import serve

    def running() -> bool:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", ""))
        current = getattr(app, "last_deployed_time_s", 0.0) > since  # not the old version's
        if current and status.endswith("DEPLOY_FAILED"):
            raise RolloutError(
                f"Serve app '{app_name}' failed to deploy {what}: {app.message[:300]}"
            )
        return current and status.endswith("RUNNING")

    if not poll_until(running, timeout_s, every_s=1.0):
        raise RolloutError(f"Serve app '{app_name}' not RUNNING after {timeout_s:.0f}s")


def poll_until(check: Callable[[], bool], timeout_s: float, every_s: float) -> bool:
    """Call ``check`` every ``every_s`` until it is true (True) or ``timeout_s`` has passed
    (False); what it raises goes through."""
    try:
        return tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout_s),
            wait=tenacity.wait_fixed(every_s),
            retry=tenacity.retry_if_result(lambda ok: not ok),
        )(check)
    except tenacity.RetryError:
        return False


def routes(base_url: str) -> dict[str, str]:
    """The HTTP ingress's live route table, ``{route_prefix: app_name}`` (``/-/routes``,
    served by Serve's proxy and by HAProxy from the configuration it runs now)."""
    r = httpx.get(f"{base_url}/-/routes", timeout=5)
    r.raise_for_status()
    return {str(k).rstrip("/"): str(v) for k, v in r.json().items()}


def wait_routed(base_url: str, prefix: str, app_name: str, timeout_s: float = 60) -> None:
    """Wait until the ingress routes ``prefix`` to ``app_name``. Serve reports an app
    RUNNING before every proxy has its route (HAProxy picks it up on a config reload): a
    request in between gets the ingress's own 404, which a smoke test would take for the
    model's failure."""

    def routed() -> bool:
        try:
            return routes(base_url).get(prefix.rstrip("/")) == app_name
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    if not poll_until(routed, timeout_s, every_s=0.2):
        raise RolloutError(
            f"Serve app '{app_name}' is RUNNING but {base_url} does not route "
            f"{prefix or '/'} to it after {timeout_s:.0f}s"
        )


def smoke_test(
    serve_cfg: ServeConfig, model: ModelRef, base_url: str, api_key: str | None = None
) -> SmokeTest:
    """Real HTTP requests against the served app: the right version answers, and answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url}{route_prefix(serve_cfg)}"
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
        return Rollout(
            served_version=live,
            previous_version=None,
            endpoint=url,
            message=f"gate failed: {failed}",
        )
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
    if rollout.canary_steps:
        from llmflow.promote.canary import steps_markdown

        outcome = "rolled back" if rollout.rolled_back else "the candidate took all the traffic"
        lines += ["", steps_markdown(rollout.canary_steps, outcome)]
    if rollout.smoke_test:
        lines += ["", "| check | passed | detail |", "| --- | --- | --- |"]
        lines += [
            f"| {c['check']} | {c['passed']} | {c['detail']} |" for c in rollout.smoke_test.checks
        ]
    return "\n".join(lines)
