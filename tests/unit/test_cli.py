"""The command line: instant help, and one clear line plus an exit code for bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LLMFLOW = str(Path(sys.executable).parent / "llmflow")


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLMFLOW, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from llmflow.cli import app; "
        "heavy = [m for m in ('prefect', 'ray', 'torch', 'transformers', 'great_expectations') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("up", "down", "status", "run", "demo"):
        assert cmd in proc.stdout


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_config_file():
    proc = run_cli("run", "check", "--config", "configs/nope.yaml")
    assert proc.returncode == 2
    assert _one_error_line(proc) == "error: configs/nope.yaml: config file not found"


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 3\n")
    proc = run_cli("run", "check", "--config", str(bad))
    assert proc.returncode == 2
    assert f"{bad}: malformed YAML at line" in _one_error_line(proc)


def test_unknown_key_via_set():
    proc = run_cli("config", "--config", "configs/tiny.yaml", "--set", "train.max_stepz=3")
    assert proc.returncode == 2
    assert "unknown key 'train.max_stepz'" in _one_error_line(proc)


def test_debug_shows_traceback():
    proc = run_cli("--debug", "config", "--config", "configs/nope.yaml")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "config file not found" in proc.stderr


def test_config_prints_resolved_values():
    proc = run_cli("config", "--config", "configs/tiny.yaml", "--set", "train.max_steps=7")
    assert proc.returncode == 0
    assert "max_steps: 7" in proc.stdout


def test_unknown_flow():
    proc = run_cli("run", "nosuchflow", "--set", "cluster.prefect_api_url=http://127.0.0.1:9/api")
    assert proc.returncode == 1
    assert "unknown flow 'nosuchflow'" in _one_error_line(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_prefect_server():
    port = _free_port()
    proc = run_cli("run", "check", "--set", f"cluster.prefect_api_url=http://127.0.0.1:{port}/api")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"Prefect server at http://127.0.0.1:{port}/api is not reachable" in line


def test_port_in_use_is_a_clear_error(tmp_path):
    """`up` refuses to start the Prefect server on a port another program holds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            proc = run_cli(
                "up",
                env={"LLMFLOW_HOME": str(tmp_path), "LLMFLOW_PREFECT_PORT": str(port)},
            )
        finally:  # were anything started after all, it must not outlive the test
            run_cli("down", env={"LLMFLOW_HOME": str(tmp_path), "LLMFLOW_PREFECT_PORT": str(port)})
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"port 127.0.0.1:{port} is already in use" in line
    assert "LLMFLOW_PREFECT_PORT" in line
    # Nothing was started: the state file records no live part.
    status = run_cli(
        "status",
        "--json",
        env={"LLMFLOW_HOME": str(tmp_path), "LLMFLOW_PREFECT_PORT": str(_free_port())},
    )
    assert status.returncode == 1


def test_status_of_a_stack_that_is_not_running(tmp_path):
    env = {"LLMFLOW_HOME": str(tmp_path)}
    for var in (
        "LLMFLOW_PREFECT_PORT",
        "LLMFLOW_RAY_PORT",
        "LLMFLOW_DASHBOARD_PORT",
        "LLMFLOW_SERVE_PORT",
    ):
        env[var] = str(_free_port())
    proc = run_cli("status", "--json", env=env)
    assert proc.returncode == 1
    import json

    parts = json.loads(proc.stdout)
    assert [p["name"] for p in parts] == [
        "prefect-server",
        "ray-head",
        "ray-serve",
        "prefect-worker",
    ]
    assert not any(p["healthy"] for p in parts)


def test_bad_port_env_var(tmp_path):
    proc = run_cli("status", env={"LLMFLOW_HOME": str(tmp_path), "LLMFLOW_RAY_PORT": "sixty"})
    assert proc.returncode == 2
    assert "LLMFLOW_RAY_PORT='sixty'" in _one_error_line(proc)


@pytest.mark.parametrize("addr", ["127.0.0.1:1", "nohost-without-port"])
def test_unreachable_ray_head(addr, tmp_path):
    """A Ray head that died or never ran: one line naming the address."""
    # A live Prefect address is needed to get past the server check; a dead one fails first,
    # so point at a dead server and check the Prefect message instead when none runs.
    proc = run_cli(
        "run",
        "check",
        "--set",
        f"cluster.ray_address={addr}",
        "--set",
        f"cluster.prefect_api_url=http://127.0.0.1:{_free_port()}/api",
    )
    assert proc.returncode == 1
    assert "is not reachable" in _one_error_line(proc)


@pytest.mark.parametrize(
    "overrides, engine_env, line",
    [
        (
            ["eval.engine=vllm"],
            {"LLMFLOW_VLLM_PYTHON": "/no/such/python"},
            (
                "eval.engine: 'vllm' needs the vLLM engine environment, from LLMFLOW_VLLM_PYTHON: "
                "/no/such/python: no such interpreter"
            ),
        ),
        (
            ["serve.engine=vllm"],
            {"LLMFLOW_VLLM_PYTHON": sys.executable},
            (
                "serve.engine: 'vllm' needs the vLLM engine environment, from LLMFLOW_VLLM_PYTHON: "
                f"{sys.executable}: vllm is not installed there"
            ),
        ),
        (
            ["train.backend=llamafactory"],
            {"LLMFLOW_LLAMAFACTORY_PYTHON": "/no/such/python"},
            (
                "train.backend: 'llamafactory' needs the LlamaFactory environment, from "
                "LLMFLOW_LLAMAFACTORY_PYTHON: /no/such/python: no such interpreter"
            ),
        ),
        (
            # A run's parameters never name the program the cluster executes.
            ["cluster.vllm_python=/tmp/evil/python"],
            {},
            (
                "--set cluster.vllm_python=/tmp/evil/python: cluster.vllm_python: not a run setting (a "
                "run never chooses the program the cluster executes); set LLMFLOW_VLLM_PYTHON "
                "where the flows run"
            ),
        ),
        (
            # Nor the code it imports: a metric is a registered plug-in, by name.
            ["eval.extra_metrics=[os:system]"],
            {},
            (
                "eval.extra_metrics: 'os:system' is a module path; name a metric registered as an "
                "'llmflow.metrics' entry point (registered: edit_distance, shouting_match)"
            ),
        ),
        (
            ["eval.extra_metrics=[rouge_l]"],
            {},
            "eval.extra_metrics: 'rouge_l': a built-in metric of that name exists",
        ),
    ],
)
def test_a_pipeline_config_that_cannot_run_fails_before_anything_starts(
    tmp_path, overrides, engine_env, line
):
    """Checked before the stack comes up: no server, no Ray head, one line, exit 2."""
    env = {"LLMFLOW_HOME": str(tmp_path), "LLMFLOW_PREFECT_PORT": str(_free_port()), **engine_env}
    sets = [a for o in overrides for a in ("--set", o)]
    proc = run_cli("run", "pipeline", "--config", "configs/tiny.yaml", *sets, env=env)
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc) == f"error: {line}"
    assert not (tmp_path / "stack.json").exists()  # nothing was started


def test_models_promote_canary_sets_the_strategy_and_keeps_the_policy():
    from llmflow.cli_models import promote_config

    plain = promote_config("m", None, ["serve.rollout.steps=[20, 100]"], canary=False)
    assert plain.serve.rollout.strategy == "all-at-once" and plain.train.model_name == "m"
    canary = promote_config("m", None, ["serve.rollout.steps=[20, 100]"], canary=True)
    assert canary.serve.rollout.strategy == "canary"
    assert canary.serve.rollout.steps == [20, 100]  # the policy is the config's
