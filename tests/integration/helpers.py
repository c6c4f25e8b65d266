"""Helpers the integration tests share."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar, Self
from uuid import UUID

# The last N_EVAL bundled examples are the scoring tests' eval split (conftest.eval_split); the
# others train the session's model (conftest.tiny_trained).
N_EVAL = 64

# What the stack's clients get from it (llmflow.processes.client_env) and a user's shell does
# not have: a command must find them itself (the test process carries them all).
STACK_CLIENT_VARS = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_LOCAL_STORAGE_PATH",
    "LLMFLOW_RAY_ADDRESS",
    "LLMFLOW_SERVE_URL",
    "LLMFLOW_PROJECT_DIR",
)


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell for an `llmflow` subprocess: this process's environment (the offline
    switches, and where the test stack lives: LLMFLOW_HOME and its ports, as a user of a
    non-default stack exports them) less every variable the stack hands its own clients."""
    env = {k: v for k, v in os.environ.items() if k not in STACK_CLIENT_VARS}
    return env | extra


def wait_for_logs(client, flow_run_id: UUID, *needles: str, timeout: float = 60) -> list:
    """The flow run's log records once every needle occurs in one of them (logs are shipped
    in batches, so they can trail the run's final state); AssertionError after ``timeout``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        missing = [n for n in needles if not any(n in log.message for log in logs)]
        if not missing:
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not in the logs of flow run {flow_run_id} after {timeout} s: {missing}"
            )
        time.sleep(1)


def read_task_runs(client, flow_run_id) -> list:
    """One flow run's task runs (not its subflows'), in creation order."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    return sorted(runs, key=lambda r: r.created)


def settled_task_runs(client, flow_run_id, count: int, timeout: float = 60) -> list:
    """The flow run's task runs once ``count`` of them have a final state. Task runs on Ray
    workers report their states as events the server applies asynchronously, so a run can be
    listed, or still show Running, after its flow has finished. Returns what is there after
    ``timeout`` so the caller's assertion shows it."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_task_runs(client, flow_run_id)
        settled = len(runs) == count and all(r.state and r.state.is_final() for r in runs)
        if settled or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def task_states(client, flow_run_id) -> list[tuple[str, str]]:
    """(task name, state name) of one flow run's task runs, in order; "None" for a run whose
    first state has not reached the server yet."""
    return [
        (r.name.rsplit("-", 1)[0], r.state.name if r.state else "None")
        for r in read_task_runs(client, flow_run_id)
    ]


def kill_flow_process(client, flow_run_id) -> int:
    """SIGKILL the process the worker runs a flow run in (and its children): the driver dies
    as a machine or pod would, with no chance to clean up."""
    import psutil

    pid = int(str(client.read_flow_run(flow_run_id).infrastructure_pid).rsplit(":", 1)[-1])
    proc = psutil.Process(pid)
    for p in [*proc.children(recursive=True), proc]:
        p.kill()
    return pid


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def delete_if_present(delete, *args, what: str) -> bool:
    """Call a Prefect client ``delete(*args)``, treating "already gone" (404) as done: the
    server may have removed the object itself (pausing a schedule deletes its scheduled runs;
    deleting a deployment deletes its runs). Returns False, with a debug line, when it was."""
    import logging

    from prefect.exceptions import ObjectNotFound

    try:
        delete(*args)
    except ObjectNotFound:
        logging.getLogger(__name__).debug("%s was already gone (404): nothing to delete", what)
        return False
    return True


def unserve(model_name: str, app_name: str) -> None:
    """Free a test's Serve app for the tests after it: delete it and its serving record, so
    a later `llmflow up` (a drill's restart) does not bring it back; an app that no promotion
    recorded is deleted by name."""
    from ray import serve

    from llmflow.config import ClusterConfig
    from llmflow.promote.apps import connect
    from llmflow.promote.serving import unserve as unserve_model
    from llmflow.store import Store

    connect(ClusterConfig())
    if unserve_model(Store(), model_name) is None:
        serve.delete(app_name)


class Load:
    """Client threads posting chat completions to a served endpoint until stopped: (status,
    answering version from x-llmflow-version) per request, -1 for a transport error. Every
    ``sampled``-th request samples (temperature 0.9) instead of decoding greedily; of the
    others every other one names an OpenAI ``user`` (sticky in a canary), so the sampled
    ones are routed by the canary's weight alone, not by which users a hash gave the
    candidate.

        with Load(url, model) as load:
            promote(...)
        assert all(code == 200 for code, _ in load.results)
    """

    def __init__(
        self,
        url: str,
        model: str,
        threads: int = 2,
        sampled: int = 0,
        key: str | None = None,
        pause_s: float = 0.02,
        limit: int = 5000,
    ):
        self.url, self.model, self.sampled = url, model, sampled
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.pause_s, self.limit = pause_s, limit
        self.results: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]

    def _run(self, t: int) -> None:
        import httpx

        n = 0
        with httpx.Client(timeout=60, headers=self.headers) as client:
            while not self.stop.is_set() and len(self.results) < self.limit:
                n += 1
                body = {
                    "model": self.model,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Reverse 12"}],
                }
                if self.sampled and n % self.sampled == 0:
                    body["temperature"] = 0.9
                elif n % 2:
                    body["user"] = f"user-{t}-{n % 40}"
                try:
                    r = client.post(self.url, json=body)
                    self.results.append((r.status_code, r.headers.get("x-llmflow-version", "")))
                except httpx.HTTPError:
                    self.results.append((-1, ""))
                time.sleep(self.pause_s)

    def answered(self, n: int, timeout: float = 60) -> None:
        """Wait until ``n`` more requests than now have come back (answered or failed): load
        before a change and after it, instead of a fixed sleep."""
        target = len(self.results) + n
        wait_for(lambda: len(self.results) >= target, timeout, f"{n} more requests to {self.url}")

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


# -- training runs ---------------------------------------------------------------------------
def checkpoints(path: Path) -> list[Path]:
    return sorted(path.glob("checkpoint_*")) if path.exists() else []


def registered_checkpoints(path: Path) -> list:
    """Checkpoints the Train controller has registered (its snapshot): a worker killed after
    writing a checkpoint but before the controller took its report resumes from the one
    before, so the kill tests wait for this, not for the directory."""
    try:
        snapshot = json.loads((path / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return snapshot.get("checkpoint_results") or []


def ray_address() -> str:
    return os.environ["LLMFLOW_RAY_ADDRESS"]  # the session stack's head (client_env)


def alive_train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=ray_address(),
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )


def kill_worker_after_first_checkpoint(path: Path, done: threading.Event, timeout: float = 240):
    """SIGKILL the live training worker once the run at ``path`` has a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done.is_set():
        workers = alive_train_workers() if registered_checkpoints(path) else []
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            return workers[0].pid
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint and live worker to kill at {path}")


def run_in_thread(config, dataset):
    from flows.finetune import finetune

    out: dict = {}
    done = threading.Event()

    def go():
        try:
            out["state"] = finetune(config=config, dataset=dataset, return_state=True)
        finally:
            done.set()

    t = threading.Thread(target=contextvars.copy_context().run, args=(go,))  # Prefect's settings
    t.start()
    return t, done, out


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


class Judge(BaseHTTPRequestHandler):
    """A deterministic OpenAI-compatible judge for eval.judge's default pairwise prompt: it
    prefers the answer equal to the reference; when both or neither are, it says "A" (a
    position bias the swapped order must cancel); a question holding "garble" gets an
    unreadable verdict. Every request is kept in ``seen``."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Judge.seen.append({"auth": self.headers.get("Authorization"), "body": body})
        ref = _between(prompt, "Reference answer:", "Answer A:")
        a = _between(prompt, "Answer A:", "Answer B:")
        b = _between(prompt, "Answer B:", "Which answer")
        if "garble" in prompt:
            verdict = "I would rather not say."
        elif (a == ref) != (b == ref):
            verdict = "A" if a == ref else "B"
        else:
            verdict = "A"  # no preference: the position wins
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def judge_endpoint() -> Iterator[str]:
    """``Judge`` on a free local port; yields its base URL (.../v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
