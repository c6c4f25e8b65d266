"""Running flows: `llmflow run` from the command line, and a deployment run by the worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_llmflow_run_exits_0_on_completed(stack):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), "run", "check",
         "--config", "configs/tiny.yaml"],
        capture_output=True, text=True, env=dict(os.environ), cwd=ROOT, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Flow 'check' Completed: " + stack.prefect_url + "/runs/flow-run/" in out


def test_deployment_run_through_the_api_completes_on_the_worker(stack, prefect_client):
    from prefect.deployments import run_deployment

    flow_run = run_deployment("check/check", parameters={"tasks": 2}, timeout=300)
    assert flow_run.state.is_completed(), flow_run.state
    # It ran in the worker's process, not here.
    assert flow_run.work_pool_name == stack.work_pool
