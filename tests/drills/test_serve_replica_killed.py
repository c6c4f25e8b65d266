"""Drill: a Serve replica killed with SIGKILL under steady load. Serve routes around it and
starts a replacement; clients retry a failed request once (generation requests are
idempotent: same prompt and settings, same answer), so no request is lost. The raw failures
(before the retry) are reported."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.integration.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]
APP = "drill-replica"
BODY = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "Reverse 12"}]}


def replicas(state: str = "ALIVE") -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=os.environ["LLMFLOW_RAY_ADDRESS"],
        detail=True,
        filters=[("class_name", "=", f"ServeReplica:{APP}:llm"), ("state", "=", state)],
    )


def test_killed_replica_is_replaced_and_no_request_is_lost(stack):
    import ray
    from ray import serve

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig, TrainConfig

    if not ray.is_initialized():
        ray.init(stack.ray_address, **ray_init_kwargs(ClusterConfig()))
    serve.run(
        build_app(
            {
                "model_path": resolve_base_model(TrainConfig()),
                "model_name": "tiny",
                "version": "1",
                "num_replicas": 2,
            }
        ),
        name=APP,
        route_prefix="/drill",
    )
    url = f"{stack.serve_url}/drill/v1/chat/completions"
    raw_failures: list[str] = []
    final: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                for attempt in (1, 2):
                    try:
                        r = http.post(url, json=BODY)
                        status = r.status_code
                    except httpx.HTTPError as exc:
                        status = -1
                        raw_failures.append(type(exc).__name__)
                    if status == 200:
                        break
                    if status != -1:
                        raw_failures.append(str(status))
                    time.sleep(0.5)  # then retry once
                final.append(status)

    try:
        [victim, _] = replicas()
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(final) >= 10, 60, "10 requests answered before the kill")
        before = len(final)
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(
            lambda: (
                len(alive := replicas()) == 2 and victim.actor_id not in {a.actor_id for a in alive}
            ),
            180,
            "Serve's replacement replica alive beside the other one",
            every=1,
        )
        replaced = len(final)
        # Traffic on the replacement too: 20 more requests through both replicas.
        wait_for(lambda: len(final) >= replaced + 20, 60, "20 requests after the replacement")
        stop.set()
        for t in threads:
            t.join(120)
        alive = replicas()
        assert len(alive) == 2 and victim.actor_id not in {a.actor_id for a in alive}, alive
        lost = [s for s in final if s != 200]
        print(
            f"requests {len(final)}, raw failures {len(raw_failures)} {raw_failures[:5]}, "
            f"lost after one retry {len(lost)}"
        )
        assert before > 0 and len(final) > before + 10
        assert lost == [], f"{len(lost)} of {len(final)} requests lost: {lost[:5]}"
    finally:
        stop.set()
        serve.delete(APP)
