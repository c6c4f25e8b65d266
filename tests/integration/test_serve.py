"""The OpenAI-compatible Ray Serve app on the local stack: real HTTP, real generation."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY_ENV = "LLMFLOW_TEST_SERVE_KEY"


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory):
    import ray
    from ray import serve

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig, TrainConfig

    path = resolve_base_model(TrainConfig())
    if not ray.is_initialized():
        ray.init(stack.ray_address, **ray_init_kwargs(ClusterConfig()))
    serve.run(build_app({"model_path": path, "model_name": "tiny", "version": "7",
                         "lineage": {"dataset_sha256": "abc"}}),
              name="test-open", route_prefix="/open")  # fmt: skip
    serve.run(build_app({"model_path": path, "model_name": "tiny", "version": "7",
                         "api_key_env": KEY_ENV,
                         # The key reaches the replicas through their runtime_env only.
                         "runtime_env": {"env_vars": {KEY_ENV: "s3cret-key"}}}),
              name="test-key", route_prefix="/key")  # fmt: skip
    yield stack.serve_url
    serve.delete("test-open")
    serve.delete("test-key")


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Reverse this number: 123"}],
        "max_tokens": 6}  # fmt: skip


def test_models_lists_version_and_lineage(served):
    body = httpx.get(f"{served}/open/v1/models", timeout=30).json()
    assert body["data"][0]["id"] == "tiny" and body["data"][0]["version"] == "7"
    assert body["data"][0]["lineage"] == {"dataset_sha256": "abc"}
    assert httpx.get(f"{served}/open/health", timeout=30).json()["status"] == "ok"


def test_chat_and_completion_generate_tokens(served):
    chat = httpx.post(f"{served}/open/v1/chat/completions", json=CHAT, timeout=60).json()
    assert chat["object"] == "chat.completion"
    assert chat["usage"]["prompt_tokens"] > 5 and chat["usage"]["completion_tokens"] >= 1
    comp = httpx.post(f"{served}/open/v1/completions",
                      json={"model": "tiny", "prompt": ["Reverse 12", "Reverse 34"], "max_tokens": 4},
                      timeout=60).json()  # fmt: skip
    assert [c["index"] for c in comp["choices"]] == [0, 1]
    assert comp["usage"]["completion_tokens"] >= 2


def test_concurrent_requests_are_batched_and_match_single_answers(served):
    """Greedy decoding: an answer is the same alone or batched with others."""
    prompts = [f"Reverse this number: {n}" for n in (12, 345, 6789, 101, 2222, 90817)]
    single = [httpx.post(f"{served}/open/v1/completions",
                         json={"model": "tiny", "prompt": p, "max_tokens": 6}, timeout=60).json()
              for p in prompts]  # fmt: skip
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: httpx.post(
            f"{served}/open/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 6},
            timeout=60).json(), prompts))  # fmt: skip
    assert [s["choices"][0]["text"] for s in single] == [t["choices"][0]["text"] for t in together]


def test_streaming_over_sse(served):
    with httpx.stream("POST", f"{served}/open/v1/chat/completions", json=CHAT | {"stream": True},
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"model": "other", "prompt": "hi"}, 404, "model_not_found"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "invalid_value"),
        ({"model": "tiny"}, 400, "invalid_value"),
        ({"model": "tiny", "prompt": "x " * 600}, 413, "context_length_exceeded"),
    ],
)
def test_openai_style_errors(served, body, status, code):
    r = httpx.post(f"{served}/open/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


def test_api_key_enforced_when_set(served):
    url = f"{served}/key/v1/chat/completions"
    missing = httpx.post(url, json=CHAT, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer s3cret-key"}, timeout=60)
    assert ok.status_code == 200
    assert httpx.get(f"{served}/key/health", timeout=30).status_code == 200  # health stays open
