"""Health probes of the local stack's parts (ports, the Prefect API, the Ray head and its
nodes, Serve, the worker, the chat page) and `status`, which runs them all.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from llmflow import database as db
from llmflow.errors import StackError
from llmflow.processes import (
    NODE_CPUS,
    NODE_GPUS,
    NODE_RESOURCE,
    PARTS,
    default_database,
    node_parts,
    prefect_auth_string,
    process_alive,
    ray_token_path,
    read_state,
)
from llmflow.settings import StackSettings

log = logging.getLogger(__name__)


@dataclass
class PartStatus:
    name: str
    url: str
    pid: int | None
    healthy: bool
    detail: str = ""


# -- probes -----------------------------------------------------------------------------------
def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _port_owner(port: int) -> str:
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
    except Exception as exc:  # noqa: BLE001 - best effort: the owner is a hint, not the error
        log.debug("could not find the owner of port %d: %s", port, exc)
    return ""


def check_port_free(s: StackSettings, port: int, part: str, env_var: str) -> None:
    if port_open(s.host, port):
        raise StackError(
            f"cannot start {part}: port {s.host}:{port} is already in use{_port_owner(port)}; "
            f"stop that program or set {env_var} to another port"
        )


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(url, timeout=timeout, headers=headers or {})
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def prefect_auth_headers() -> dict[str, str]:
    """The Authorization header of Prefect's basic auth, when credentials are set."""
    import base64

    auth = prefect_auth_string()
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def prefect_healthy(api_url: str, timeout: float = 2.0) -> bool:
    return _http_ok(
        f"{api_url.rstrip('/')}/health", headers=prefect_auth_headers(), timeout=timeout
    )


def ray_headers(s: StackSettings) -> dict[str, str]:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or ray_token_path(s))
    token = os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.exists() else "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_healthy(s: StackSettings) -> bool:
    """The head's GCS port accepts connections and its dashboard answers an authenticated
    request (so the token we hand to clients is the one the head checks)."""
    return port_open(s.host, s.ray_port) and _http_ok(
        f"{s.dashboard_url}/api/version", headers=ray_headers(s)
    )


def serve_healthy(s: StackSettings) -> bool:
    """The Serve HTTP proxy answers. Before any application is deployed it answers 503
    "Route table is not populated yet": the proxy is up, it just has nothing to route."""
    try:
        r = httpx.get(f"{s.serve_url}/-/healthz", timeout=2.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 or "not populated" in r.text


def ray_nodes(s: StackSettings) -> list[dict]:
    """The cluster's nodes as Ray's state API lists them (node_id, state, resources_total,
    is_head_node ...), through the head's dashboard; [] when it does not answer."""
    try:
        r = httpx.get(
            f"{s.dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "detail": 1},
            headers=ray_headers(s),
            timeout=5.0,
        )
        return r.json()["data"]["result"]["result"] if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def raylet_node_id(entry: dict | None) -> str | None:
    """The node id of the raylet a recorded `ray start --block` process started (its
    command line carries --node_id), or None while it has not started one."""
    if not process_alive(entry):
        return None
    import psutil

    try:
        for child in psutil.Process(entry["pid"]).children(recursive=True):
            for arg in child.cmdline():
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
    except psutil.Error:
        pass
    return None


def node_healthy(s: StackSettings, name: str) -> bool:
    """Our `ray start` process of node ``name`` runs and the head lists its raylet ALIVE."""
    node_id = raylet_node_id(read_state(s).get(name))
    return bool(node_id) and any(
        n.get("node_id") == node_id and n.get("state") == "ALIVE" for n in ray_nodes(s)
    )


def worker_healthy(s: StackSettings) -> bool:
    """Our worker process runs and the server lists a worker of the pool as ONLINE (the
    server keeps a stopped worker ONLINE until its heartbeat times out, so the process
    check comes first)."""
    if not process_alive(read_state(s).get("prefect-worker")):
        return False
    try:
        r = httpx.post(
            f"{s.prefect_api_url}/work_pools/{s.work_pool}/workers/filter",
            json={},
            headers=prefect_auth_headers(),
            timeout=2.0,
        )
        return r.status_code == 200 and any(w.get("status") == "ONLINE" for w in r.json())
    except httpx.HTTPError:
        return False


def chat_healthy(s: StackSettings) -> bool:
    """Our chat process runs and its page answers."""
    return process_alive(read_state(s).get("chat")) and _http_ok(f"{s.chat_url}/", timeout=5.0)


def status(s: StackSettings | None = None) -> list[PartStatus]:
    s = s or StackSettings.from_env()
    state = read_state(s)

    def pid(name: str) -> int | None:
        e = state.get(name)
        return e["pid"] if process_alive(e) else None

    database = (state.get("prefect-server") or {}).get("database") or db.mask(default_database(s))
    parts = [
        PartStatus(
            "prefect-server",
            s.prefect_url,
            pid("prefect-server"),
            prefect_healthy(s.prefect_api_url),
            f"database {database}",
        ),
        PartStatus(
            "ray-head",
            s.ray_address,
            pid("ray-head"),
            ray_healthy(s),
            f"dashboard {s.dashboard_url}",
        ),
        PartStatus("ray-serve", s.serve_url, pid("ray-head"), serve_healthy(s)),
        PartStatus(
            "prefect-worker", f"pool {s.work_pool}", pid("prefect-worker"), worker_healthy(s)
        ),
    ]
    for name in node_parts(state):
        node_id = state[name].get("node_id") or raylet_node_id(state[name]) or "?"
        parts.append(
            PartStatus(
                name,
                f"joined {s.ray_address}",
                pid(name),
                node_healthy(s, name),
                f"node {node_id[:12]}: {NODE_CPUS} CPU, {NODE_GPUS} GPU (logical), {NODE_RESOURCE}",
            )
        )
    if "chat" in state:
        parts.append(
            PartStatus(
                "chat",
                s.chat_url,
                pid("chat"),
                chat_healthy(s),
                f"model endpoint {state['chat'].get('endpoint', '?')}",
            )
        )
    return parts


def is_up(s: StackSettings | None = None) -> bool:
    """The parts flows need are healthy (the optional chat and extra nodes do not count)."""
    return all(p.healthy for p in status(s) if p.name in PARTS)


def status_dict(parts: list[PartStatus]) -> list[dict]:
    return [asdict(p) for p in parts]
