"""Serving a canary on Ray Serve: the champion and the candidate each as their own app at an
internal route prefix, the router (deployments/canary_router.py) as the public app in front
of them, one step at a time, and the two ways out: the candidate or the champion becomes the
plain public app again. tasks/promote.py runs them inside the promote transaction.

Every switch of the public app (plain app -> router -> plain app) is one rolling update of
its ingress deployment "llm" (serve.max_surge_percent): the old replicas answer until the
new ones are ready. A step is a new user_config of the router's declarative app: Serve
reconfigures the live replica, no restart.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tenacity

from llmflow.config import ClusterConfig, ServeConfig
from llmflow.promote.apps import INGRESS_DEPLOYMENT, serve_engine
from llmflow.promote.canary import CANDIDATE, CHAMPION, ROLLBACK, WAIT, internal_app, judge
from llmflow.promote.rollout import (
    RolloutError,
    apply_declarative,
    deploy,
    poll_until,
    wait_running,
)
from llmflow.refs import CanaryStep, ModelRef
from llmflow.settings import offline_env, serve_url

ROUTER_IMPORT_PATH = "deployments.canary_router:build_app"
INTERNAL_PREFIX = "/_llmflow"
log = logging.getLogger(__name__)


def version_cfg(serve_cfg: ServeConfig, role: str, version: str) -> ServeConfig:
    """The serve section of one version's internal app: its own name and route prefix
    (/_llmflow/<app>/<version>), the same engine, replicas and API key rules, no chat."""
    return serve_cfg.model_copy(
        update={
            "app_name": internal_app(serve_cfg.app_name, role),
            "route_prefix": f"{INTERNAL_PREFIX}/{serve_cfg.app_name}/{version}",
            "chat": False,
        }
    )


def router_schema(
    serve_cfg: ServeConfig,
    champion: ModelRef,
    candidate: ModelRef,
    cluster: ClusterConfig | None,
    weight: int,
    step: str,
) -> dict[str, Any]:
    """The router's declarative application at the public name and prefix, its deployment
    named as the engine's ingress (a rolling update between the plain app and the router)."""
    base = serve_url(cluster)
    refs = {CHAMPION: champion, CANDIDATE: candidate}
    upstreams = {
        r: f"{base}{version_cfg(serve_cfg, r, m.version).route_prefix}" for r, m in refs.items()
    }
    env = {**offline_env(), **dict(getattr(cluster, "env_vars", None) or {})}
    ingress = INGRESS_DEPLOYMENT[serve_engine(serve_cfg, cluster)]
    return {
        "name": serve_cfg.app_name,
        "route_prefix": serve_cfg.route_prefix,
        "import_path": ROUTER_IMPORT_PATH,
        "args": {
            "upstreams": upstreams,
            "versions": {r: m.version for r, m in refs.items()},
            "max_surge_percent": serve_cfg.max_surge_percent,
            "name": ingress,
        },
        "deployments": [{"name": ingress, "user_config": {"weight": weight, "step": step}}],
        "runtime_env": {"env_vars": env},
    }


def read_stats(serve_cfg: ServeConfig) -> dict[str, Any]:
    """The router's figures of the current step (``CanaryRouter.stats``)."""
    from ray import serve

    return serve.get_app_handle(serve_cfg.app_name).stats.remote().result(timeout_s=30)


def set_step(
    serve_cfg: ServeConfig,
    champion: ModelRef,
    candidate: ModelRef,
    cluster: ClusterConfig | None,
    weight: int,
    step: str,
    timeout_s: float = 300,
) -> None:
    """Give the candidate ``weight`` percent; returns once the live router counts ``step``."""
    schema = router_schema(serve_cfg, champion, candidate, cluster, weight, step)
    since = apply_declarative(schema)
    wait_running(serve_cfg.app_name, since, timeout_s, f"the canary router at {weight}%")
    try:
        tenacity.Retrying(
            stop=tenacity.stop_after_delay(60),
            wait=tenacity.wait_fixed(0.2),
            retry=tenacity.retry_if_result(lambda s: s.get("step") != step)
            | tenacity.retry_if_exception_type(Exception),
        )(read_stats, serve_cfg)
    except tenacity.RetryError as exc:
        raise RolloutError(f"the canary router did not take step {step}") from exc


def start(
    serve_cfg: ServeConfig, champion: ModelRef, candidate: ModelRef, cluster: ClusterConfig | None
) -> None:
    """Both versions' internal apps, side by side (the cluster holds both for the whole canary
    anyway; their engines' starts overlap instead of adding up), then the router as the
    public app at 0%. A failed start raises once the other has ended."""
    roles = ((CHAMPION, champion), (CANDIDATE, candidate))
    with ThreadPoolExecutor(len(roles), thread_name_prefix="canary-start") as pool:
        started = [
            pool.submit(deploy, version_cfg(serve_cfg, role, model.version), model, cluster)
            for role, model in roles
        ]
    for future in started:
        future.result()
    set_step(serve_cfg, champion, candidate, cluster, 0, "0:start")


def run_steps(
    serve_cfg: ServeConfig,
    champion: ModelRef,
    candidate: ModelRef,
    cluster: ClusterConfig | None,
    poll_s: float = 1.0,
) -> tuple[bool, list[CanaryStep], str]:
    """Each step of serve.rollout.steps, judged on the router's figures
    (llmflow.promote.canary.judge). A breach puts the weight back to 0 at once.

    Returns:
        (held, the steps, the reason of the last decision).
    """
    policy = serve_cfg.rollout
    steps: list[CanaryStep] = []
    baseline: float | None = None
    for i, weight in enumerate(policy.steps, 1):
        set_step(serve_cfg, champion, candidate, cluster, weight, f"{i}:{weight}")
        while True:
            time.sleep(poll_s)
            st = read_stats(serve_cfg)
            verdict = judge(policy, st[CHAMPION], st[CANDIDATE], st["seconds"], baseline)
            if verdict.decision != WAIT:
                break
        steps.append(
            CanaryStep(
                weight=weight,
                seconds=st["seconds"],
                champion=st[CHAMPION],
                candidate=st[CANDIDATE],
                decision=verdict.decision,
                reason=verdict.reason,
            )
        )
        log.info("canary step %d (%d%%): %s, %s", i, weight, verdict.decision, verdict.reason)
        if st[CHAMPION]["requests"]:
            baseline = st[CHAMPION]["p99_ms"]
        if verdict.decision == ROLLBACK:
            set_step(serve_cfg, champion, candidate, cluster, 0, f"{i}:rollback")
            return False, steps, f"step {i} ({weight}%): {verdict.reason}"
    return True, steps, f"{len(steps)} steps held: {steps[-1].reason}"


def wait_drained(app_name: str, deployment: str, timeout_s: float = 120) -> bool:
    """Wait until no replica of the app's ``deployment`` is stopping. After a rolling update
    Serve reports the app RUNNING while the old replicas drain, and HAProxy may still hand
    them requests until they are gone: a router that drains forwards to the internal apps,
    which must stay up until then (deleted at once, a request the draining router still takes
    gets the ingress's 404). False, logged, when some still stop after ``timeout_s``."""
    from ray import serve

    def drained() -> bool:
        try:
            app = serve.status().applications.get(app_name)
        except Exception:  # noqa: BLE001 - a failed read is asked again, as a not-yet
            return False
        dep = app.deployments.get(deployment) if app else None
        replicas = dep.replica_states if dep else {}
        return not any(n for state, n in replicas.items() if str(state).endswith("STOPPING"))

    if poll_until(drained, timeout_s, every_s=0.5):
        return True
    log.warning(
        "Serve app '%s': %s replicas still stop after %.0fs", app_name, deployment, timeout_s
    )
    return False


def _delete(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - cleanup of an app that may never have started
        log.warning("could not delete Serve app '%s': %s", app_name, exc)


def finish(
    serve_cfg: ServeConfig, champion: ModelRef, candidate: ModelRef, cluster: ClusterConfig | None
) -> None:
    """The candidate held at 100%: it becomes the plain public app (a rolling update from the
    router), and the internal apps go. The champion's goes first: it has had no traffic for
    the whole last step, and its replicas are freed before the new public ones start."""
    _delete(version_cfg(serve_cfg, CHAMPION, champion.version).app_name)
    deploy(serve_cfg, candidate, cluster)
    wait_drained(serve_cfg.app_name, INGRESS_DEPLOYMENT[serve_engine(serve_cfg, cluster)])
    _delete(version_cfg(serve_cfg, CANDIDATE, candidate.version).app_name)


def restore_champion(
    serve_cfg: ServeConfig,
    champion: ModelRef,
    candidate: ModelRef,
    cluster: ClusterConfig | None,
) -> None:
    """The way back (the transaction's rollback): the champion becomes the plain public app
    again, then both internal apps go; the router answers until the champion's replicas are
    ready (and drains: it forwards to them until its replicas are gone)."""
    deploy(serve_cfg, champion, cluster)
    wait_drained(serve_cfg.app_name, INGRESS_DEPLOYMENT[serve_engine(serve_cfg, cluster)])
    for role, model in ((CANDIDATE, candidate), (CHAMPION, champion)):
        _delete(version_cfg(serve_cfg, role, model.version).app_name)
