"""Where flows run their heavy tasks: a RayTaskRunner wired from the cluster config.

A Prefect task runner is fixed when the flow is defined, before the flow run's parameters
are known. ClusterTaskRunner bridges that: it connects to Ray on the first submitted task,
when the flow run's context holds the validated parameters, and takes the Ray address and
the workers' runtime_env from the `cluster` section of the run's config. So the same flow
runs on the local stack, on a remote cluster, or from a UI form, with only config changed.

The runtime_env carries PREFECT_API_URL and the offline switches to the Ray workers: on a
standalone cluster they do not inherit the driver's environment, and a worker without a
server address starts a temporary Prefect server of its own, whose task runs and logs
never reach the flow's database (prefect issues #18485 and #14494). It never carries a
secret: Ray's runtime_env agent logs its values (llmflow/trust.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Self

from prefect.task_runners import TaskRunner
from prefect_ray import RayTaskRunner

from llmflow.config import ClusterConfig
from llmflow.settings import StackSettings, default_store_uri, offline_env

log = logging.getLogger(__name__)

# Passed through to Ray workers when set in the driver's environment. Never a secret (Ray's
# runtime_env agent logs these values): PREFECT_API_KEY and PREFECT_API_AUTH_STRING reach the
# workers from the nodes' own environment (llmflow/trust.py; the flows check they are set).
PASS_THROUGH = (
    "PREFECT_API_SSL_CERT_FILE",
    "PREFECT_LOGGING_LEVEL",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    "LLMFLOW_HOME",
    "LLMFLOW_PROJECT_DIR",
    "LLMFLOW_SERVE_URL",
    "HF_HOME",
)


def resolve_ray_address(cluster: ClusterConfig) -> str | None:
    """The cluster config's address, else LLMFLOW_RAY_ADDRESS, else the local stack's head."""
    if cluster.ray_address:
        return cluster.ray_address
    if os.environ.get("LLMFLOW_RAY_ADDRESS"):
        return os.environ["LLMFLOW_RAY_ADDRESS"]
    from llmflow import stack

    s = StackSettings.from_env()
    return s.ray_address if stack.ray_healthy(s) else None


def resolve_prefect_api_url(cluster: ClusterConfig) -> str | None:
    if cluster.prefect_api_url:
        return cluster.prefect_api_url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")


def worker_env(cluster: ClusterConfig) -> dict[str, str]:
    """Environment variables every Ray worker of a flow run gets (its runtime_env)."""
    env = offline_env()
    api_url = resolve_prefect_api_url(cluster)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["LLMFLOW_STORE"] = default_store_uri()
    for key in PASS_THROUGH:
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(cluster.env_vars)  # validated: no key that names a secret
    return env


def ray_init_kwargs(cluster: ClusterConfig) -> dict[str, Any]:
    return {
        "runtime_env": {"env_vars": worker_env(cluster)},
        "namespace": "llmflow",
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }


def _cluster_from_run_context() -> ClusterConfig | None:
    """The `cluster` section of the running flow's config parameter, if it has one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        return None
    for value in (ctx.parameters or {}).values():
        cluster = getattr(value, "cluster", None)
        if isinstance(cluster, ClusterConfig):
            return cluster
        if isinstance(value, ClusterConfig):
            return value
    return None


class ClusterTaskRunner(RayTaskRunner):
    """A RayTaskRunner that connects on first use, configured by the flow run's cluster section.

    Args:
        cluster: a fixed cluster config; None reads it from the flow run's parameters (the
            first parameter with a ``cluster`` attribute), falling back to the defaults.
    """

    def __init__(self, cluster: ClusterConfig | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster = cluster
        self._connected = False
        self._owns_ray = False

    def duplicate(self) -> ClusterTaskRunner:
        return type(self)(cluster=self.cluster, address=self.address, init_kwargs=self.init_kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterTaskRunner) and self.cluster == other.cluster

    def __enter__(self) -> Self:
        TaskRunner.__enter__(self)  # connect lazily, in submit(): parameters are known then
        return self

    def connect(self) -> None:
        import ray

        cluster = self.cluster or _cluster_from_run_context() or ClusterConfig()
        self.address = self.address or resolve_ray_address(cluster)
        self.init_kwargs = {**ray_init_kwargs(cluster), **self.init_kwargs}
        if self.address and not self.address.startswith("ray://"):
            # Ray Train's helper actors call the state API without an address; with several
            # clusters on one machine they would pick "the latest" one, not this one.
            env = self.init_kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env.setdefault("RAY_ADDRESS", self.address)
        if ray.is_initialized():
            self._owns_ray = False
        else:
            if not self.address:
                self.logger.warning(
                    "No Ray cluster configured or running: starting a local Ray instance "
                    "for this flow run (run `llmflow up` for a shared local cluster)."
                )
            self._ray_context = ray.init(self.address or None, **self.init_kwargs)
            self._owns_ray = True
            self.logger.info(
                "Connected to Ray at %s (%d nodes)",
                self.address or "a local instance",
                len([n for n in ray.nodes() if n.get("Alive")]),
            )
        self._connected = True

    def ensure_connected(self) -> None:
        """Connect now, once (the flows' resource check reads the cluster before any task)."""
        if not self._connected:
            self.connect()

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # type: ignore[override]
        self.ensure_connected()
        return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        """Run the task in the Ray worker, then ship its logs before returning.

        Prefect batches logs on a background thread; in a Ray worker that thread stalls once
        the task returns to Ray's execution loop, and the logs never reach the server
        (prefect issue #14494; seen here: none of a task's lines arrived). Flushing at the
        end of each task delivers them.
        """
        try:
            return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
        finally:
            from prefect.logging.handlers import APILogWorker

            try:
                APILogWorker.drain_all(timeout=10)
            except Exception:
                log.warning("could not flush task logs to the Prefect API", exc_info=True)

    def __exit__(self, *exc_info: object) -> None:
        import ray

        if self._owns_ray and ray.is_initialized() and ray.get_runtime_context().worker.mode == 0:
            ray.shutdown()
        TaskRunner.__exit__(self, *exc_info)


def ray_task_runner(cluster: ClusterConfig | None = None) -> ClusterTaskRunner:
    """The task runner for a flow's heavy stages, optionally pinned to a cluster config."""
    return ClusterTaskRunner(cluster=cluster)
