"""Starting each part of the local stack: the Prefect server (SQLite or PostgreSQL), the Ray
head and extra nodes, Serve, the Prefect worker, the chat page.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llmflow import database as db
from llmflow.probes import PartStatus, chat_healthy, check_port_free, status
from llmflow.processes import (
    NODE_CPUS,
    NODE_GPUS,
    NODE_RESOURCE,
    child_env,
    default_database,
    ensure_ray_token,
    env_bin,
    node_part,
    process_alive,
    read_state,
    spawn,
    stop_part,
    wait_healthy,
    write_state,
)
from llmflow.settings import StackSettings, project_dir


def start_prefect_server(s: StackSettings, database: str | None = None) -> dict:
    """Start the server on ``database`` (a checked URL; default: SQLite under LLMFLOW_HOME).
    The URL reaches the server through its environment only; the state file and the log
    record it with the password masked."""
    check_port_free(s, s.prefect_port, "the Prefect server", "LLMFLOW_PREFECT_PORT")
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    url = database or default_database(s)
    env = child_env(
        s,
        {
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_SERVER_API_HOST": s.host,
            "PREFECT_SERVER_API_PORT": str(s.prefect_port),
            "PREFECT_UI_API_URL": s.prefect_api_url,
        },
    )
    cmd = [
        env_bin("prefect"),
        "server",
        "start",
        "--host",
        s.host,
        "--port",
        str(s.prefect_port),
    ]
    return spawn(s, "prefect-server", cmd, env, s.home) | {"database": db.mask(url)}


def default_logical_cpus() -> int:
    """Logical CPUs the local head declares: two per core, at least 4.

    Ray's CPU count is a scheduling unit, not a thread count (torch threads are set by each
    stage). With one unit per core, a 2-core laptop serving a model (one replica) could not
    also run a scoring job (one actor plus its read tasks): the job waited forever for a
    CPU (seen here: "Active & requested resources: 2/2 CPU" for 10 minutes).
    """
    return max(4, 2 * (os.cpu_count() or 1))


def start_ray_head(s: StackSettings, num_cpus: int | None, num_gpus: int | None) -> dict:
    check_port_free(s, s.ray_port, "the Ray head", "LLMFLOW_RAY_PORT")
    check_port_free(s, s.dashboard_port, "the Ray dashboard", "LLMFLOW_DASHBOARD_PORT")
    check_port_free(s, s.metrics_port, "the Ray metrics export", "LLMFLOW_METRICS_PORT")
    check_port_free(s, s.ray_client_port, "the Ray client server", "LLMFLOW_RAY_CLIENT_PORT")
    ensure_ray_token(s)
    cmd = [
        env_bin("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={s.host}",
        f"--port={s.ray_port}",
        "--include-dashboard=true",
        f"--dashboard-host={s.host}",
        f"--dashboard-port={s.dashboard_port}",
        f"--metrics-export-port={s.metrics_port}",
        f"--ray-client-server-port={s.ray_client_port}",
        "--disable-usage-stats",
    ]
    cmd.append(f"--num-cpus={num_cpus if num_cpus is not None else default_logical_cpus()}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return spawn(s, "ray-head", cmd, child_env(s, s.serve_ingress_env()), s.home)


def start_ray_node(s: StackSettings, index: int) -> dict:
    """Node ``index`` (2, 3, ...): a second raylet on this machine that joins the head with the
    head's token, bound to the same address, declaring NODE_CPUS logical CPUs, one logical
    GPU and NODE_RESOURCE. Its other ports (node manager, object manager, agents) are
    Ray's free picks, so several nodes share the machine."""
    cmd = [
        env_bin("ray"),
        "start",
        f"--address={s.ray_address}",
        "--block",
        f"--node-ip-address={s.host}",
        f"--num-cpus={NODE_CPUS}",
        f"--num-gpus={NODE_GPUS}",
        f"--resources={json.dumps({NODE_RESOURCE: 1})}",
        "--disable-usage-stats",
    ]
    return spawn(s, node_part(index), cmd, child_env(s, s.serve_ingress_env()), s.home)


# One HTTP proxy, on the head: every node of the local stack shares the machine, so the
# default proxy on every node would bind the same port twice.
SERVE_START = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR")
serve.start(http_options={"host": sys.argv[2], "port": int(sys.argv[3])}, proxy_location="HeadOnly")
print("serve started", flush=True)
"""


def start_serve(s: StackSettings) -> dict:
    check_port_free(s, s.serve_port, "Ray Serve", "LLMFLOW_SERVE_PORT")
    cmd = [sys.executable, "-c", SERVE_START, s.ray_address, s.host, str(s.serve_port)]
    entry = spawn(s, "ray-serve", cmd, child_env(s, s.serve_ingress_env()), s.home)
    # The proxy lives on in the cluster; the starter process just exits.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process_alive(entry):
        time.sleep(0.5)
    return entry | {"pid": None}


def start_worker(s: StackSettings) -> dict:
    cmd = [env_bin("prefect"), "worker", "start", "--pool", s.work_pool, "--type", "process"]
    env = child_env(s)
    env.pop("PREFECT_HOME")  # the worker is a client: a profile of its own is not needed
    env["PREFECT_HOME"] = str(s.home / "worker")
    return spawn(s, "prefect-worker", cmd, env, project_dir())


def _chat_cmd(s: StackSettings, endpoint: str, args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmflow.cli",
        "chat",
        "--host",
        s.host,
        "--port",
        str(s.chat_port),
        "--endpoint",
        endpoint,
        *args,
    ]


def start_chat(
    s: StackSettings,
    endpoint: str,
    args: Sequence[str] = (),
    echo: Callable[[str], None] = lambda _: None,
) -> PartStatus:
    """Start the chat page (`llmflow chat`) as a part of the stack, unless it runs already
    with the same endpoint and options.

    Args:
        s: the stack's settings (the page binds s.host:s.chat_port).
        endpoint: the OpenAI base URL it talks to (…/v1).
        args: more `llmflow chat` options, e.g. ["--config", "configs/tiny.yaml"].
    """
    state = read_state(s)
    cmd = _chat_cmd(s, endpoint, args)
    if chat_healthy(s) and state["chat"].get("cmd") == cmd:
        echo(f"chat: already running at {s.chat_url}")
    else:
        if process_alive(state.get("chat")):
            stop_part(state["chat"])  # unhealthy, or started for another endpoint or config
        check_port_free(s, s.chat_port, "the chat", "LLMFLOW_CHAT_PORT")
        state["chat"] = spawn(s, "chat", cmd, child_env(s), project_dir()) | {"endpoint": endpoint}
        write_state(s, state)
        wait_healthy(
            "the chat", lambda: chat_healthy(s), 120, state["chat"], Path(state["chat"]["log"])
        )
        echo(f"chat: {s.chat_url} (model endpoint {endpoint})")
    return next(p for p in status(s) if p.name == "chat")


def stop_chat(s: StackSettings) -> bool:
    """Stop the chat part (only it) and forget it; True when it was running."""
    state = read_state(s)
    entry = state.pop("chat", None)
    stopped = bool(entry) and stop_part(entry)
    write_state(s, state)
    return stopped
