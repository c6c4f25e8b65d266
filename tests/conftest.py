"""Shared test settings and the session fixtures of the integration and drill tiers.

Offline switches go on before anything imports prefect, ray or transformers, and llmflow's
state is kept out of the checkout. The stack (Prefect server on SQLite, Ray head with Serve,
Prefect worker, deployments) is started by `llmflow.stack.up` exactly as `llmflow up` starts
it, under a temporary LLMFLOW_HOME and on free ports, so it never collides with a
developer's own stack; it starts only when a test asks for it, once per session.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

import pytest

# The per-module time table at the end of every run (tests/timing.py).
pytest_plugins = ["tests.timing"]

# Before anything imports prefect, ray or transformers: offline, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray exports its metrics (Serve's and llmflow's) every METRICS_EXPORT_S instead of every 10 s:
# the metrics test waits for two exports, not for half a minute.
METRICS_EXPORT_S = 2
os.environ.setdefault("RAY_metrics_report_interval_ms", str(METRICS_EXPORT_S * 1000))
# Unit tests must not touch a developer's .llmflow/ (or their running stack).
os.environ.setdefault("LLMFLOW_HOME", tempfile.mkdtemp(prefix="llmflow-test-"))

# -- lanes ------------------------------------------------------------------------------------
# `make test LANES="-n 2"` (and make drills) runs the modules in two lanes side by side
# (pytest-xdist, one worker a lane), each lane a session of its own with its own stack on its
# own ports and home (docs/testing.md says why it is not the default yet). One lane alone kept 2
# cores about 60 % busy (it waits on servers, engine starts and timers); two fill them. A
# module's lane is named here; the rest run in "main", in the order of a serial run (the
# integration tier before the unit tests). The engine lane holds every module that needs the
# session's trained model (tiny_trained), so it is trained once; the drill lane holds the drill
# that waits out a Prefect lease.
LANES = {
    "engines": (
        "tests/integration/test_bench.py",
        "tests/integration/test_benchmarks.py",
        "tests/integration/test_llamafactory.py",
        "tests/integration/test_scoring.py",
        "tests/integration/test_vllm.py",
    ),
    "drills-lease": (
        "tests/drills/test_pipeline_driver_killed.py",
        "tests/drills/test_serve_replica_killed.py",
        "tests/drills/test_interrupted_saves.py",
    ),
}
MAIN_LANE = "main"
_LANE_OF = {module: lane for lane, modules in LANES.items() for module in modules}
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # a lane's own home, beside the other lane's (CI gives both one LLMFLOW_HOME)
    os.environ["LLMFLOW_HOME"] = os.path.join(os.environ["LLMFLOW_HOME"], WORKER)
    os.makedirs(os.environ["LLMFLOW_HOME"], exist_ok=True)


def lane(nodeid: str) -> str:
    return _LANE_OF.get(nodeid.split("::", 1)[0], MAIN_LANE)


def pytest_xdist_make_scheduler(config, log):
    """Each lane one unit of work, sent whole to one worker (xdist's loadgroup marks cannot
    do it under pytest 9.2: they rename the test's nodeid, which pytest 9 no longer allows)."""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return LaneScheduling(config, log)


_handed_out: set[int] = set()
# The lanes of one run hand out ports from one list (the workers share the run's id).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_PORTS_FILE = Path(tempfile.gettempdir()) / f"llmflow-test-ports-{_RUN}"


def _claim(port: int) -> bool:
    """True once per port across the lanes of this run (one lane: this process's set)."""
    if port in _handed_out:
        return False
    if _RUN is None:
        _handed_out.add(port)
        return True
    with open(_PORTS_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if str(port) in f.read().split():
            return False
        f.write(f"{port}\n")
    _handed_out.add(port)
    return True


def free_port() -> int:
    """A free loopback port, never one this run handed out before (in either lane): the
    kernel may give the same ephemeral port to two binds in a row once the first socket is
    closed (a CI run got the dashboard's port for Serve that way)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _claim(port):
            return port
    raise RuntimeError("no free loopback port found in 100 tries")


def stack_ports() -> dict[str, str]:
    """A free port for each port a stack binds (llmflow.settings.STACK_PORTS), as the
    LLMFLOW_*_PORT variables."""
    from llmflow.settings import STACK_PORTS

    return {f"LLMFLOW_{name}_PORT": str(free_port()) for name in STACK_PORTS}


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory):
    from llmflow.settings import StackSettings

    home = tmp_path_factory.mktemp("llmflow-home")
    env = {
        "LLMFLOW_HOME": str(home),
        **stack_ports(),
        "LLMFLOW_WORK_POOL": "llmflow-test",
        "LLMFLOW_STORE": str(home / "store"),
        # prefect.yaml's schedules are registered paused: a scheduled run (retrain-nightly
        # at 02:00 Berlin) must never start among the tests, whatever the clock says.
        "LLMFLOW_PAUSE_SCHEDULES": "1",
    }
    os.environ.update(env)
    return StackSettings.from_env()


@pytest.fixture(scope="session")
def stack(stack_settings):
    """A running local stack; the test process is pointed at it like `llmflow run` is."""
    from llmflow import processes
    from llmflow import stack as stack_mod

    s = stack_settings
    lines: list[str] = []
    try:
        parts = stack_mod.up(s, echo=lines.append)  # the default logical CPUs, as `llmflow up`
    except Exception:
        stack_mod.down(s)
        raise
    assert all(p.healthy for p in parts), parts
    os.environ.update(processes.client_env(s))

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: s.prefect_api_url}):
        yield s

    import ray

    if ray.is_initialized():
        ray.shutdown()
    state = stack_mod.read_state(s)
    stack_mod.down(s)
    alive = [n for n, e in state.items() if stack_mod.process_alive(e)]
    assert not alive, f"`down` left these parts running: {alive}"


@pytest.fixture(scope="session")
def prefect_client(stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client
