"""What a run's parameters may carry: no secret's value and no code.

Whoever can start a run (a config file, --set, the Prefect UI's form) chooses data, models
and settings, never code: an extra metric is a registered plug-in named by name
(llmflow/evaluate/metrics.py), and the engine environments' interpreters come from the
environment where the flows run (llmflow/engine_env.py), never from ``cluster.*_python``.

Secrets by reference: no credential's value travels in a run's parameters or a runtime_env.

Ray's runtime_env agent writes every runtime_env's env_vars to its log in clear, and the
Prefect server stores a run's parameters and shows them in the UI. So a secret (a Prefect
API key or basic-auth string, HF_TOKEN, a cloud key) reaches the Ray workers and replicas from
the nodes' own environment: the local stack starts its Ray processes with the stack's
credentials and with whatever the user exported before `llmflow up`; KubeRay pods get them
from Kubernetes Secrets (infra/k8s). A run's config only *names* what it needs
(``cluster.secret_env``), and the flow checks, before any cluster work, that every alive node
has it set, reading names, never values.
"""

from __future__ import annotations

import re
from typing import Any

# A variable whose name holds one of these carries a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# WANDB_API_KEY, PREFECT_API_AUTH_STRING, DB_PASSWORD, GOOGLE_APPLICATION_CREDENTIALS...).
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "AUTH", "CREDENTIAL")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def check_env_vars(env: dict[str, str]) -> dict[str, str]:
    """``cluster.env_vars``: refuse a key that names a secret (ValueError, one line)."""
    named = sorted(k for k in env if looks_secret(k))
    if named:  # the message starts with the key, so the config error does not echo the value
        raise ValueError(
            f"cluster.env_vars.{named[0]}: a secret's value never goes in env_vars (Ray logs "
            "them, the Prefect UI shows run parameters); name it in cluster.secret_env and "
            "set it on the nodes"
        )
    return env


def check_names(names: list[str]) -> list[str]:
    """``cluster.secret_env``: environment variable names, not values."""
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not an environment variable name (names, not values)")
    return names


def no_interpreters(data: Any) -> Any:
    """The cluster section before validation: refuse the retired interpreter keys."""
    named = sorted({"vllm_python", "llamafactory_python"} & set(data or ()))
    if named:
        key = named[0]
        raise ValueError(
            f"cluster.{key}: not a run setting (a run never chooses the program the cluster "
            f"executes); set LLMFLOW_{key.upper()} where the flows run"
        )
    return data


def _missing_here(names: list[str]) -> list[str]:
    import os

    return [n for n in names if not os.environ.get(n)]


def missing_on_nodes(names: list[str], nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Which of ``names`` each alive node's Ray workers lack (node IP -> names), asked of a
    zero-CPU task pinned to every alive node; only names come back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_missing_here)
    alive = [n for n in nodes if n.get("Alive")]
    refs = {
        n.get("NodeManagerAddress", n["NodeID"]): task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(list(names))
        for n in alive
    }
    answers = dict(zip(refs, ray.get(list(refs.values()), timeout=120), strict=True))
    return {node: missing for node, missing in answers.items() if missing}
