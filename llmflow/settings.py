"""Where llmflow keeps its state, which ports the local stack binds, and the offline switches.

Everything here is read from the environment when asked, never at import time, so a test
or a second stack can point LLMFLOW_HOME and the ports elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Telemetry and hub access are off by default: on an offline machine they fail and slow
# start-up. A user who has a network can set any of these.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Not telemetry, but the same kind of default: Ray Data's progress bars, redrawn from
    # every worker, drown the flow's own log lines in `llmflow run`.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Gradio (the chat page) checks for new versions and reports usage unless told not to.
    "GRADIO_ANALYTICS_ENABLED": "False",
}


def apply_offline_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set each offline switch that is not already set (in ``env``, default os.environ)."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]


def offline_env() -> dict[str, str]:
    """The offline switches as they are in force now (user settings win over defaults)."""
    return {k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}


def home() -> Path:
    """llmflow's state directory: LLMFLOW_HOME, else .llmflow/ in the working directory."""
    return Path(os.environ.get("LLMFLOW_HOME") or Path.cwd() / ".llmflow").resolve()


def default_store_uri() -> str:
    return os.environ.get("LLMFLOW_STORE") or str(home() / "store")


def project_dir() -> Path:
    """The directory holding prefect.yaml and configs/ (the repository root)."""
    env = os.environ.get("LLMFLOW_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "prefect.yaml").is_file():
        return here
    return Path.cwd().resolve()


# Every port a stack binds (LLMFLOW_<NAME>_PORT; the chat page's is bound only on demand):
# a second stack on one machine (the tests', a benchmark's) moves them all off the defaults.
STACK_PORTS = (
    "PREFECT",
    "RAY",
    "DASHBOARD",
    "SERVE",
    "METRICS",
    "RAY_CLIENT",
    "HAPROXY_STATS",
    "HAPROXY_METRICS",
)


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        from llmflow.errors import ConfigError

        raise ConfigError(f"environment variable {name}={raw!r}: expected a port number") from exc


def _choice(name: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        from llmflow.errors import ConfigError

        raise ConfigError(f"environment variable {name}={raw!r}: expected one of {choices}")
    return raw


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    from llmflow.errors import ConfigError

    raise ConfigError(f"environment variable {name}={raw!r}: expected 1/0, true/false, yes/no")


@dataclass(frozen=True)
class StackSettings:
    """Addresses of the local stack. Every port is bound to ``host`` (127.0.0.1 by default)."""

    home: Path
    host: str
    prefect_port: int
    ray_port: int
    dashboard_port: int
    serve_port: int
    work_pool: str
    chat_port: int = 7860
    # Where the Ray head's metrics agent exports Prometheus metrics (Serve's and llmflow's).
    metrics_port: int = 8080
    # Deploy prefect.yaml's schedules paused (LLMFLOW_PAUSE_SCHEDULES=1): a stack that must
    # never start a scheduled run by itself, like the test suite's, whatever the clock says.
    pause_schedules: bool = False
    # The Ray client server's port (ray://); the local stack does not use it, but two heads on
    # one machine (a developer's stack and the tests') must not both bind Ray's default.
    ray_client_port: int = 10001
    # Serve's HTTP ingress: "haproxy" (the default: Ray 2.60's HAProxy in front of replicas
    # that answer HTTP themselves; bench/RESULTS.md measured ~10x the no-op rate and a fifth
    # of the latency on 2 cores) or "proxy" (Ray's Python HTTP proxy actor). A haproxy that
    # outlived a SIGKILLed head keeps the Serve port: `llmflow up` and `down` stop it
    # (processes.stop_stray_haproxy, found by its config file under haproxy_dir).
    serve_ingress: str = "haproxy"
    haproxy_stats_port: int = 8404
    haproxy_metrics_port: int = 9101

    @classmethod
    def from_env(cls) -> StackSettings:
        return cls(
            home=home(),
            host=os.environ.get("LLMFLOW_HOST", "127.0.0.1"),
            prefect_port=_port("LLMFLOW_PREFECT_PORT", 4200),
            ray_port=_port("LLMFLOW_RAY_PORT", 6379),
            dashboard_port=_port("LLMFLOW_DASHBOARD_PORT", 8265),
            serve_port=_port("LLMFLOW_SERVE_PORT", 8000),
            work_pool=os.environ.get("LLMFLOW_WORK_POOL", "llmflow-local"),
            chat_port=_port("LLMFLOW_CHAT_PORT", 7860),
            metrics_port=_port("LLMFLOW_METRICS_PORT", 8080),
            pause_schedules=_flag("LLMFLOW_PAUSE_SCHEDULES"),
            ray_client_port=_port("LLMFLOW_RAY_CLIENT_PORT", 10001),
            serve_ingress=_choice("LLMFLOW_SERVE_INGRESS", ("haproxy", "proxy")),
            haproxy_stats_port=_port("LLMFLOW_HAPROXY_STATS_PORT", 8404),
            haproxy_metrics_port=_port("LLMFLOW_HAPROXY_METRICS_PORT", 9101),
        )

    def serve_ingress_env(self) -> dict[str, str]:
        """What the Ray processes of the stack need for ``serve_ingress``: with haproxy, Ray's
        switches (HAProxy, and the throughput-optimized replica settings it goes with) and
        HAProxy's files and ports kept per stack (Ray's defaults are fixed /tmp paths and
        ports, which two stacks on one machine would share)."""
        if self.serve_ingress != "haproxy":
            return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
        base = self.haproxy_dir
        return {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            # Replicas keep logging to their files; the stack's logs are read there.
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
            # An ingress replica that stops stays reachable this long so HAProxy can drop it,
            # then refuses new connections, which HAProxy retries on another replica. Ray's
            # 30 s default is for remote load balancers; here HAProxy reloads in well under a
            # second, and 30 s of a draining replica holding its CPU stalled rollouts on 4
            # logical CPUs (a canary promotion took 2.5x as long).
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(self.haproxy_stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.haproxy_metrics_port),
        }

    @property
    def haproxy_dir(self) -> Path:
        """HAProxy's files of this stack (its config file names its processes). Not under
        home: HAProxy caps socket paths at 97 characters, and Ray adds a directory named by
        the node id (56) to each."""
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"lf-hap-{digest}"

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def ray_address(self) -> str:
        return f"{self.host}:{self.ray_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def chat_url(self) -> str:
        return f"http://{self.host}:{self.chat_port}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"


def serve_url(cluster: Any = None) -> str:
    """Where the cluster's Serve answers: ``cluster.serve_url``, else LLMFLOW_SERVE_URL, else
    the local stack's (a remote cluster's smoke test must not call 127.0.0.1)."""
    configured = getattr(cluster, "serve_url", None) or os.environ.get("LLMFLOW_SERVE_URL")
    return (configured or StackSettings.from_env().serve_url).rstrip("/")
