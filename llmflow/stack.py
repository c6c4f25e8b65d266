"""The local stack: a Prefect server, a Ray head with Serve, a Prefect process worker and,
when asked for, more Ray nodes on the same machine (`llmflow up --nodes 2`: each extra node
declares one logical GPU and the custom resource `gpu_node`) and the chat page over the
served model (`llmflow up --chat`). The server keeps its state in SQLite under LLMFLOW_HOME,
or in PostgreSQL (`llmflow up --database postgresql+asyncpg://...`).

`llmflow up` starts each part bound to 127.0.0.1, waits until it is healthy, records its
pid in .llmflow/stack.json and logs to .llmflow/logs/. It is idempotent: a part that is
already healthy is left alone. `llmflow down` stops exactly what `up` started, by pid
(each part runs in its own process group, so its children go with it).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from llmflow import database as db
from llmflow.errors import ConfigError, StackError
from llmflow.launch import (
    start_chat,
    start_prefect_server,
    start_ray_head,
    start_ray_node,
    start_serve,
    start_worker,
)
from llmflow.probes import (
    PartStatus,
    node_healthy,
    prefect_healthy,
    ray_healthy,
    raylet_node_id,
    serve_healthy,
    status,
    worker_healthy,
)
from llmflow.processes import (
    DATABASE_ENV,
    NODE_CPUS,
    NODE_GPUS,
    NODE_RESOURCE,
    OPTIONAL_PARTS,
    PARTS,
    child_env,
    client_env,
    default_database,
    env_bin,
    grace_s,
    log_tail,
    node_part,
    node_parts,
    process_alive,
    read_state,
    stop_part,
    stop_stray_haproxy,
    wait_healthy,
    write_state,
)
from llmflow.settings import StackSettings, project_dir


def deploy(s: StackSettings, prefect_file: Path | None = None) -> None:
    """Register every deployment of ``prefect_file`` (default: the project's prefect.yaml)
    with the server, non-interactively; with ``s.pause_schedules`` every schedule is
    registered paused, so the server never creates a scheduled run for it."""
    env = child_env(s)
    env["PREFECT_HOME"] = str(s.home / "worker")
    source = prefect_file or project_dir() / "prefect.yaml"
    if s.pause_schedules:
        source = _paused_copy(s, source)
    log = s.logs_dir / "deploy.log"
    with open(log, "ab") as out:
        proc = subprocess.run(
            [
                env_bin("prefect"),
                "--no-prompt",
                "deploy",
                "--all",
                "--prefect-file",
                str(source),
            ],
            cwd=project_dir(),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    if proc.returncode != 0:
        raise StackError(f"prefect deploy --all failed (exit {proc.returncode}); see {log}")


def _paused_copy(s: StackSettings, prefect_file: Path) -> Path:
    """A copy of ``prefect_file`` under LLMFLOW_HOME with every schedule ``active: false``.

    Pausing after `prefect deploy` would race the server's scheduler (it creates runs within
    seconds of a deploy, and a pause then deletes them under whoever lists them), so the
    schedules are registered paused. `prefect deploy` still runs in the project directory,
    which is where the workers load the flows from.
    """
    import yaml

    doc = yaml.safe_load(prefect_file.read_text())
    for deployment in doc.get("deployments") or []:
        for schedule in deployment.get("schedules") or []:
            schedule["active"] = False
    dest = s.home / f"paused-{prefect_file.name}"
    s.home.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, dest)
    return dest


def up(
    s: StackSettings | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    nodes: int | None = None,
    database: str | None = None,
    with_deploy: bool = True,
    restore: bool = True,
    chat_endpoint: str | None = None,
    chat_args: Sequence[str] = (),
    echo: Callable[[str], None] = lambda _: None,
) -> list[PartStatus]:
    """Start every part of the stack that is not already healthy; return their status.

    Args:
        nodes: Ray nodes on this machine, the head included: nodes 2..N start (each
            declares a logical GPU and NODE_RESOURCE), recorded nodes above N stop. None
            keeps the extra nodes that were started before (restarting any that died).
        database: the Prefect server's database URL (default: LLMFLOW_DATABASE_URL, else
            SQLite under LLMFLOW_HOME). It is checked, and reached once, before anything
            starts; a server already running on another database is an error.
        restore: bring back every recorded champion whose Serve app does not answer
            (``restore_serving``).
        chat_endpoint: an OpenAI base URL: the chat page starts too (``start_chat``).

    Raises:
        ConfigError: ``nodes`` below 1, or a malformed database URL.
        StackError: a part cannot start, or the database cannot be reached.
    """
    s = s or StackSettings.from_env()
    if nodes is not None and nodes < 1:
        raise ConfigError(f"--nodes {nodes}: the stack has at least one node (the head)")
    database = database or os.environ.get(DATABASE_ENV) or None
    if database:
        db.validate(database)
    s.home.mkdir(parents=True, exist_ok=True)
    state = read_state(s)
    started: list[str] = []
    _check_database(s, state, database)

    def need(name: str, healthy: Callable[[], bool]) -> bool:
        if healthy():
            echo(f"{name}: already running")
            return False
        if process_alive(state.get(name)):
            stop_part(state[name], grace_s(name))  # alive but unhealthy: a stale earlier part
        return True

    state_lock = threading.Lock()
    # The server and the head start side by side; each takes several seconds.
    if need("prefect-server", lambda: prefect_healthy(s.prefect_api_url)):
        if database:
            db.check_reachable(database)
        state["prefect-server"] = start_prefect_server(s, database)
        started.append("prefect-server")
    if need("ray-head", lambda: ray_healthy(s)):
        for pid in stop_stray_haproxy(s):  # left by a head that was killed: it holds the port
            echo(f"haproxy: stopped pid {pid}, left by an earlier Ray head")
        state["ray-head"] = start_ray_head(s, num_cpus, num_gpus)
        started.append("ray-head")
    write_state(s, state)
    try:
        if "prefect-server" in started:
            wait_healthy(
                "the Prefect server",
                lambda: prefect_healthy(s.prefect_api_url),
                120,
                state["prefect-server"],
                Path(state["prefect-server"]["log"]),
            )
            echo(
                f"prefect-server: started at {s.prefect_url} (database "
                f"{state['prefect-server']['database']})"
            )
        if "ray-head" in started:
            wait_healthy(
                "the Ray head",
                lambda: ray_healthy(s),
                120,
                state["ray-head"],
                Path(state["ray-head"]["log"]),
            )
            echo(f"ray-head: started at {s.ray_address} (dashboard {s.dashboard_url})")
        # With the server and the head up, the Prefect side (the worker, whose flow runs
        # connect to the head, and the deployments) comes up while Serve and the extra nodes
        # do, not after them (measured: 7.7 s of a 30 s `up` on 2 cores).
        with ThreadPoolExecutor(1, thread_name_prefix="llmflow-up") as pool:
            prefect_side = pool.submit(
                _start_prefect_side, s, state, need, echo, with_deploy, state_lock
            )
            try:
                _start_ray_side(s, state, nodes, need, echo, state_lock)
            finally:
                wait([prefect_side])
            prefect_side.result()
    finally:
        write_state(s, state)
    if restore:
        restore_serving(s, echo)
    if chat_endpoint:
        start_chat(s, chat_endpoint, chat_args, echo=echo)
    return status(s)


def _start_ray_side(
    s: StackSettings,
    state: dict,
    nodes: int | None,
    need: Callable[[str, Callable[[], bool]], bool],
    echo: Callable[[str], None],
    lock: threading.Lock,
) -> None:
    """Serve's HTTP ingress on the head, the extra nodes converged."""
    if not serve_healthy(s):
        entry = start_serve(s)
        with lock:
            state["ray-serve"] = entry
            write_state(s, state)
        if not serve_healthy(s):
            raise StackError(
                f"Ray Serve did not start on {s.serve_url}; see {entry['log']} "
                f"({log_tail(Path(entry['log']))})"
            )
        echo(f"ray-serve: HTTP ingress ({s.serve_ingress}) at {s.serve_url}")
    else:
        echo("ray-serve: already running")
    _converge_nodes(s, state, nodes, need, echo, lock)


def _start_prefect_side(
    s: StackSettings,
    state: dict,
    need: Callable[[str, Callable[[], bool]], bool],
    echo: Callable[[str], None],
    with_deploy: bool,
    lock: threading.Lock,
) -> None:
    """The Prefect worker polling its pool, then prefect.yaml's deployments registered."""
    if need("prefect-worker", lambda: worker_healthy(s)):
        entry = start_worker(s)
        with lock:
            state["prefect-worker"] = entry
            write_state(s, state)
        wait_healthy("the Prefect worker", lambda: worker_healthy(s), 90, entry, Path(entry["log"]))
        echo(f"prefect-worker: polling work pool '{s.work_pool}'")
    if with_deploy:
        deploy(s)
        echo(
            "deployments: prefect.yaml deployed"
            + (" (schedules paused)" if s.pause_schedules else "")
        )


def has_recorded_serving(store=None) -> bool:
    """Whether the store records any served champion (models/<name>/serving.json)."""
    from llmflow.promote import serving
    from llmflow.store import Store

    store = store or Store()
    return any(store.exists("models", n, serving.SERVING) for n in store.listdir("models"))


def restore_serving(s: StackSettings, echo: Callable[[str], None] = lambda _: None) -> list[str]:
    """Deploy the champions recorded in the store (models/<name>/serving.json) whose apps do
    not answer: Serve's applications live in the Ray head and go with it. Returns the
    restored "name:version"s; one that cannot be restored is echoed with its reason and
    the stack stays up (`llmflow status` shows what serves).

    It connects to Ray from this process (the CLI's, in a user's shell), so this process
    takes the stack's client environment first: the head's token above all, without which
    the connection fails with InvalidAuthToken.
    """
    from llmflow.promote import serving
    from llmflow.store import Store

    store = Store()
    if not has_recorded_serving(store):
        return []
    os.environ.update(client_env(s))
    restored, _ = serving.restore_champions(store, s.ray_address, echo)
    return restored


def _check_database(s: StackSettings, state: dict, database: str | None) -> None:
    """Refuse to leave the server on another database than the one asked for (a running
    server is never moved silently), and to restart a server that ran on a database given
    on the command line without that URL (it holds the flow runs; SQLite would hide them)."""
    entry = state.get("prefect-server")
    if not entry and not database:
        return
    running = prefect_healthy(s.prefect_api_url)
    if not entry and not running:
        return
    # A server this home did not start (another LLMFLOW_HOME on the same port): its
    # database is not ours to know.
    was = (
        entry.get("database", db.mask(default_database(s)))
        if entry
        else (f"a database this stack did not choose (not started from {s.home})")
    )
    want = db.mask(database or default_database(s))
    if running and database and was != want:
        raise StackError(
            f"the Prefect server runs on {was}; stop the stack (llmflow down) to start it on {want}"
        )
    if not running and not database and was != want:
        raise StackError(
            f"the Prefect server was started on {was}; give that URL again "
            f"(llmflow up --database, or {DATABASE_ENV}) or run llmflow down"
        )


def _converge_nodes(
    s: StackSettings,
    state: dict,
    nodes: int | None,
    need: Callable[[str, Callable[[], bool]], bool],
    echo: Callable[[str], None],
    lock: threading.Lock,
) -> None:
    """Start nodes 2..``nodes`` that are not healthy; stop recorded nodes above ``nodes``.
    ``state`` changes under ``lock`` (the Prefect side records its worker meanwhile)."""
    recorded = [int(n[9:]) for n in node_parts(state)]
    wanted = range(2, nodes + 1) if nodes is not None else recorded
    for index in recorded:
        if index not in wanted:
            with lock:
                entry = state.pop(node_part(index))
            if stop_part(entry, grace_s(node_part(index))):
                echo(f"{node_part(index)}: stopped (pid {entry['pid']})")
    for index in wanted:
        name = node_part(index)
        if need(name, lambda name=name: node_healthy(s, name)):
            entry = start_ray_node(s, index)
            with lock:
                state[name] = entry
                write_state(s, state)
            wait_healthy(
                f"Ray node {index}",
                lambda name=name: node_healthy(s, name),
                120,
                entry,
                Path(entry["log"]),
            )
            with lock:
                entry["node_id"] = raylet_node_id(entry)
            echo(
                f"{name}: joined {s.ray_address} ({NODE_CPUS} CPUs, {NODE_GPUS} logical GPU, "
                f"{NODE_RESOURCE}), node {state[name]['node_id'][:12]}"
            )


def down(s: StackSettings | None = None, echo: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop what `up` started, by recorded pid, worker first; returns the parts stopped."""
    s = s or StackSettings.from_env()
    state = read_state(s)
    stopped = []
    # Extra Ray nodes before the head, the highest first.
    for name in (*OPTIONAL_PARTS, *reversed(node_parts(state)), *reversed(PARTS)):
        entry = state.pop(name, None)
        if entry and stop_part(entry, grace_s(name)):
            stopped.append(name)
            echo(f"{name}: stopped (pid {entry['pid']})")
    write_state(s, state)
    for pid in stop_stray_haproxy(s):
        stopped.append("haproxy")
        echo(f"haproxy: stopped (pid {pid}), outlived its Ray head")
    if not stopped:
        echo("nothing was running")
    return stopped
