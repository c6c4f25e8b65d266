"""Secrets stay out of logs and run parameters, on a stack of its own started as a user starts
it with Prefect basic auth (PREFECT_SERVER_API_AUTH_STRING) and a hub token (HF_TOKEN)
exported: the server refuses clients without the credentials and the stack's own clients
present them; a flow whose tasks run on Ray workers and a promotion to a Serve app run from a
user's shell; the run names the token (cluster.secret_env) and the flows check every node has
it; both commands keep Prefect's and Ray's output off the terminal; then neither value is in
any file of the stack's home (its logs, the Prefect database with
the runs' parameters, the store) nor of its Ray session (runtime_env_agent.log among them).

Its own stack (about 1.5 min): the secrets must be in the environment the stack starts with.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import stack_ports
from tests.integration.helpers import user_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
LLMFLOW = str(Path(sys.executable).with_name("llmflow"))
AUTH = "llmflow-admin:correct horse battery staple"
HF_TOKEN = "hf_" + uuid.uuid4().hex  # no such token anywhere else
NAME = "secret-test"


def _files_holding(roots: list[Path], needles: list[bytes]) -> dict[str, list[str]]:
    """needle -> the files under ``roots`` whose bytes contain it."""
    found: dict[str, list[str]] = {n.decode(): [] for n in needles}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for needle in needles:
                if needle in data:
                    found[needle.decode()].append(str(path))
    return found


@pytest.fixture(scope="module")
def secret_stack(tmp_path_factory):
    """A user's environment with the two secrets exported, and `llmflow up` run in it."""
    home = tmp_path_factory.mktemp("secret-home")
    env = user_env(
        LLMFLOW_HOME=str(home),
        LLMFLOW_STORE=str(home / "store"),
        LLMFLOW_WORK_POOL="llmflow-secrets",
        PREFECT_SERVER_API_AUTH_STRING=AUTH,
        HF_TOKEN=HF_TOKEN,
        **stack_ports(),
    )
    started = time.time()
    up = subprocess.run(
        [LLMFLOW, "up"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, _settings(env), home, started
    finally:
        subprocess.run(
            [LLMFLOW, "down"], check=False, cwd=ROOT, env=env, capture_output=True, timeout=300
        )


def _settings(env: dict[str, str]):
    import os
    from unittest import mock

    from llmflow.settings import StackSettings

    with mock.patch.dict(os.environ, env, clear=True):
        return StackSettings.from_env()


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLMFLOW, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_no_secret_reaches_a_log_or_a_run_parameter(secret_stack):
    env, s, home, started = secret_stack
    api = s.prefect_api_url
    # Basic auth is enforced; the stack's clients present the credentials.
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"llmflow-admin:nope").decode()}
    assert httpx.post(f"{api}/flows/filter", json={}, headers=wrong, timeout=10).status_code == 401
    ok = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}
    assert httpx.post(f"{api}/flows/filter", json={}, headers=ok, timeout=10).status_code == 200
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200  # health stays open

    # A value that is not a secret, passed the way secrets used to travel (a runtime_env):
    # the scan below must find it, or it would prove nothing.
    marker = "llmflow-marker-" + uuid.uuid4().hex
    check = _cli(
        env,
        "run",
        "check",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"cluster.env_vars={{LLMFLOW_MARKER: {marker}}}",
        "--set",
        "cluster.secret_env=[HF_TOKEN]",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "check 3 tasks ran on " in " ".join(check.stdout.split()), check.stdout

    # A secret the nodes lack is one line before any task, naming it, not a hang.
    missing = _cli(
        env,
        "run",
        "check",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "cluster.secret_env=[NOPE_TOKEN]",
    )
    assert missing.returncode != 0
    assert (
        "cluster.secret_env: NOPE_TOKEN not set on the Ray node" in missing.stdout + missing.stderr
    )

    # A promotion: a Serve app on the stack, its replica a Ray actor.
    from llmflow import registry
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.store import Store

    store = Store(home / "store")
    version = registry.register_version(
        store, NAME, resolve_base_model(TrainConfig(), store), base_model="tiny"
    )
    promote = _cli(
        env,
        "models",
        "promote",
        NAME,
        version.version,
        "--set",
        f"serve.app_name={NAME}",
        "--set",
        "serve.route_prefix=/secret",
    )
    assert promote.returncode == 0, promote.stdout + promote.stderr
    served = httpx.get(f"{s.serve_url}/secret/v1/models", timeout=30).json()["data"][0]
    assert served["version"] == version.version
    # Quiet, as `llmflow run` is: Prefect's, Ray's and Serve's lines go to the log file.
    assert f"promote {NAME}:{version.version}; Prefect's and Ray's output in" in promote.stdout
    assert "INFO" not in promote.stdout + promote.stderr, promote.stdout + promote.stderr

    sessions = [p for p in Path("/tmp/ray").glob("session_2*") if p.stat().st_ctime >= started - 1]
    assert sessions, "no Ray session of this stack under /tmp/ray"
    unserve = _cli(env, "models", "unserve", NAME)
    assert unserve.returncode == 0, unserve.stdout + unserve.stderr
    assert f"{NAME}: Serve app '{NAME}' deleted" in unserve.stdout
    assert "INFO" not in unserve.stdout + unserve.stderr, unserve.stdout + unserve.stderr

    found = _files_holding([home, *sessions], [marker.encode(), AUTH.encode(), HF_TOKEN.encode()])
    assert any("runtime_env_agent" in f for f in found[marker]), found[marker]  # the scan sees
    assert found[AUTH] == [] and found[HF_TOKEN] == [], {k: found[k] for k in (AUTH, HF_TOKEN)}
