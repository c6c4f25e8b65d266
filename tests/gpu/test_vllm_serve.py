"""GPU tier: the vllm serving path (deployments/vllm_app.py, ray.serve.llm) on a local Ray.

Serves the tiny model, or the model directory in LLMFLOW_GPU_SERVE_MODEL, as the promote stage
does (a declarative app in the CUDA vLLM engine environment), and asks it over HTTP what the
hf app answers: /v1/models, a chat completion, a stream, and the rollout's own smoke test.
Skipped without a CUDA GPU (conftest) or without that environment; its CPU twin is
tests/integration/test_vllm.py, which runs in `make test`.
"""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

from llmflow import engine_env

_ENV = engine_env.probe()
pytestmark = pytest.mark.skipif(
    not _ENV.healthy or _ENV.dist != "vllm",
    reason=f"needs the CUDA vLLM engine environment ({_ENV.problem or _ENV.dist})",
)

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from llmflow.basemodels import resolve_base_model
    from llmflow.config import ClusterConfig, ServeConfig, TrainConfig
    from llmflow.promote.rollout import deploy
    from llmflow.refs import ModelRef
    from llmflow.store import Store

    path = os.environ.get("LLMFLOW_GPU_SERVE_MODEL") or resolve_base_model(
        TrainConfig(), Store(tmp_path_factory.mktemp("store"))
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # A small share of the GPU, no CUDA graphs: the engine starts in seconds, not minutes.
        cfg = ServeConfig(
            engine="vllm",
            app_name="vllm-test",
            route_prefix="/vllm",
            vllm_engine_kwargs={
                "max_model_len": 512,
                "gpu_memory_utilization": 0.3,
                "enforce_eager": True,
            },
        )
        cluster = ClusterConfig(serve_url=f"http://127.0.0.1:{port}")  # where deploy waits
        deploy(cfg, ModelRef(uri=path, name=NAME, version="1", base_model="tiny"), cluster)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


CHAT = {"model": NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Reverse 123"}]}


def test_models_and_chat(served):
    models = httpx.get(f"{served}/vllm/v1/models", timeout=60)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [NAME]
    chat = httpx.post(f"{served}/vllm/v1/chat/completions", json=CHAT, timeout=120)
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] >= 1


def test_streaming_chat(served):
    with httpx.stream(
        "POST", f"{served}/vllm/v1/chat/completions", json=CHAT | {"stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_rollout_smoke_test_passes(served):
    from llmflow.config import ServeConfig
    from llmflow.promote.rollout import smoke_test
    from llmflow.refs import ModelRef

    model = ModelRef(uri="unused", name=NAME, version="1", base_model="tiny")
    result = smoke_test(ServeConfig(route_prefix="/vllm"), model, served)
    assert result.passed, result.checks
