"""The stack's bookkeeping without a cluster: extra Ray nodes in the state file (stopped by
`down` before the head), and the Prefect server's database URL (checked, masked,
remembered). Processes here are real (`sleep`), started the way `up` starts its parts."""

from __future__ import annotations

import sys

import pytest

from llmflow import database as db
from llmflow import probes, processes, stack
from llmflow.errors import ConfigError, StackError
from llmflow.settings import StackSettings
from tests.conftest import free_port


@pytest.fixture
def s(tmp_path, monkeypatch) -> StackSettings:
    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path / "home"))
    for var in (
        "LLMFLOW_PREFECT_PORT",
        "LLMFLOW_RAY_PORT",
        "LLMFLOW_DASHBOARD_PORT",
        "LLMFLOW_SERVE_PORT",
    ):
        monkeypatch.setenv(var, str(free_port()))  # nothing listens: every part is down
    monkeypatch.delenv(stack.DATABASE_ENV, raising=False)
    return StackSettings.from_env()


def sleeper(s: StackSettings, name: str) -> dict:
    return processes.spawn(
        s, name, [sys.executable, "-c", "import time; time.sleep(120)"], {}, s.home
    )


def test_down_stops_extra_nodes_before_the_head(s):
    state = {
        "ray-head": sleeper(s, "ray-head"),
        "ray-node-2": sleeper(s, "ray-node-2"),
        "ray-node-10": sleeper(s, "ray-node-10"),
    }
    stack.write_state(s, state)
    lines: list[str] = []
    assert stack.down(s, echo=lines.append) == ["ray-node-10", "ray-node-2", "ray-head"]
    assert not any(stack.process_alive(e) for e in state.values())
    assert stack.read_state(s) == {}


def test_status_lists_a_recorded_node_and_its_health(s):
    entry = sleeper(s, "ray-node-2")  # alive, but it started no raylet: not a node of the cluster
    stack.write_state(s, {"ray-node-2": entry})
    try:
        [node] = [p for p in stack.status(s) if p.name == "ray-node-2"]
        assert node.pid == entry["pid"] and not node.healthy
        assert "gpu_node" in node.detail and "1 GPU (logical)" in node.detail
        assert not probes.is_up(s)
    finally:
        stack.down(s)


def test_nodes_below_one_is_refused(s):
    with pytest.raises(ConfigError, match=r"--nodes 0: the stack has at least one node"):
        stack.up(s, nodes=0)


def test_database_urls_are_checked_and_masked():
    url = "postgresql+asyncpg://prefect:p%40ss@db.example:5432/prefect"
    assert db.validate(url) == url
    assert db.mask(url) == "postgresql+asyncpg://prefect:***@db.example:5432/prefect"
    assert db.validate("sqlite+aiosqlite:////tmp/x.db")
    with pytest.raises(ConfigError, match="no host"):
        db.validate("postgresql+asyncpg://prefect:pw@/prefect")
    assert db.mask("garbage pw") == "(not a database URL)"


def test_a_server_started_on_postgresql_is_not_restarted_on_sqlite(s):
    """Its flow runs are in PostgreSQL: restarting it on SQLite without a word would hide them."""
    url = "postgresql+asyncpg://prefect:hunter2@127.0.0.1:5/prefect"
    stack.write_state(s, {"prefect-server": {"pid": None, "database": db.mask(url)}})
    with pytest.raises(
        StackError,
        match=r"was started on postgresql\+asyncpg://prefect:\*\*\*@"
        r"127.0.0.1:5/prefect; give that URL again",
    ) as exc:
        stack.up(s, with_deploy=False)
    assert "hunter2" not in str(exc.value)


def test_haproxy_ingress_keeps_its_files_per_stack_and_within_haproxys_path_limit(
    s, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLMFLOW_SERVE_INGRESS", "haproxy")
    s = StackSettings.from_env()
    env = s.serve_ingress_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Ray puts each socket in a directory named by the node id (56 characters); HAProxy
    # refuses socket paths over 97.
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
        parent, name = env[key].rsplit("/", 1)
        assert len(f"{parent}/{'0' * 56}/{name}") <= 97, env[key]
    # A second stack (another LLMFLOW_HOME) gets other files and its own ports.
    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("LLMFLOW_HAPROXY_STATS_PORT", "18404")
    other = StackSettings.from_env().serve_ingress_env()
    assert other["RAY_SERVE_HAPROXY_SOCKET_PATH"] != env["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert other["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_haproxy_is_the_default_ingress(monkeypatch):
    monkeypatch.delenv("LLMFLOW_SERVE_INGRESS", raising=False)
    s = StackSettings.from_env()
    assert s.serve_ingress == "haproxy"
    assert s.serve_ingress_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_a_haproxy_left_by_a_killed_head_is_stopped_and_another_stacks_is_not(
    s, tmp_path, monkeypatch
):
    """Ray runs `haproxy -db -f <dir>/<node id>/haproxy.cfg`; after a SIGKILL of the head it
    lives on with the Serve port. Stand-ins: `tail -f` on such a file, run as `haproxy`."""
    import shutil
    import subprocess

    fake = tmp_path / "bin" / "haproxy"
    fake.parent.mkdir()
    fake.symlink_to(shutil.which("tail"))
    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path / "other-home"))
    other = StackSettings.from_env()
    procs = []
    for stack_settings in (s, other):
        cfg = stack_settings.haproxy_dir / ("n" * 56) / "haproxy.cfg"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text("global\n")
        procs.append(subprocess.Popen([str(fake), "-f", str(cfg)]))
    mine, theirs = procs
    try:
        assert processes.stop_stray_haproxy(s) == [mine.pid]
        assert mine.wait(timeout=10) is not None
        assert theirs.poll() is None  # another stack's haproxy keeps running
        assert processes.stop_stray_haproxy(s) == []
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for stack_settings in (s, other):
            shutil.rmtree(stack_settings.haproxy_dir, ignore_errors=True)


def test_the_python_proxy_ingress_turns_haproxy_off_and_a_bad_choice_is_one_line(monkeypatch):
    monkeypatch.setenv("LLMFLOW_SERVE_INGRESS", "proxy")
    assert StackSettings.from_env().serve_ingress_env() == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
    }
    monkeypatch.setenv("LLMFLOW_SERVE_INGRESS", "nginx")
    with pytest.raises(ConfigError, match=r"LLMFLOW_SERVE_INGRESS='nginx': expected one of"):
        StackSettings.from_env()
