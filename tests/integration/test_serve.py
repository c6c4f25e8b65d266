"""The OpenAI-compatible Ray Serve app on the local stack: real HTTP, real generation."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os

import httpx
import pytest

from tests.conftest import METRICS_EXPORT_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory):
    import ray
    from ray import serve

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig, TrainConfig

    path = resolve_base_model(TrainConfig())
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text("s3cret-key\n")
    key_file.chmod(0o600)
    if not ray.is_initialized():
        ray.init(stack.ray_address, **ray_init_kwargs(ClusterConfig()))
    serve.run(
        build_app(
            {
                "model_path": path,
                "model_name": "tiny",
                "version": "7",
                "lineage": {"dataset_sha256": "abc"},
            }
        ),
        name="test-open",
        route_prefix="/open",
    )
    serve.run(
        build_app(
            {
                "model_path": path,
                "model_name": "tiny",
                "version": "7",
                # The key reaches the replicas in a file (a mounted secret); only its
                # path travels (a runtime_env would log it: runtime_env_agent.log).
                "api_key_file": str(key_file),
            }
        ),
        name="test-key",
        route_prefix="/key",
    )
    yield stack.serve_url
    serve.delete("test-open")
    serve.delete("test-key")


CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Reverse this number: 123"}],
    "max_tokens": 6,
}


def test_models_lists_version_and_lineage(served):
    body = httpx.get(f"{served}/open/v1/models", timeout=30).json()
    assert body["data"][0]["id"] == "tiny" and body["data"][0]["version"] == "7"
    assert body["data"][0]["lineage"] == {"dataset_sha256": "abc"}
    assert httpx.get(f"{served}/open/health", timeout=30).json()["status"] == "ok"


def test_chat_and_completion_generate_tokens(served):
    chat = httpx.post(f"{served}/open/v1/chat/completions", json=CHAT, timeout=60).json()
    assert chat["object"] == "chat.completion"
    assert chat["usage"]["prompt_tokens"] > 5 and chat["usage"]["completion_tokens"] >= 1
    comp = httpx.post(
        f"{served}/open/v1/completions",
        json={"model": "tiny", "prompt": ["Reverse 12", "Reverse 34"], "max_tokens": 4},
        timeout=60,
    ).json()
    assert [c["index"] for c in comp["choices"]] == [0, 1]
    assert comp["usage"]["completion_tokens"] >= 2


def test_concurrent_requests_are_batched_and_match_single_answers(served):
    """Greedy decoding: an answer is the same alone or batched with others."""
    prompts = [f"Reverse this number: {n}" for n in (12, 345, 6789, 101, 2222, 90817)]
    single = [
        httpx.post(
            f"{served}/open/v1/completions",
            json={"model": "tiny", "prompt": p, "max_tokens": 6},
            timeout=60,
        ).json()
        for p in prompts
    ]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda p: httpx.post(
                    f"{served}/open/v1/completions",
                    json={"model": "tiny", "prompt": p, "max_tokens": 6},
                    timeout=60,
                ).json(),
                prompts,
            )
        )
    assert [s["choices"][0]["text"] for s in single] == [t["choices"][0]["text"] for t in together]


def test_streaming_over_sse(served):
    """A seeded sampled stream says what the same request unstreamed says (the untrained tiny
    model's greedy answer is special tokens only, empty once decoded)."""
    sampled = CHAT | {"max_tokens": 12, "temperature": 1.0, "seed": 3}
    with httpx.stream(
        "POST", f"{served}/open/v1/chat/completions", json=sampled | {"stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    whole = httpx.post(f"{served}/open/v1/chat/completions", json=sampled, timeout=60).json()
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed and streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


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


def test_official_openai_client(served):
    """The openai package lists the model, completes, streams a chat, and meets the key check."""
    import openai

    client = openai.OpenAI(base_url=f"{served}/open/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(
        model="tiny", prompt="Reverse 12", max_tokens=8, temperature=1.0, seed=1
    )
    assert isinstance(done.choices[0].text, str) and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.total_tokens > 8
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT["messages"], max_tokens=12, temperature=1.0, seed=3, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    wrong = openai.OpenAI(base_url=f"{served}/key/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401
    right = openai.OpenAI(
        base_url=f"{served}/key/v1", api_key="s3cret-key", max_retries=0, timeout=60
    )
    assert [m.id for m in right.models.list()] == ["tiny"]


# -- fuzzing against the app's own OpenAPI schema ---------------------------------------------


def from_schema(schema: dict, defs: dict, overrides: dict | None = None):
    """A hypothesis strategy of JSON values valid for ``schema``: the subset of JSON Schema
    that FastAPI writes for the request models ($ref, anyOf, enum, object, array, string,
    integer, number, boolean, null). Edge values are drawn often: the bounds, the smallest
    positive float, integers past 64 bits, the empty string and a lone surrogate (legal JSON
    text, "\\ud800"). ``overrides`` replace top-level properties' strategies."""
    from hypothesis import strategies as st

    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, overrides)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum") or [schema["const"]])
    kind = schema.get("type")
    if kind == "object":
        overrides = overrides or {}
        props = {
            k: overrides[k] if k in overrides else from_schema(v, defs)
            for k, v in schema.get("properties", {}).items()
        }
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(
            from_schema(schema["items"], defs), min_size=schema.get("minItems", 0), max_size=3
        )
    if kind == "string":
        return st.text(max_size=20) | st.sampled_from(["", "\ud800"])
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMaximum" in schema:
            high = schema["exclusiveMaximum"] - 1
        low, high = (None if v is None else int(v) for v in (low, high))
        edges = [
            v
            for v in (low, high, 0, 2**64, -(2**64))
            if (low is None or v >= low) and (high is None or v <= high)
        ]
        return st.integers(low, high) | st.sampled_from(edges)
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        floats = st.floats(
            low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema, allow_nan=False
        )
        edges = [
            v
            for v in (low, schema.get("maximum"), 5e-324, 1e-300)
            if v is not None and not (v == low and "exclusiveMinimum" in schema)
        ]
        return floats | st.sampled_from(edges)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"schema not covered by from_schema: {schema}")


def request_cases(schema: dict, defs: dict):
    """(body bytes, the statuses allowed or None) for one endpoint: bodies valid by the schema,
    and the same bodies broken: a required field dropped, a field of the wrong type,
    max_tokens negative or huge, an unknown model, bytes that are not JSON."""
    import json as json_

    from hypothesis import strategies as st

    # Lone surrogates are legal in JSON text ("\\ud800") and not in UTF-8.
    texts = st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb"])
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
    any_json = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    )
    # Valid requests stay cheap to generate: the served model, a few tokens.
    valid = from_schema(
        schema,
        defs,
        {"model": st.sampled_from(["tiny", "tiny:7"]), "max_tokens": st.integers(1, 8)},
    )
    fields = sorted(schema["properties"])

    def dumps(body) -> bytes:
        return json_.dumps(body).encode()

    ok = valid.map(lambda b: (dumps(b), None))
    dropped = st.tuples(valid, st.sampled_from(sorted(schema["required"]))).map(
        lambda t: (dumps({k: v for k, v in t[0].items() if k != t[1]}), {400})
    )
    retyped = st.tuples(valid, st.sampled_from(fields), any_json).map(
        lambda t: (dumps(t[0] | {t[1]: t[2]}), None)
    )  # the new value may happen to be valid
    tokens = st.tuples(valid, st.integers(max_value=0) | st.integers(min_value=4097)).map(
        lambda t: (dumps(t[0] | {"max_tokens": t[1]}), {400})
    )
    model = st.tuples(
        valid, st.text(max_size=12).filter(lambda m: m not in ("tiny", "tiny:7"))
    ).map(lambda t: (dumps(t[0] | {"model": t[1]}), {400, 404}))  # 400: something else is off too
    garbage = st.binary(max_size=40).map(lambda b: (b, None))
    return st.one_of(
        ok, ok, dropped, retyped, tokens, model, any_json.map(lambda b: (dumps(b), None)), garbage
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_requests_never_get_a_server_error(served, path):
    """Bodies generated from /openapi.json, valid and broken: each answer is below 500, a 4xx
    is an OpenAI-style error, and the server stays healthy."""
    from hypothesis import HealthCheck, given, settings

    base = f"{served}/open"
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    defs = spec["components"]["schemas"]
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = defs[body["$ref"].rsplit("/", 1)[-1]]
    client = httpx.Client(timeout=60)

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=request_cases(schema, defs))
    def check(case):
        content, allowed = case
        r = client.post(
            f"{base}{path}", content=content, headers={"content-type": "application/json"}
        )
        assert r.status_code < 500, (content, r.status_code, r.text[:300])
        if allowed is not None:
            assert r.status_code in allowed, (content, r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["usage"]["completion_tokens"] >= 0

    try:
        check()
    finally:
        client.close()
    assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"


def test_oversized_body_gets_413_and_the_server_stays_healthy(served):
    url = f"{served}/open/v1/completions"
    big = httpx.post(url, json={"model": "tiny", "prompt": "x" * (2 << 20)}, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds for a streamed body too
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    streamed = httpx.post(
        url, content=chunked(), headers={"content-type": "application/json"}, timeout=60
    )
    assert streamed.status_code == 413
    assert httpx.get(f"{served}/open/health", timeout=30).json()["status"] == "ok"


def test_api_key_is_never_written_to_logs(served, stack):
    """After the key was used (right and wrong), its value is in no log of the stack: neither
    llmflow's nor Ray's (session logs of the head: Serve controller, replicas, raylet, GCS)."""
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    roots = [stack.logs_dir, os.path.join(session_dir, "logs")]
    leaks = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        if b"s3cret-key" in f.read():
                            leaks.append(path)
                except OSError:
                    pass
    assert os.path.isdir(roots[1]) and leaks == [], leaks


def test_health_answers_while_a_long_stream_and_a_batch_generate(served):
    """The replica's event loop never waits on a generation: streams and batches run in the
    replica's one generate thread, so /health answers at once while both run. (A lock taken
    on the event loop around the batch, held by the stream's thread for its whole generation,
    made /health wait for it: seconds.)"""
    import statistics
    import threading
    import time

    # Greedy on the untrained tiny model: special tokens to the limit, never an early stop.
    long = {"model": "tiny", "max_tokens": 400, "temperature": 0.0}
    busy = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{served}/open/v1/chat/completions",
            timeout=120,
            json=long | {"stream": True, "messages": CHAT["messages"]},
        ) as r:
            busy.set()
            for _ in r.iter_lines():
                pass

    def batch() -> None:
        with cf.ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda p: httpx.post(
                        f"{served}/open/v1/completions", timeout=120, json=long | {"prompt": p}
                    ),
                    ["1", "22", "333", "4444"],
                )
            )

    workers = [
        threading.Thread(target=stream),
        threading.Thread(target=batch),
        threading.Thread(target=stream),
    ]
    for w in workers:
        w.start()
    busy.wait(60)
    latencies = []
    with httpx.Client(timeout=30) as client:
        while any(w.is_alive() for w in workers) and len(latencies) < 200:
            t0 = time.perf_counter()
            assert client.get(f"{served}/open/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    for w in workers:
        w.join(120)
    assert len(latencies) >= 5, latencies  # the generations ran long enough to probe
    assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, latencies


def _samples(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (every replica and
    worker exports its own series), from the Ray head's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_export_counts_requests_errors_tokens_and_batches(served, stack):
    """The replica's metrics reach the head's Prometheus endpoint (Ray's metrics export), with
    the served version as a label; /health reports the last minute's request rate."""
    import time

    tags = {"model": "tiny", "version": "7"}
    ok = {**tags, "route": "/v1/chat/completions", "status": "200"}
    missing = {**tags, "route": "/v1/chat/completions", "status": "404"}

    def read() -> dict[str, float]:
        return {
            "ok": _samples(stack.metrics_url, "ray_llmflow_requests_total", **ok),
            "404": _samples(stack.metrics_url, "ray_llmflow_requests_total", **missing),
            "tokens": _samples(stack.metrics_url, "ray_llmflow_generated_tokens_total", **tags),
            "batches": _samples(stack.metrics_url, "ray_llmflow_batch_size_count", **tags),
        }

    # The agent exports every METRICS_EXPORT_S: the earlier tests' requests may still be on
    # their way. The baseline is a reading that no longer moves over more than one export.
    before, deadline = read(), time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(1.5 * METRICS_EXPORT_S)
        again = read()
        if again == before:
            break
        before = again
    with cf.ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(f"{served}/open/v1/chat/completions", json=CHAT, timeout=60),
                range(5),
            )
        )
    assert [a.status_code for a in answers] == [200] * 5
    wrong = httpx.post(
        f"{served}/open/v1/chat/completions", json=CHAT | {"model": "nope"}, timeout=60
    )
    assert wrong.status_code == 404
    tokens = sum(a.json()["usage"]["completion_tokens"] for a in answers)

    deadline, now = time.monotonic() + 60, read()
    while time.monotonic() < deadline and not (
        now["ok"] - before["ok"] >= 5 and now["404"] - before["404"] >= 1
    ):
        time.sleep(1)
        now = read()
    assert now["ok"] - before["ok"] == 5, (before, now)
    assert now["404"] - before["404"] == 1, (before, now)
    assert now["tokens"] - before["tokens"] == tokens > 0
    # Five requests at once went through at least one generate call, at most five.
    assert 1 <= now["batches"] - before["batches"] <= 5
    timed = {**tags, "route": "/v1/chat/completions"}
    latency = _samples(stack.metrics_url, "ray_llmflow_request_seconds_count", **timed)
    assert latency >= now["ok"] + now["404"]  # each counted request was timed

    health = httpx.get(f"{served}/open/health", timeout=10).json()
    assert health["version"] == "7" and health["requests_per_s"] >= 6 / 60
