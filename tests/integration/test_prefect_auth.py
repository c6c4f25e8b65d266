"""Prefect server basic auth: a server started the way `llmflow up` starts it, with
PREFECT_SERVER_API_AUTH_STRING set, refuses clients without the credentials; the stack's
clients (health checks, flow runs with client_env) present them and work."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
AUTH = "llmflow-admin:correct horse battery staple"


def test_basic_auth_is_enforced_and_the_stack_clients_use_it(tmp_path, monkeypatch):
    from llmflow import probes, processes, stack
    from llmflow.settings import StackSettings

    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMFLOW_PREFECT_PORT", str(free_port()))
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    s = StackSettings.from_env()
    entry = stack.start_prefect_server(s)
    try:
        stack.wait_healthy(
            "prefect server",
            lambda: stack.prefect_healthy(s.prefect_api_url),
            120,
            entry,
            s.logs_dir / "prefect-server.log",
        )
        api = s.prefect_api_url
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"llmflow-admin:nope").decode()}
        assert (
            httpx.post(f"{api}/flows/filter", json={}, headers=wrong, timeout=10).status_code == 401
        )
        assert (
            httpx.post(
                f"{api}/flows/filter", json={}, headers=probes.prefect_auth_headers(), timeout=10
            ).status_code
            == 200
        )

        env = {**os.environ, **processes.client_env(s)}
        assert env["PREFECT_API_AUTH_STRING"] == AUTH  # derived from the server's setting
        code = (
            "from prefect import flow\n"
            "@flow(name='auth-check')\n"
            "def f():\n    return 41 + 1\n"
            "state = f(return_state=True)\n"
            "print(state.type.value, state.state_details.flow_run_id)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        state, run_id = proc.stdout.split()[-2:]
        assert state == "COMPLETED"
        run = httpx.get(
            f"{api}/flow_runs/{run_id}", headers=probes.prefect_auth_headers(), timeout=10
        )
        assert run.status_code == 200 and run.json()["state"]["type"] == "COMPLETED"

    finally:
        stack.stop_part(entry)
