"""Running flows: `llmflow run` from the command line; the one-run-per-model slot, the
Kubernetes variant and failure alerts on the session stack. (A deployment run through the
API, on the worker, is in test_pipeline.py; schedules are in test_schedules.py.)"""

from __future__ import annotations

import contextvars
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration.helpers import user_env

ROOT = Path(__file__).resolve().parents[2]


def test_llmflow_run_exits_0_on_completed(stack):
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmflow"),
            "run",
            "check",
            "--config",
            "configs/tiny.yaml",
        ],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Flow 'check' Completed: " + stack.prefect_url + "/runs/flow-run/" in out
    # The terminal: the stage's line and the outcome; Prefect's and Ray's lines in the log file.
    assert "check 3 tasks ran on " in " ".join(proc.stdout.split()), out
    assert "Finished in state" not in out and "INFO" not in out and proc.stderr == "", out
    log_file = Path(re.search(r"output in (\S+\.log)", proc.stdout)[1])
    logged = log_file.read_text()
    assert "Finished in state Completed" in logged and "where-am-i" in logged, logged[-2000:]


def test_one_pipeline_per_model_name_at_a_time(stack, prefect_client):
    from llmflow.runs import model_slot, slot_name

    events: list[tuple[str, float]] = []
    first_in, other_in = threading.Event(), threading.Event()

    def first() -> None:
        with model_slot("slot-test"):
            events.append(("first in", time.monotonic()))
            first_in.set()
            # Hold the slot until the other model's run got in (it must not need this one),
            # and at least 3 s, so the second run of this model has to wait.
            other_in.wait(90)
            time.sleep(3)
            events.append(("first out", time.monotonic()))

    def second() -> None:
        first_in.wait(60)
        with model_slot("slot-test"):  # waits for the first run of this model
            events.append(("second in", time.monotonic()))

    def other() -> None:
        first_in.wait(60)
        with model_slot("other-model", timeout_s=60):  # another model is not held up
            events.append(("other in", time.monotonic()))
            other_in.set()

    # Each thread runs in a copy of this context: Prefect's settings (the session stack's API
    # URL) live in a contextvar, which a bare thread would not see.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(f,))
        for f in (first, second, other)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    names = [e for e, _ in events]
    assert names == ["first in", "other in", "first out", "second in"], events
    limit = prefect_client.read_global_concurrency_limit_by_name(slot_name("slot-test"))
    assert limit.limit == 1 and limit.active_slots == 0  # both released


def test_kubernetes_variant_deploys_to_a_kubernetes_work_pool(stack, prefect_client, monkeypatch):
    """infra/k8s/prefect.yaml against a real `kubernetes` pool: the server checks every
    job variable against the pool's base job template when it stores the deployment. It goes
    through the stack's deploy step, so its nightly schedule is registered paused too."""
    from llmflow import stack as stack_mod

    prefect = str(Path(sys.executable).parent / "prefect")
    monkeypatch.setenv("LLMFLOW_K8S_WORK_POOL", "llmflow-k8s-test")
    env = dict(os.environ)

    def cli(*args: str) -> None:
        proc = subprocess.run(
            [prefect, "--no-prompt", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    cli("work-pool", "create", "llmflow-k8s-test", "--type", "kubernetes", "--overwrite")
    stack_mod.deploy(stack, prefect_file=ROOT / "infra/k8s/prefect.yaml")
    assert prefect_client.read_work_pool("llmflow-k8s-test").type == "kubernetes"
    dep = prefect_client.read_deployment_by_name("pipeline/pipeline-k8s")
    assert dep.work_pool_name == "llmflow-k8s-test"
    assert dep.job_variables["namespace"] == "llmflow"
    assert dep.job_variables["env"]["LLMFLOW_RAY_ADDRESS"].startswith("ray://")
    nightly = prefect_client.read_deployment_by_name("pipeline/retrain-nightly-k8s")
    assert nightly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert not nightly.schedules[0].active  # no scheduled run among the tests
    # The local variant is untouched: both live on one server.
    assert (
        prefect_client.read_deployment_by_name("pipeline/pipeline").work_pool_name
        == stack.work_pool
    )


def test_failure_alert_posts_to_a_webhook_when_a_run_fails(stack):
    """`llmflow alerts --webhook`: the server's automation fires on a failed run and its
    notification reaches a real HTTP endpoint (here, one in this test)."""
    import json
    import queue
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flows.prepare import prepare
    from llmflow.configfile import load_config

    received: queue.Queue = queue.Queue()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.put(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    llmflow = str(Path(sys.executable).parent / "llmflow")

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [llmflow, *args],
            capture_output=True,
            text=True,
            env=user_env(),
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    try:
        assert "post to http://127.0.0.1:" in cli(
            "alerts", "--webhook", f"http://127.0.0.1:{server.server_port}/hook"
        )
        state = prepare(
            config=load_config(None, ["data.source=/nonexistent/rows.jsonl"]), return_state=True
        )
        assert state.is_failed()
        msg = received.get(timeout=90)
        assert "prepare" in msg["subject"] and "Failed" in msg["subject"], msg
        assert "/nonexistent/rows.jsonl" in msg["text"] and "/runs/flow-run/" in msg["text"], msg
    finally:
        out = cli("alerts", "--off")
        server.shutdown()
    assert out.startswith("removed 1 automation")


def test_a_run_that_cannot_be_placed_now_fails_in_one_line_naming_what_holds_the_room(
    stack, ray_on_stack
):
    """Served apps and a placement group hold every CPU: `llmflow run finetune` fails at its
    preflight in one line naming them, instead of waiting for ever for its worker's CPU
    (issue 29). The preflight asks again for LLMFLOW_ROOM_WAIT_S (2 s here) first."""
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    app = "room-test"
    serve.run(
        build_app({"model_path": resolve_base_model(TrainConfig()), "model_name": app}),
        name=app,
        route_prefix="/room-test",
    )
    group = None
    try:
        free = ray.available_resources().get("CPU", 0.0)
        if free > 0:
            group = placement_group([{"CPU": free}], name="room-test-hold")
            ray.get(group.ready(), timeout=60)
        # A hang would end at the timeout: the preflight answers in seconds.
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "llmflow"),
                "run",
                "finetune",
                "--config",
                "configs/tiny.yaml",
            ],
            capture_output=True,
            text=True,
            env=user_env(LLMFLOW_ROOM_WAIT_S="2"),
            cwd=ROOT,
            timeout=240,
            check=False,
        )
    finally:
        if group is not None:
            remove_placement_group(group)
        serve.delete(app)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    total = sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    [line] = [ln for ln in out.splitlines() if "cannot be placed now" in ln]
    assert re.search(
        rf"train.num_workers: 1 x \(1 CPU\) cannot be placed now: {total:g} of {total:g} CPU "
        r"held by .*Serve app room-test \(1 CPU\).*\(`llmflow models unserve NAME` frees",
        line,
    ), line
    assert free == 0 or "placement group room-test-hold" in line, line
    assert "Traceback" not in out, out
