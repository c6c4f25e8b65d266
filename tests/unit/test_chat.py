"""The chat page's message handling, without Gradio or a server: history to OpenAI messages,
the header's lineage, one readable line per failure."""

from __future__ import annotations

import httpx
import openai
import pytest

from llmflow.chat_backend import (
    NOTICE,
    ChatBackend,
    EndpointError,
    ServedModel,
    content_text,
    describe_model,
    endpoint_for,
    error_text,
    to_openai_messages,
)

ENDPOINT = "http://127.0.0.1:8000/v1"


def test_endpoint_is_serve_url_plus_route_prefix():
    assert endpoint_for("http://127.0.0.1:8000", "/") == ENDPOINT
    assert endpoint_for("http://h:1/", "/team/a/") == "http://h:1/team/a/v1"


def test_content_text_of_each_gradio_shape():
    assert content_text("hi") == "hi"
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert content_text({"text": "multimodal", "files": []}) == "multimodal"
    assert content_text({"file": {"path": "/tmp/x.png"}, "type": "file"}) == ""
    assert content_text(None) == "" and content_text(3) == ""


def test_history_becomes_openai_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Reverse 12"}], "metadata": None},
        {"role": "assistant", "content": "21"},
        {"role": "user", "content": {"file": {"path": "/x.png"}, "type": "file"}},  # no text
        {"role": "assistant", "content": "thinking", "metadata": {"title": "thought"}},
    ]
    assert to_openai_messages("Reverse 345", history, system="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse 12"},
        {"role": "assistant", "content": "21"},
        {"role": "user", "content": "Reverse 345"},
    ]


def test_tuple_history_and_multimodal_message():
    assert to_openai_messages({"text": "3", "files": []}, [["1", "one"], ("2", None)]) == [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "2"},
        {"role": "user", "content": "3"},
    ]


def test_notices_and_the_question_they_answered_are_not_sent_again():
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": f"{NOTICE}The model endpoint x is not reachable."},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "answer"},
    ]
    assert to_openai_messages("third", history) == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "third"},
    ]


def test_header_shows_version_lineage_and_endpoint():
    model = ServedModel(
        "llmflow-tiny",
        "v3",
        {
            "base_model": "/store/base/tiny",
            "dataset_sha256": "0123456789abcdef" * 4,
            "dataset": {"num_train": 900, "num_eval": 100},
            "flow_run_id": "5f0c9a3e-1111-2222",
            "eval_metrics": {"exact_match": 0.95123},
            "train_metrics": {"train_loss_last": 0.2},
        },
    )
    text = describe_model([model, ServedModel("other")], ENDPOINT, prefect_ui="http://ui:4200")
    assert "**Serving `llmflow-tiny` version `v3`**" in text
    assert "dataset `0123456789ab…` (900 train / 100 eval rows)" in text
    assert "flow run [`5f0c9a3e…`](http://ui:4200/runs/flow-run/5f0c9a3e-1111-2222)" in text
    assert "eval: exact_match 0.9512" in text and "train: train_loss_last 0.2" in text
    assert f"Endpoint: `{ENDPOINT}`" in text and "Also served: `other`" in text
    # The vllm app lists ids only: no version, no lineage.
    assert describe_model([ServedModel("m")], ENDPOINT).startswith("**Serving `m`**")
    assert describe_model([], ENDPOINT).startswith(NOTICE)


def _request() -> httpx.Request:
    return httpx.Request("POST", f"{ENDPOINT}/chat/completions")


def _status_error(cls, status: int, message: str):
    response = httpx.Response(status, request=_request(), json={"error": {"message": message}})
    return cls(f"Error code: {status}", response=response, body={"message": message})


@pytest.mark.parametrize(
    "exc,expected",
    [
        (openai.APIConnectionError(request=_request()), "is not reachable. Start the stack"),
        (httpx.ConnectError("refused"), "is not reachable. Start the stack"),
        (openai.APITimeoutError(request=_request()), "did not answer in time"),
        (httpx.ReadTimeout("slow"), "did not answer in time"),
        (
            _status_error(openai.AuthenticationError, 401, "Incorrect API key provided."),
            "refused the API key in the file /k: Incorrect API key provided.",
        ),
        (EndpointError(401, "Incorrect API key provided."), "refused the API key in the file /k"),
        (
            _status_error(openai.NotFoundError, 404, "The model 'x' does not exist"),
            "Nothing at http://127.0.0.1:8000/v1 answers for this model (The model 'x' does not exist)",
        ),
        (
            _status_error(openai.BadRequestError, 413, "Prompt of 900 tokens"),
            "rejected the request (HTTP 413): Prompt of 900 tokens",
        ),
        (
            _status_error(openai.InternalServerError, 500, "internal error: KeyError"),
            "failed to answer (HTTP 500): internal error: KeyError",
        ),
        (ValueError("odd"), "Chat failed: ValueError: odd"),
    ],
)
def test_every_failure_is_one_readable_notice(exc, expected):
    text = error_text(exc, ENDPOINT, "the file /k", key_set=True)
    assert text.startswith(NOTICE) and expected in text, text
    assert "Traceback" not in text and "\n" not in text


def test_missing_key_says_where_to_set_it():
    exc = EndpointError(401, "Missing API key")
    backend = ChatBackend(ENDPOINT, api_key_env="LLMFLOW_TEST_UNSET")
    assert (
        "needs an API key: set the environment variable LLMFLOW_TEST_UNSET where the chat "
        "runs (Missing API key)." in backend.error(exc)
    )
    assert "set serve.api_key_file or serve.api_key_env" in error_text(exc, ENDPOINT)


def test_backend_reads_the_key_from_its_file_or_variable(monkeypatch, tmp_path):
    backend = ChatBackend(ENDPOINT + "/", api_key_env="LLMFLOW_TEST_CHAT_KEY")
    monkeypatch.delenv("LLMFLOW_TEST_CHAT_KEY", raising=False)
    assert backend.api_key is None and backend._headers() == {}
    monkeypatch.setenv("LLMFLOW_TEST_CHAT_KEY", "k")
    assert backend._headers() == {"Authorization": "Bearer k"} and backend.endpoint == ENDPOINT
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    with_file = ChatBackend(ENDPOINT, "LLMFLOW_TEST_CHAT_KEY", api_key_file=str(key_file))
    assert with_file.api_key == "from-file" and with_file.key_source == f"the file {key_file}"
    assert ChatBackend(ENDPOINT, api_key_file=str(tmp_path / "none")).api_key is None
    assert ChatBackend(ENDPOINT).api_key is None


def test_empty_message_is_answered_without_asking_the_endpoint():
    # Port 9 (discard) would fail the request: the empty message never gets that far.
    backend = ChatBackend("http://127.0.0.1:9/v1")
    assert list(backend.respond("  ", [])) == [f"{NOTICE}Type a message first."]


# -- where the chat plugs in: the served lineage, the Serve app, the stack, the CLI ---------


def test_served_lineage_reads_flow_run_and_eval_metrics_of_the_version(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmflow.evaluate.scoring import PREDICTIONS_FILE
    from llmflow.promote.apps import served_lineage
    from llmflow.refs import ModelRef
    from llmflow.registry import register_version
    from llmflow.store import Store

    monkeypatch.setenv("LLMFLOW_STORE", str(tmp_path / "store"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    store = Store()
    ref = register_version(
        store,
        "m",
        tmp_path / "model",
        base_model="tiny",
        dataset_sha256="ab" * 32,
        metrics={"train_loss_last": 0.5},
        lineage={
            "flow_run_id": "run-1",
            "dataset": {"uri": "/d", "sha256": "ab" * 32, "num_train": 9, "num_eval": 2},
        },
    )
    predictions = tmp_path / "store" / "runs" / "run-1" / "eval" / "candidate" / PREDICTIONS_FILE
    predictions.parent.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "generation": ["1", "2"],
                "exact_match": [1.0, 0.0],
                "eval_loss": [9.0, 9.0],
            }
        ),
        predictions,
    )
    lineage = served_lineage(ref)
    assert lineage["flow_run_id"] == "run-1" and lineage["eval_metrics"] == {"exact_match": 0.5}
    assert lineage["dataset"] == {"uri": "/d", "sha256": "ab" * 32, "num_train": 9, "num_eval": 2}
    assert lineage["train_metrics"] == {"train_loss_last": 0.5} and lineage["base_model"] == "tiny"
    # A version without a readable manifest still serves, with the lineage its ref carries.
    bare = ModelRef(uri=str(tmp_path / "nowhere"), name="m", version="9", base_model="tiny")
    assert served_lineage(bare) == {
        "base_model": "tiny",
        "dataset_sha256": None,
        "train_metrics": {},
    }


def test_serve_chat_app_is_one_replica_with_no_cpu_and_no_key_in_its_args():
    from deployments.chat_app import build_app
    from llmflow.configfile import load_config
    from llmflow.promote.apps import chat_app_name, chat_route_prefix

    deployment = build_app(
        {"endpoint": ENDPOINT, "api_key_file": "/run/secrets/key"}
    )._bound_deployment
    assert deployment.num_replicas == 1 and deployment.ray_actor_options["num_cpus"] == 0
    assert deployment.init_kwargs == {"endpoint": ENDPOINT, "api_key_file": "/run/secrets/key"}
    serve_cfg = load_config(None, ["serve.chat=true", "serve.route_prefix=/team/"]).serve
    assert serve_cfg.chat and chat_app_name(serve_cfg) == "llmflow-chat"
    assert chat_route_prefix(serve_cfg) == "/team/chat"
    assert chat_route_prefix(load_config(None, []).serve) == "/chat"


def test_status_lists_the_chat_only_once_started_and_flows_do_not_need_it(tmp_path, monkeypatch):
    import json

    from llmflow import launch, stack
    from llmflow.settings import StackSettings
    from tests.conftest import free_port

    for var in ("PREFECT_PORT", "RAY_PORT", "DASHBOARD_PORT", "SERVE_PORT", "CHAT_PORT"):
        monkeypatch.setenv(f"LLMFLOW_{var}", str(free_port()))  # nothing listens there
    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path))
    s = StackSettings.from_env()
    assert [p.name for p in stack.status(s)] == list(stack.PARTS)
    s.state_file.write_text(
        json.dumps({"chat": {"pid": 999999, "create_time": 0, "endpoint": ENDPOINT}})
    )
    chat = stack.status(s)[-1]
    assert (chat.name, chat.url, chat.healthy, chat.pid) == ("chat", s.chat_url, False, None)
    assert chat.detail == f"model endpoint {ENDPOINT}"
    assert launch.stop_chat(s) is False and "chat" not in json.loads(s.state_file.read_text())


def test_chat_command_refuses_a_busy_port_in_one_line():
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "llmflow"), "chat", "--port", str(port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        (
            f"error: cannot start the chat: port 127.0.0.1:{port} is already in use; "
            "pass --port or set LLMFLOW_CHAT_PORT"
        )
    ], proc.stderr


def test_cli_and_message_handling_do_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, llmflow.cli, llmflow.chat; sys.exit(1 if 'gradio' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
