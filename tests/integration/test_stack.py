"""The local stack as `llmflow up` starts it: health, idempotence, deployments, bindings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import yaml

from llmflow import probes, processes
from llmflow import stack as stack_mod
from tests.integration.helpers import user_env

ROOT = Path(__file__).resolve().parents[2]


def test_every_part_is_healthy(stack):
    parts = {p.name: p for p in stack_mod.status(stack)}
    assert set(parts) == set(stack_mod.PARTS)
    assert all(p.healthy for p in parts.values()), parts
    assert parts["prefect-server"].pid and parts["prefect-worker"].pid and parts["ray-head"].pid


def test_second_up_starts_nothing(stack):
    before = stack_mod.read_state(stack)
    lines: list[str] = []
    stack_mod.up(stack, with_deploy=False, echo=lines.append)
    after = stack_mod.read_state(stack)
    for name in ("prefect-server", "ray-head", "prefect-worker"):
        assert after[name]["pid"] == before[name]["pid"], name
    assert sum("already running" in ln for ln in lines) == 4, lines


def test_status_command_reports_healthy(stack):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), "status"],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("healthy") == 4


def test_ui_lists_the_deployments_of_prefect_yaml(stack, prefect_client):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    wanted = {d["name"] for d in spec["deployments"]}
    deployments = prefect_client.read_deployments()
    names = {d.name for d in deployments}
    assert wanted <= names, (wanted, names)
    for d in deployments:
        if d.name in wanted:
            assert d.work_pool_name == stack.work_pool
    # The UI itself is served on the same port.
    page = httpx.get(stack.prefect_url, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_ports_bound_to_loopback(stack):
    ports = {stack.prefect_port, stack.dashboard_port, stack.serve_port}
    seen = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports:
            seen.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    assert set(seen) == ports, seen
    for port, ips in seen.items():
        assert ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, (port, ips)


def test_ray_token_authentication_is_on(stack):
    """Without the token the dashboard refuses; with it, it answers."""
    url = f"{stack.dashboard_url}/api/version"
    assert httpx.get(url, timeout=10).status_code in (401, 403)
    assert httpx.get(url, headers=probes.ray_headers(stack), timeout=10).status_code == 200
    token = processes.ray_token_path(stack)
    assert oct(token.stat().st_mode & 0o777) == "0o600"
