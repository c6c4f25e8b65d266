"""Reading a pipeline config: a YAML file, dotted `--set KEY=VALUE` overrides, validation
with one line per error naming the key and where it came from; and the tiny default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmflow.config import PipelineConfig
from llmflow.errors import ConfigError


def _format_validation_error(
    err: ValidationError, where: str, overridden: dict[str, str] | None = None
) -> str:
    """One line per problem: '<where>: <dotted.key>: <what is wrong>'.

    ``where`` is the file, or the ``--set`` item when the key came from an override.
    """
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        src = where
        for okey, item in (overridden or {}).items():
            if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
                # env_vars may hold what a user should not have put there: never echoed.
                src = f"--set {okey}=..." if "env_vars" in okey else f"--set {item}"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{src}: unknown key '{key}'")
        elif e["type"] == "value_error" and msg.startswith(f"{key}."):
            lines.append(f"{src}: {msg}")  # a section's own check, naming its keys
        else:
            lines.append(f"{src}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse 'train.max_steps=50' into (['train', 'max_steps'], 50); values are YAML scalars."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each KEY=VALUE override set at its dotted path."""
    out: dict[str, Any] = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one clear line for a missing file or malformed YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: malformed YAML{at}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a PipelineConfig from a YAML file (or the defaults) with --set overrides applied.

    Args:
        path: a configs/*.yaml file; None starts from the defaults in code.
        overrides: ``KEY=VALUE`` strings with dotted keys, applied after the file.

    Returns:
        The validated config. Raises ConfigError with one line naming the key and the file.
    """
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "<defaults>"
    overrides = overrides or []
    data = apply_overrides(data, overrides)
    overridden = {item.partition("=")[0].strip(): item for item in overrides}
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where, overridden)) from exc


# configs/tiny.yaml's settings, in code: the flows' default `config` parameter, so the form
# the Prefect UI renders for a deployment starts from the tiny CPU default (the config a
# newcomer runs) without a file read at import. tests/unit/test_config.py holds the two equal.
_VLLM_CPU = {
    "vllm_placement": [{"CPU": 1}],
    "vllm_engine_kwargs": {
        "kv_cache_memory_bytes": 64 << 20,
        "max_model_len": 256,
        "dtype": "float32",
        "enforce_eager": True,
    },
}


TINY = {
    "data": {"source": "bundled", "eval_fraction": 0.1, "min_rows": 100, "max_tokens": 128},
    "train": {
        "base_model": "tiny",
        "model_name": "llmflow-tiny",
        "max_steps": 300,
        "batch_size": 16,
        "learning_rate": 0.003,
        "warmup_steps": 20,
        "eval_every": 50,
        "checkpoint_every": 50,
        "max_failures": 2,
        "num_workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "resources_per_worker": {},
    },
    "eval": {
        "engine": "hf",
        "batch_size": 256,
        "concurrency": 1,
        "cpus_per_actor": 1,
        "threads_per_actor": 1,
        "max_new_tokens": 16,
        **_VLLM_CPU,
    },
    "gate": {"primary_metric": "exact_match", "min_improvement": 0.0},
    "serve": {"app_name": "llmflow", "engine": "hf", "num_replicas": 1, **_VLLM_CPU},
    "cluster": {},
}


def default_config() -> PipelineConfig:
    """The tiny CPU default (configs/tiny.yaml's settings), built from code, no file read."""
    return PipelineConfig.model_validate(TINY)
