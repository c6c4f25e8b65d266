"""The local stack's processes: its parts and their names, the environment each starts with,
the state file that records their pids, spawning a part in its own process group and
stopping it by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmflow import database as db
from llmflow.errors import StackError
from llmflow.settings import StackSettings, offline_env, project_dir

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


def node_parts(state: dict) -> list[str]:
    """Recorded extra nodes, by index."""
    names = [n for n in state if n.startswith("ray-node-") and n[9:].isdigit()]
    return sorted(names, key=lambda n: int(n[9:]))


def env_bin(name: str) -> str:
    """An executable of this environment (prefect, ray) next to the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# -- environment ------------------------------------------------------------------------------
def ray_token_path(s: StackSettings) -> Path:
    return s.home / "ray" / "auth_token"


def ensure_ray_token(s: StackSettings) -> Path:
    """The local head's token: Ray's token authentication stays on (docs/security.md)."""
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
    auth = prefect_auth_string()
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def child_env(s: StackSettings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(client_env(s))
    # Children must not inherit a client profile pointing at some other server.
    env.pop("PREFECT_PROFILE", None)
    # The database URL (with its password) goes to the server alone, as the variable Prefect
    # reads (start_prefect_server); no other part needs it.
    env.pop(DATABASE_ENV, None)
    env["PREFECT_HOME"] = str(s.prefect_home)
    env.update(extra or {})
    return env


# -- state file -------------------------------------------------------------------------------
def read_state(s: StackSettings) -> dict[str, dict]:
    try:
        return json.loads(s.state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(s: StackSettings, state: dict[str, dict]) -> None:
    from llmflow.store import atomic_write

    atomic_write(s.state_file, json.dumps(state, indent=2).encode())


def process_alive(entry: dict | None) -> bool:
    """True when the recorded pid still runs and is the process we started (same start time)."""
    if not entry or not entry.get("pid"):
        return False
    import psutil

    try:
        p = psutil.Process(entry["pid"])
        return abs(p.create_time() - entry.get("create_time", 0)) < 1.0 and p.status() != "zombie"
    except psutil.Error:
        return False


def prefect_auth_string() -> str | None:
    """Prefect basic auth's "user:password": the client's setting, else the server's."""
    return os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get(
        "PREFECT_SERVER_API_AUTH_STRING"
    )


def wait_healthy(
    what: str, probe: Callable[[], bool], timeout: float, entry: dict, log: Path
) -> None:
    import tenacity

    def healthy() -> bool:
        if probe():
            return True
        if not process_alive(entry):
            raise StackError(f"{what} exited while starting; see {log} ({log_tail(log)})")
        return False

    try:
        tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_fixed(0.5),
            retry=tenacity.retry_if_result(lambda ok: not ok),
        )(healthy)
    except tenacity.RetryError as exc:
        raise StackError(f"{what} did not become healthy within {timeout:.0f}s; see {log}") from exc


def log_tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else "log is empty"
    except FileNotFoundError:
        return "no log"


# -- starting and stopping --------------------------------------------------------------------
def spawn(s: StackSettings, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
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


# How long a part's process group has after SIGTERM before SIGKILL. A Ray node's (`ray start
# --block`, its GCS, raylet and dashboard) did not exit in 15 s of a SIGTERM (measured on 2
# cores, an idle head: `llmflow down` took 21.7 s, 21.2 of them waiting on it); Ray's own
# `ray stop` kills after its grace period too. A local node keeps nothing to flush (the GCS
# holds its tables in memory), so it gets a short one.
GRACE_S = 20.0
RAY_NODE_GRACE_S = 3.0


def grace_s(name: str) -> float:
    """The SIGTERM grace of the recorded part ``name``."""
    return RAY_NODE_GRACE_S if name == "ray-head" or name.startswith("ray-node-") else GRACE_S


def stop_part(entry: dict, timeout: float = GRACE_S) -> bool:
    """Stop a recorded process group: SIGTERM, then SIGKILL after ``timeout``."""
    if not process_alive(entry):
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
    _kill_after(group, timeout)
    return True


def _kill_after(procs, timeout: float) -> None:
    """Wait up to ``timeout`` for ``procs`` (psutil processes, already sent SIGTERM) to
    exit, then SIGKILL what is left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_stray_haproxy(s: StackSettings) -> list[int]:
    """Stop the haproxy processes that read this stack's config files (Ray starts one per
    node as ``haproxy -db -f <haproxy_dir>/<node id>/haproxy.cfg``) and return their pids.
    Called when the stack's head is not running (`llmflow up` before it starts one,
    `llmflow down` after it stopped it): a haproxy then is one a SIGKILLed head left behind,
    holding the Serve port. Another stack's (another LLMFLOW_HOME) has another directory."""
    import psutil

    mine = f"{s.haproxy_dir}{os.sep}"
    strays = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "haproxy" in (p.info.get("name") or "") and any(a.startswith(mine) for a in cmd):
            strays.append(p)
    for p in strays:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _kill_after(strays, 5)
    return [p.pid for p in strays]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def default_database(s: StackSettings) -> str:
    return db.sqlite_url(s.prefect_home / "prefect.db")
