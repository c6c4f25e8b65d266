"""The local stack: a Prefect server, a Ray head with Serve, a Prefect process worker and,
when asked for (`llmflow up --chat`), the chat page over the served model.

`llmflow up` starts each part bound to 127.0.0.1, waits until it is healthy, records its
pid in .llmflow/stack.json and logs to .llmflow/logs/. It is idempotent: a part that is
already healthy is left alone. `llmflow down` stops exactly what `up` started, by pid
(each part runs in its own process group, so its children go with it).
"""

from __future__ import annotations

import json
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

from llmflow.errors import StackError
from llmflow.settings import StackSettings, offline_env, project_dir

PARTS = ("prefect-server", "ray-head", "ray-serve", "prefect-worker")
# Started only on request; listed by `status` only when it was started.
OPTIONAL_PARTS = ("chat",)


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
    except Exception:  # noqa: BLE001 - best effort: the owner is a hint, not the error
        pass
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
    return os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")


def prefect_auth_headers() -> dict[str, str]:
    """The Authorization header of Prefect's basic auth, when credentials are set."""
    import base64

    auth = _prefect_auth_string()
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def prefect_healthy(api_url: str, timeout: float = 2.0) -> bool:
    return _http_ok(f"{api_url.rstrip('/')}/health", headers=prefect_auth_headers(), timeout=timeout)


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


def worker_healthy(s: StackSettings) -> bool:
    """Our worker process runs and the server lists a worker of the pool as ONLINE (the
    server keeps a stopped worker ONLINE until its heartbeat times out, so the process
    check comes first)."""
    if not _process_alive(_read_state(s).get("prefect-worker")):
        return False
    try:
        r = httpx.post(f"{s.prefect_api_url}/work_pools/{s.work_pool}/workers/filter", json={},
                       headers=prefect_auth_headers(), timeout=2.0)  # fmt: skip
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
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
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


def _start_prefect_server(s: StackSettings) -> dict:
    _check_port_free(s, s.prefect_port, "the Prefect server", "LLMFLOW_PREFECT_PORT")
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    db = s.prefect_home / "prefect.db"
    env = _child_env(
        s,
        {
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
            "PREFECT_SERVER_API_HOST": s.host,
            "PREFECT_SERVER_API_PORT": str(s.prefect_port),
            "PREFECT_UI_API_URL": s.prefect_api_url,
        },
    )
    cmd = [_bin("prefect"), "server", "start", "--host", s.host, "--port", str(s.prefect_port)]
    return _spawn(s, "prefect-server", cmd, env, s.home)


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
        _bin("ray"), "start", "--head", "--block",
        f"--node-ip-address={s.host}",
        f"--port={s.ray_port}",
        "--include-dashboard=true",
        f"--dashboard-host={s.host}",
        f"--dashboard-port={s.dashboard_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    cmd.append(f"--num-cpus={num_cpus if num_cpus is not None else default_logical_cpus()}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return _spawn(s, "ray-head", cmd, _child_env(s), s.home)


SERVE_START = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR")
serve.start(http_options={"host": sys.argv[2], "port": int(sys.argv[3])})
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
    return [sys.executable, "-m", "llmflow.cli", "chat", "--host", s.host,
            "--port", str(s.chat_port), "--endpoint", endpoint, *args]  # fmt: skip


def start_chat(s: StackSettings, endpoint: str, args: Sequence[str] = (),
               echo: Callable[[str], None] = lambda _: None) -> PartStatus:  # fmt: skip
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
        state["chat"] = _spawn(s, "chat", cmd, _child_env(s), project_dir()) | {"endpoint": endpoint}
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


def deploy(s: StackSettings) -> None:
    """Register every deployment of prefect.yaml with the server (non-interactive)."""
    env = _child_env(s)
    env["PREFECT_HOME"] = str(s.home / "worker")
    log = s.logs_dir / "deploy.log"
    with open(log, "ab") as out:
        proc = subprocess.run(
            [_bin("prefect"), "--no-prompt", "deploy", "--all"],
            cwd=project_dir(), env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=300,
        )  # fmt: skip
    if proc.returncode != 0:
        raise StackError(f"prefect deploy --all failed (exit {proc.returncode}); see {log}")


def up(
    s: StackSettings | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    with_deploy: bool = True,
    chat_endpoint: str | None = None,
    chat_args: Sequence[str] = (),
    echo: Callable[[str], None] = lambda _: None,
) -> list[PartStatus]:
    """Start every part of the stack that is not already healthy; return their status.

    With ``chat_endpoint`` (an OpenAI base URL), the chat page starts too (``start_chat``).
    """
    s = s or StackSettings.from_env()
    s.home.mkdir(parents=True, exist_ok=True)
    state = _read_state(s)
    started: list[str] = []

    def need(name: str, healthy: Callable[[], bool]) -> bool:
        if healthy():
            echo(f"{name}: already running")
            return False
        if _process_alive(state.get(name)):
            _stop(state[name])  # alive but unhealthy: a stale part of an earlier up
        return True

    # The server and the head start side by side; each takes several seconds.
    if need("prefect-server", lambda: prefect_healthy(s.prefect_api_url)):
        state["prefect-server"] = _start_prefect_server(s)
        started.append("prefect-server")
    if need("ray-head", lambda: ray_healthy(s)):
        state["ray-head"] = _start_ray_head(s, num_cpus, num_gpus)
        started.append("ray-head")
    _write_state(s, state)
    try:
        if "prefect-server" in started:
            _wait("the Prefect server", lambda: prefect_healthy(s.prefect_api_url), 120,
                  state["prefect-server"], Path(state["prefect-server"]["log"]))  # fmt: skip
            echo(f"prefect-server: started at {s.prefect_url}")
        if "ray-head" in started:
            _wait("the Ray head", lambda: ray_healthy(s), 120, state["ray-head"],
                  Path(state["ray-head"]["log"]))  # fmt: skip
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
        if need("prefect-worker", lambda: worker_healthy(s)):
            state["prefect-worker"] = _start_worker(s)
            _write_state(s, state)
            _wait("the Prefect worker", lambda: worker_healthy(s), 90, state["prefect-worker"],
                  Path(state["prefect-worker"]["log"]))  # fmt: skip
            echo(f"prefect-worker: polling work pool '{s.work_pool}'")
        if with_deploy:
            deploy(s)
            echo("deployments: prefect.yaml deployed")
    finally:
        _write_state(s, state)
    if chat_endpoint:
        start_chat(s, chat_endpoint, chat_args, echo=echo)
    return status(s)


def down(s: StackSettings | None = None, echo: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop what `up` started, by recorded pid, worker first; returns the parts stopped."""
    s = s or StackSettings.from_env()
    state = _read_state(s)
    stopped = []
    for name in (*OPTIONAL_PARTS, *reversed(PARTS)):
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

    parts = [
        PartStatus("prefect-server", s.prefect_url, pid("prefect-server"),
                   prefect_healthy(s.prefect_api_url)),
        PartStatus("ray-head", s.ray_address, pid("ray-head"), ray_healthy(s),
                   f"dashboard {s.dashboard_url}"),
        PartStatus("ray-serve", s.serve_url, pid("ray-head"), serve_healthy(s)),
        PartStatus("prefect-worker", f"pool {s.work_pool}", pid("prefect-worker"),
                   worker_healthy(s)),
    ]  # fmt: skip
    if "chat" in state:
        parts.append(PartStatus("chat", s.chat_url, pid("chat"), chat_healthy(s),
                                f"model endpoint {state['chat'].get('endpoint', '?')}"))  # fmt: skip
    return parts


def is_up(s: StackSettings | None = None) -> bool:
    """The parts flows need are healthy (the optional chat does not count)."""
    return all(p.healthy for p in status(s) if p.name in PARTS)


def status_dict(parts: list[PartStatus]) -> list[dict]:
    return [asdict(p) for p in parts]
