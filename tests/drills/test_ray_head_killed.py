"""Drill: the Ray head killed (SIGKILL, its whole process group: GCS, raylet, Serve's
controller, proxy and replicas) while a client calls the served champion. Serve's
applications live in the head, so nothing answers; `llmflow up` (the CLI, as a user runs it)
starts a new head and brings the champion back from its serving record, and the same version
answers again without a promotion. `llmflow up` runs from a user's shell: none of the
variables the stack hands its own clients (the Ray token's among them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.promote.serving import SERVING
from llmflow.store import Store
from tests.integration.helpers import unserve, user_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
LLMFLOW = str(Path(sys.executable).with_name("llmflow"))
NAME = "restore-drill"


def test_llmflow_up_brings_the_champion_back_after_the_ray_head_dies(stack):
    import ray

    from flows.promote import promote
    from llmflow import stack as stack_mod
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    store = Store()
    v1 = registry.register_version(
        store, NAME, resolve_base_model(TrainConfig()), base_model="tiny"
    )
    cfg = load_config(
        None, [f"train.model_name={NAME}", f"serve.app_name={NAME}", "serve.route_prefix=/restore"]
    )
    assert promote(config=cfg, candidate=v1).served_version == v1.version
    assert store.exists("models", NAME, SERVING)

    url = f"{stack.serve_url}/restore/v1/models"
    seen: list[tuple[float, int, str | None]] = []  # (time, status, version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.get(url)
                    version = r.json()["data"][0]["version"] if r.status_code == 200 else None
                    seen.append((time.monotonic(), r.status_code, version))
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    seen.append((time.monotonic(), -1, None))
                time.sleep(0.2)

    t = threading.Thread(target=client)
    t.start()
    try:
        wait_for(lambda: len(seen) >= 5, 30, "the client's first answers")
        ray.shutdown()  # this process's connection dies with the head
        head = stack_mod.read_state(stack)["ray-head"]
        killed_at = time.monotonic()
        os.killpg(os.getpgid(head["pid"]), signal.SIGKILL)
        wait_for(
            lambda: any(s != 200 for at, s, _ in seen if at > killed_at),
            60,
            "the endpoint to stop answering",
        )
        assert not stack_mod.ray_healthy(stack)

        up = subprocess.run(
            [LLMFLOW, "up", "--no-deploy"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=user_env(),
            timeout=600,
            check=False,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"serving: restored {NAME}:{v1.version} on app '{NAME}'" in up.stdout, up.stdout
        back_at = time.monotonic()
        wait_for(
            lambda: any(s == 200 for at, s, _ in seen if at > back_at),
            60,
            "the endpoint to answer again",
        )
    finally:
        stop.set()
        t.join(30)
    after = [(s, v) for at, s, v in seen if at > back_at]
    outage = [s for at, s, _ in seen if killed_at < at < back_at]
    print(f"requests {len(seen)}, failed during the outage {len(outage)}, after up {len(after)}")
    # It was really down (a failed call between the kill and the restore), then back
    # before `up` returned: up waits until the restored app is RUNNING.
    assert any(s != 200 for s in outage), outage
    assert after and all(s == 200 and v == v1.version for s, v in after), after[:5]
    # Nothing was promoted: the champion is the one recorded.
    assert aliases.read_aliases(store, NAME)["champion"] == v1.version

    again = subprocess.run(
        [LLMFLOW, "up", "--no-deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=300,
        check=False,
    )
    assert again.returncode == 0 and f"serving: {NAME}:{v1.version} answers" in again.stdout
    unserve(NAME, NAME)
    assert not store.exists("models", NAME, SERVING)
