"""Every bench/ script runs and its figures make report rows (--smoke), all nine in every
`make test` (about 7 min on 2 cores), so a benchmark that no longer runs fails CI."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Seconds a smoke run may take: about 3x the slowest measured on a busy 2-core machine (train
# 137 s; engines 138 s on 2026-12-07, two eager vLLM starts).
TIMEOUT_S = {"engines": 600}
DEFAULT_TIMEOUT_S = 420


def _benches() -> list:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    # pytest's own timeout (pyproject's 900 s) a little above the subprocess's.
    return [
        pytest.param(
            name,
            marks=[pytest.mark.timeout(TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S) + 60)],
        )
        for name in report.BENCHES
    ]


@pytest.mark.parametrize("name", _benches())
def test_the_benchmark_runs_in_smoke_mode(name, tmp_path):
    out = tmp_path / "results.md"
    # The scripts start their own private Ray (overhead: its own stack): never another one's.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RAY_ADDRESS", "LLMFLOW_RAY_ADDRESS", "LLMFLOW_SERVE_URL"}
    }
    cmd = [sys.executable, "bench/report.py", "--smoke", "--only", name, "--out", str(out)]
    # Its own session, so a timeout ends the script report.py runs (and its Ray) too.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    timeout = TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name}: no result in {timeout} s\n{output[-3000:]}")
    tail = output[-3000:]
    assert proc.returncode == 0, tail
    rows = [
        line
        for line in out.read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| figure ", "| --- "))
    ]
    assert rows, tail
    assert not [r for r in rows if "**failed**" in r], tail
