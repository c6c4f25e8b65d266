"""The Prefect server on PostgreSQL: `llmflow up --database postgresql+asyncpg://...` against a
real PostgreSQL (Debian's binaries, a cluster of the fixture's own on a free loopback port),
a flow run through it, its rows read back from PostgreSQL; the password never shown; bad
URLs and unreachable databases one line each.

    .venv/bin/python -m pytest tests/integration/test_postgres.py -q
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.helpers import user_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
LLMFLOW = str(Path(sys.executable).parent / "llmflow")
USER, DBNAME = "llmflow", "prefect"
NOBODY = 65534  # PostgreSQL refuses to run as root: as root, the cluster runs as nobody


def postgres_bindir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


async def _sql(url_kw: dict, query: str, *args, database: str = DBNAME):
    import asyncpg

    conn = await asyncpg.connect(**url_kw, database=database, timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def sql(pg: dict, query: str, *args, database: str = DBNAME):
    kw = {k: pg[k] for k in ("host", "port", "user", "password")}
    return asyncio.run(_sql(kw, query, *args, database=database))


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own: initdb into a temporary folder (owned by nobody when
    the tests run as root), the server on a free 127.0.0.1 port with password auth, and an
    empty database `prefect`. Yields its connection details and URL."""
    bindir = postgres_bindir()
    if bindir is None:
        subprocess.run(["bash", str(ROOT / "infra/local/postgres.sh")], timeout=400, check=False)
        bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin) and apt-get "
            "could not install them (infra/local/postgres.sh)"
        )
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot start PostgreSQL as another user")
    root = Path(tempfile.mkdtemp(prefix="llmflow-pg-"))
    password = secrets.token_hex(16)
    (root / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        os.chown(root, NOBODY, NOBODY)
        os.chown(root / "pw", NOBODY, NOBODY)
    data = root / "data"
    init = subprocess.run(
        as_owner(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={root / 'pw'}",
                "--auth=scram-sha-256",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    (root / "pw").unlink()
    port = free_port()
    log = open(root / "postgres.log", "wb")  # noqa: SIM115 - the server's stdout while it runs
    # -F: no fsync (a throwaway cluster); the socket in our folder, not /var/run/postgresql.
    proc = subprocess.Popen(
        as_owner(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(root),
                "-F",
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pg = {"host": "127.0.0.1", "port": port, "user": USER, "password": password}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sql(pg, "SELECT 1", database="postgres")
                break
            except Exception as exc:  # noqa: BLE001 - refused or not accepting yet: starting
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"PostgreSQL did not start ({exc}); see {root / 'postgres.log'}"
                    ) from None
                time.sleep(0.3)
        sql(pg, f"CREATE DATABASE {DBNAME}", database="postgres")
        yield pg | {"url": f"postgresql+asyncpg://{USER}:{password}@127.0.0.1:{port}/{DBNAME}"}
    finally:
        proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def run_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLMFLOW, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def home_env(home: Path, **more: str) -> dict[str, str]:
    """A user's shell (none of the session stack's client variables) for another home."""
    return user_env(LLMFLOW_HOME=str(home), LLMFLOW_PREFECT_PORT=str(free_port())) | more


def test_a_flow_runs_on_a_prefect_server_on_postgresql(stack, postgres, tmp_path):
    """`llmflow up --database` on a home of its own beside the session stack: its own server
    (on PostgreSQL) and worker; the Ray head is the session's (same ports, its token), which
    `up` finds healthy and leaves alone, so `down` stops only the server and the worker."""
    from llmflow import processes
    from llmflow import stack as stack_mod

    home = tmp_path / "pg-home"
    env = home_env(
        home,
        LLMFLOW_WORK_POOL="llmflow-pg",
        RAY_AUTH_TOKEN_PATH=str(processes.ray_token_path(stack)),
    )
    password, masked = postgres["password"], postgres["url"].replace(postgres["password"], "***")
    try:
        up = run_cli("up", "--database", postgres["url"], "--no-deploy", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"database {masked}" in up.stdout, up.stdout
        status = run_cli("status", "--json", env=env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        [server] = [p for p in json.loads(status.stdout) if p["name"] == "prefect-server"]
        assert server["healthy"] and server["detail"] == f"database {masked}"
        assert not (home / "prefect" / "prefect.db").exists()  # not on SQLite

        run = run_cli("run", "check", "--config", "configs/tiny.yaml", env=env)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-3000:]
        flow_run_id = re.search(r"Flow 'check' Completed: \S+/runs/flow-run/([0-9a-f-]{36})", out)[
            1
        ]

        # The run and its task runs are rows of PostgreSQL's `prefect` database.
        [row] = sql(
            postgres, "SELECT name, state_type FROM flow_run WHERE id = $1::uuid", flow_run_id
        )
        assert row["state_type"] == "COMPLETED"
        tasks = sql(
            postgres, "SELECT state_type FROM task_run WHERE flow_run_id = $1::uuid", flow_run_id
        )
        assert [t["state_type"] for t in tasks] == ["COMPLETED"] * 3  # check's 3 where_am_i tasks

        # The same URL again is idempotent; another database while it runs is refused.
        again = run_cli("up", "--database", postgres["url"], "--no-deploy", env=env)
        assert again.returncode == 0 and again.stdout.count("already running") == 4, again.stdout
        other = postgres["url"].rsplit("/", 1)[0] + "/postgres"
        moved = run_cli("up", "--database", other, "--no-deploy", env=env, timeout=60)
        assert moved.returncode == 1 and "Traceback" not in moved.stderr
        assert moved.stderr.strip() == (
            f"error: the Prefect server runs on {masked}; stop the stack "
            f"(llmflow down) to start it on {other.replace(password, '***')}"
        )

        # The password is in no output, log or state file.
        shown = up.stdout + up.stderr + status.stdout + out + again.stdout + moved.stderr
        files = [p for p in home.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
        assert files and password not in shown
        assert [p for p in files if password.encode() in p.read_bytes()] == []
    finally:
        down = run_cli("down", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "prefect-server: stopped" in down.stdout and "ray-head" not in down.stdout
    assert stack_mod.ray_healthy(stack)  # the session's head is left alone


@pytest.mark.parametrize(
    "url, code, message",
    [
        ("postgresql+asyncpg://u:s3cr3t@127.0.0.1:5432", 2, "no database name"),
        (
            "postgresql://u:s3cr3t@127.0.0.1:5432/db",
            2,
            "through asyncpg; write postgresql+asyncpg://",
        ),
        ("mysql+aiomysql://u:s3cr3t@127.0.0.1/db", 2, "unsupported scheme 'mysql+aiomysql'"),
        ("not a url s3cr3t", 2, "the value is not a database URL"),
    ],
)
def test_a_malformed_database_url_is_one_line(tmp_path, url, code, message):
    proc = run_cli("up", "--database", url, "--no-deploy", env=home_env(tmp_path / "h"), timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --database: ") and message in line, line
    assert "s3cr3t" not in proc.stdout + proc.stderr
    assert not (tmp_path / "h" / "stack.json").exists()  # nothing was started


def test_an_unreachable_database_is_one_line(postgres, tmp_path):
    """Refused connection, wrong password, missing database: named before anything starts."""
    base = f"postgresql+asyncpg://{USER}:{{pw}}@127.0.0.1:{{port}}/{{db}}"
    cases = [
        (base.format(pw="s3cr3t", port=free_port(), db=DBNAME), "Connect call failed"),
        (
            base.format(pw="s3cr3t", port=postgres["port"], db=DBNAME),
            "password authentication failed",
        ),
        (
            base.format(pw=postgres["password"], port=postgres["port"], db="nope"),
            'database "nope" does not exist',
        ),
    ]
    for url, message in cases:
        proc = run_cli(
            "up", "--database", url, "--no-deploy", env=home_env(tmp_path / "h"), timeout=60
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        [line] = proc.stderr.strip().splitlines()
        masked = url.replace("s3cr3t", "***").replace(postgres["password"], "***")
        assert (
            line.startswith(f"error: database {masked} is not reachable: ") and message in line
        ), line
        assert "s3cr3t" not in proc.stdout + proc.stderr and postgres["password"] not in proc.stderr
        assert not (tmp_path / "h" / "stack.json").exists()
