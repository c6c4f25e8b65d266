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

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from llmflow import database as db
from llmflow.errors import ConfigError, StackError
from llmflow.settings import StackSettings, offline_env, project_dir

log = logging.getLogger(__name__)

PARTS = ("prefect-server", "ray-head", "ray-serve", "prefect-worker")
# Started only on request; listed by `status` only when it was started.
OPTIONAL_PARTS = ("chat",)
# What each extra node of `llmflow up --nodes N` declares: a logical GPU (no CUDA behind it
# here) and a custom resource that work asks for to run there, e.g. training with
# `train.resources_per_worker: {gpu_node: 1}`. A KubeRay GPU group declares the same
# (infra/k8s/raycluster.yaml), so one config places training on both.
NODE_RESOURCE = "gpu_node"
NODE_CPUS = 2
NODE_GPUS = 1
# The Prefect server's database URL when `llmflow up` is given none (`llmflow run` too).
DATABASE_ENV = "LLMFLOW_DATABASE_URL"


def node_part(index: int) -> str:
    """The state-file and `status` name of node ``index`` (the head is node 1)."""
    return f"ray-node-{index}"


def _node_parts(state: dict) -> list[str]:
    """Recorded extra nodes, by index."""
    names = [n for n in state if n.startswith("ray-node-") and n[9:].isdigit()]
    return sorted(names, key=lambda n: int(n[9:]))


@dataclass
class PartStatus:
    name: str
    url: str
    pid: int | None
    healthy: bool
    detail: str = ""


def _bin(name: str) -> str:
    """An executable of this environment (prefect, ray) next to the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# -- environment ------------------------------------------------------------------------------
def ray_token_path(s: StackSettings) -> Path:
    return s.home / "ray" / "auth_token"


def ensure_ray_token(s: StackSettings) -> Path:
    """The local head's token: Ray's token authentication stays on (DESIGN.md)."""
    path = ray_token_path(s)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(tmp, path)
    return path


def ray_auth_env(s: StackSettings) -> dict[str, str]:
    """What a client needs to talk to the local head: token mode and the token's file.

    A token the user set (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) wins: it is theirs to manage.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(s))}


def client_env(s: StackSettings) -> dict[str, str]:
    """Environment for processes that use the local stack (CLI runs, the worker, tests)."""
    env = offline_env()
    env.update(ray_auth_env(s))
    env.update(
        {
            "PREFECT_API_URL": s.prefect_api_url,
            "LLMFLOW_HOME": str(s.home),
            "LLMFLOW_RAY_ADDRESS": s.ray_address,
            "LLMFLOW_SERVE_URL": s.serve_url,
            "LLMFLOW_PROJECT_DIR": str(project_dir()),
            "LLMFLOW_WORK_POOL": s.work_pool,
            # Persisted task results (the prepare cache among them) in one place for every
            # process of the stack: the CLI, the worker's flow runs and the Ray workers.
            "PREFECT_LOCAL_STORAGE_PATH": os.environ.get(
                "PREFECT_LOCAL_STORAGE_PATH", str(s.home / "results")
            ),
        }
    )
    # Basic auth on the server (PREFECT_SERVER_API_AUTH_STRING="user:password"): the stack's
    # own clients (worker, deploy, CLI runs, Ray workers) present the same credentials.
    auth = _prefect_auth_string()
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def _child_env(s: StackSettings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(client_env(s))
    # Children must not inherit a client profile pointing at some other server.
    env.pop("PREFECT_PROFILE", None)
    # The database URL (with its password) goes to the server alone, as the variable Prefect
    # reads (_start_prefect_server); no other part needs it.
    env.pop(DATABASE_ENV, None)
    env["PREFECT_HOME"] = str(s.prefect_home)
    env.update(extra or {})
    return env


# -- state file -------------------------------------------------------------------------------
def _read_state(s: StackSettings) -> dict[str, dict]:
    try:
        return json.loads(s.state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(s: StackSettings, state: dict[str, dict]) -> None:
    s.home.mkdir(parents=True, exist_ok=True)
    tmp = s.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, s.state_file)


def _process_alive(entry: dict | None) -> bool:
    """True when the recorded pid still runs and is the process we started (same start time)."""
    if not entry or not entry.get("pid"):
        return False
    import psutil

    try:
        p = psutil.Process(entry["pid"])
        return abs(p.create_time() - entry.get("create_time", 0)) < 1.0 and p.status() != "zombie"
    except psutil.Error:
        return False


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


def _check_port_free(s: StackSettings, port: int, part: str, env_var: str) -> None:
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


def _prefect_auth_string() -> str | None:
    """Prefect basic auth's "user:password": the client's setting, else the server's."""
    return os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get(
        "PREFECT_SERVER_API_AUTH_STRING"
    )


def prefect_auth_headers() -> dict[str, str]:
    """The Authorization header of Prefect's basic auth, when credentials are set."""
    import base64

    auth = _prefect_auth_string()
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def prefect_healthy(api_url: str, timeout: float = 2.0) -> bool:
    return _http_ok(
        f"{api_url.rstrip('/')}/health", headers=prefect_auth_headers(), timeout=timeout
    )


def _ray_headers(s: StackSettings) -> dict[str, str]:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or ray_token_path(s))
    token = os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.exists() else "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_healthy(s: StackSettings) -> bool:
    """The head's GCS port accepts connections and its dashboard answers an authenticated
    request (so the token we hand to clients is the one the head checks)."""
    return port_open(s.host, s.ray_port) and _http_ok(
        f"{s.dashboard_url}/api/version", headers=_ray_headers(s)
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
            headers=_ray_headers(s),
            timeout=5.0,
        )
        return r.json()["data"]["result"]["result"] if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def _raylet_node_id(entry: dict | None) -> str | None:
    """The node id of the raylet a recorded `ray start --block` process started (its
    command line carries --node_id), or None while it has not started one."""
    if not _process_alive(entry):
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
    node_id = _raylet_node_id(_read_state(s).get(name))
    return bool(node_id) and any(
        n.get("node_id") == node_id and n.get("state") == "ALIVE" for n in ray_nodes(s)
    )


def worker_healthy(s: StackSettings) -> bool:
    """Our worker process runs and the server lists a worker of the pool as ONLINE (the
    server keeps a stopped worker ONLINE until its heartbeat times out, so the process
    check comes first)."""
    if not _process_alive(_read_state(s).get("prefect-worker")):
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
    return _process_alive(_read_state(s).get("chat")) and _http_ok(f"{s.chat_url}/", timeout=5.0)


def _wait(what: str, probe: Callable[[], bool], timeout: float, entry: dict, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        if not _process_alive(entry):
            raise StackError(f"{what} exited while starting; see {log} ({_tail(log)})")
        time.sleep(0.5)
    raise StackError(f"{what} did not become healthy within {timeout:.0f}s; see {log}")


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else "log is empty"
    except FileNotFoundError:
        return "no log"


# -- starting and stopping --------------------------------------------------------------------
def _spawn(s: StackSettings, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    import psutil

    s.logs_dir.mkdir(parents=True, exist_ok=True)
    log = s.logs_dir / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return {
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "cmd": cmd,
        "log": str(log),
    }


def _stop(entry: dict, timeout: float = 20.0) -> bool:
    """Stop a recorded process group: SIGTERM, then SIGKILL after ``timeout``."""
    if not _process_alive(entry):
        return False
    import psutil

    pid = entry["pid"]
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    try:
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]
    except psutil.Error:
        group = []
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    _, alive = psutil.wait_procs(group, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def default_database(s: StackSettings) -> str:
    return db.sqlite_url(s.prefect_home / "prefect.db")


def _start_prefect_server(s: StackSettings, database: str | None = None) -> dict:
    """Start the server on ``database`` (a checked URL; default: SQLite under LLMFLOW_HOME).
    The URL reaches the server through its environment only; the state file and the log
    record it with the password masked."""
    _check_port_free(s, s.prefect_port, "the Prefect server", "LLMFLOW_PREFECT_PORT")
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    url = database or default_database(s)
    env = _child_env(
        s,
        {
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_SERVER_API_HOST": s.host,
            "PREFECT_SERVER_API_PORT": str(s.prefect_port),
            "PREFECT_UI_API_URL": s.prefect_api_url,
        },
    )
    cmd = [_bin("prefect"), "server", "start", "--host", s.host, "--port", str(s.prefect_port)]
    return _spawn(s, "prefect-server", cmd, env, s.home) | {"database": db.mask(url)}


def default_logical_cpus() -> int:
    """Logical CPUs the local head declares: two per core, at least 4.

    Ray's CPU count is a scheduling unit, not a thread count (torch threads are set by each
    stage). With one unit per core, a 2-core laptop serving a model (one replica) could not
    also run a scoring job (one actor plus its read tasks): the job waited forever for a
    CPU (seen here: "Active & requested resources: 2/2 CPU" for 10 minutes).
    """
    return max(4, 2 * (os.cpu_count() or 1))


def _start_ray_head(s: StackSettings, num_cpus: int | None, num_gpus: int | None) -> dict:
    _check_port_free(s, s.ray_port, "the Ray head", "LLMFLOW_RAY_PORT")
    _check_port_free(s, s.dashboard_port, "the Ray dashboard", "LLMFLOW_DASHBOARD_PORT")
    ensure_ray_token(s)
    cmd = [
        _bin("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={s.host}",
        f"--port={s.ray_port}",
        "--include-dashboard=true",
        f"--dashboard-host={s.host}",
        f"--dashboard-port={s.dashboard_port}",
        "--disable-usage-stats",
    ]
    cmd.append(f"--num-cpus={num_cpus if num_cpus is not None else default_logical_cpus()}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return _spawn(s, "ray-head", cmd, _child_env(s), s.home)


def _start_ray_node(s: StackSettings, index: int) -> dict:
    """Node ``index`` (2, 3, ...): a second raylet on this machine that joins the head with the
    head's token, bound to the same address, declaring NODE_CPUS logical CPUs, one logical
    GPU and NODE_RESOURCE. Its other ports (node manager, object manager, agents) are
    Ray's free picks, so several nodes share the machine."""
    cmd = [
        _bin("ray"),
        "start",
        f"--address={s.ray_address}",
        "--block",
        f"--node-ip-address={s.host}",
        f"--num-cpus={NODE_CPUS}",
        f"--num-gpus={NODE_GPUS}",
        f"--resources={json.dumps({NODE_RESOURCE: 1})}",
        "--disable-usage-stats",
    ]
    return _spawn(s, node_part(index), cmd, _child_env(s), s.home)


# One HTTP proxy, on the head: every node of the local stack shares the machine, so the
# default proxy on every node would bind the same port twice.
SERVE_START = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR")
serve.start(http_options={"host": sys.argv[2], "port": int(sys.argv[3])}, proxy_location="HeadOnly")
print("serve started", flush=True)
"""


def _start_serve(s: StackSettings) -> dict:
    _check_port_free(s, s.serve_port, "Ray Serve", "LLMFLOW_SERVE_PORT")
    cmd = [sys.executable, "-c", SERVE_START, s.ray_address, s.host, str(s.serve_port)]
    entry = _spawn(s, "ray-serve", cmd, _child_env(s), s.home)
    # The proxy lives on in the cluster; the starter process just exits.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _process_alive(entry):
        time.sleep(0.5)
    return entry | {"pid": None}


def _start_worker(s: StackSettings) -> dict:
    cmd = [_bin("prefect"), "worker", "start", "--pool", s.work_pool, "--type", "process"]
    env = _child_env(s)
    env.pop("PREFECT_HOME")  # the worker is a client: a profile of its own is not needed
    env["PREFECT_HOME"] = str(s.home / "worker")
    return _spawn(s, "prefect-worker", cmd, env, project_dir())


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
    state = _read_state(s)
    cmd = _chat_cmd(s, endpoint, args)
    if chat_healthy(s) and state["chat"].get("cmd") == cmd:
        echo(f"chat: already running at {s.chat_url}")
    else:
        if _process_alive(state.get("chat")):
            _stop(state["chat"])  # unhealthy, or started for another endpoint or config
        _check_port_free(s, s.chat_port, "the chat", "LLMFLOW_CHAT_PORT")
        state["chat"] = _spawn(s, "chat", cmd, _child_env(s), project_dir()) | {
            "endpoint": endpoint
        }
        _write_state(s, state)
        _wait("the chat", lambda: chat_healthy(s), 120, state["chat"], Path(state["chat"]["log"]))
        echo(f"chat: {s.chat_url} (model endpoint {endpoint})")
    return next(p for p in status(s) if p.name == "chat")


def stop_chat(s: StackSettings) -> bool:
    """Stop the chat part (only it) and forget it; True when it was running."""
    state = _read_state(s)
    entry = state.pop("chat", None)
    stopped = bool(entry) and _stop(entry)
    _write_state(s, state)
    return stopped


def deploy(s: StackSettings, prefect_file: Path | None = None) -> None:
    """Register every deployment of ``prefect_file`` (default: the project's prefect.yaml)
    with the server, non-interactively; with ``s.pause_schedules`` every schedule is
    registered paused, so the server never creates a scheduled run for it."""
    env = _child_env(s)
    env["PREFECT_HOME"] = str(s.home / "worker")
    source = prefect_file or project_dir() / "prefect.yaml"
    if s.pause_schedules:
        source = _paused_copy(s, source)
    log = s.logs_dir / "deploy.log"
    with open(log, "ab") as out:
        proc = subprocess.run(
            [_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(source)],
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
    state = _read_state(s)
    started: list[str] = []
    _check_database(s, state, database)

    def need(name: str, healthy: Callable[[], bool]) -> bool:
        if healthy():
            echo(f"{name}: already running")
            return False
        if _process_alive(state.get(name)):
            _stop(state[name])  # alive but unhealthy: a stale part of an earlier up
        return True

    # The server and the head start side by side; each takes several seconds.
    if need("prefect-server", lambda: prefect_healthy(s.prefect_api_url)):
        if database:
            db.check_reachable(database)
        state["prefect-server"] = _start_prefect_server(s, database)
        started.append("prefect-server")
    if need("ray-head", lambda: ray_healthy(s)):
        state["ray-head"] = _start_ray_head(s, num_cpus, num_gpus)
        started.append("ray-head")
    _write_state(s, state)
    try:
        if "prefect-server" in started:
            _wait(
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
            _wait(
                "the Ray head",
                lambda: ray_healthy(s),
                120,
                state["ray-head"],
                Path(state["ray-head"]["log"]),
            )
            echo(f"ray-head: started at {s.ray_address} (dashboard {s.dashboard_url})")
        if not serve_healthy(s):
            entry = _start_serve(s)
            state["ray-serve"] = entry
            _write_state(s, state)
            if not serve_healthy(s):
                raise StackError(
                    f"Ray Serve did not start on {s.serve_url}; see {entry['log']} "
                    f"({_tail(Path(entry['log']))})"
                )
            echo(f"ray-serve: HTTP proxy at {s.serve_url}")
        else:
            echo("ray-serve: already running")
        _converge_nodes(s, state, nodes, need, echo)
        if need("prefect-worker", lambda: worker_healthy(s)):
            state["prefect-worker"] = _start_worker(s)
            _write_state(s, state)
            _wait(
                "the Prefect worker",
                lambda: worker_healthy(s),
                90,
                state["prefect-worker"],
                Path(state["prefect-worker"]["log"]),
            )
            echo(f"prefect-worker: polling work pool '{s.work_pool}'")
        if with_deploy:
            deploy(s)
            echo(
                "deployments: prefect.yaml deployed"
                + (" (schedules paused)" if s.pause_schedules else "")
            )
    finally:
        _write_state(s, state)
    if chat_endpoint:
        start_chat(s, chat_endpoint, chat_args, echo=echo)
    return status(s)


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
) -> None:
    """Start nodes 2..``nodes`` that are not healthy; stop recorded nodes above ``nodes``."""
    recorded = [int(n[9:]) for n in _node_parts(state)]
    wanted = range(2, nodes + 1) if nodes is not None else recorded
    for index in recorded:
        if index not in wanted:
            entry = state.pop(node_part(index))
            if _stop(entry):
                echo(f"{node_part(index)}: stopped (pid {entry['pid']})")
    for index in wanted:
        name = node_part(index)
        if need(name, lambda name=name: node_healthy(s, name)):
            state[name] = _start_ray_node(s, index)
            _write_state(s, state)
            _wait(
                f"Ray node {index}",
                lambda name=name: node_healthy(s, name),
                120,
                state[name],
                Path(state[name]["log"]),
            )
            state[name]["node_id"] = _raylet_node_id(state[name])
            echo(
                f"{name}: joined {s.ray_address} ({NODE_CPUS} CPUs, {NODE_GPUS} logical GPU, "
                f"{NODE_RESOURCE}), node {state[name]['node_id'][:12]}"
            )


def down(s: StackSettings | None = None, echo: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop what `up` started, by recorded pid, worker first; returns the parts stopped."""
    s = s or StackSettings.from_env()
    state = _read_state(s)
    stopped = []
    # Extra Ray nodes before the head, the highest first.
    for name in (*OPTIONAL_PARTS, *reversed(_node_parts(state)), *reversed(PARTS)):
        entry = state.pop(name, None)
        if entry and _stop(entry):
            stopped.append(name)
            echo(f"{name}: stopped (pid {entry['pid']})")
    _write_state(s, state)
    if not stopped:
        echo("nothing was running")
    return stopped


def status(s: StackSettings | None = None) -> list[PartStatus]:
    s = s or StackSettings.from_env()
    state = _read_state(s)

    def pid(name: str) -> int | None:
        e = state.get(name)
        return e["pid"] if _process_alive(e) else None

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
    for name in _node_parts(state):
        node_id = state[name].get("node_id") or _raylet_node_id(state[name]) or "?"
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
