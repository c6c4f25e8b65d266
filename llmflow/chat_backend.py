"""The chat page's side of the OpenAI endpoint: the served model's description, the messages
the page sends, streamed answers, and what an endpoint error means to a user.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

# An assistant turn starting with this is the chat's own notice (an error), not the model's
# answer: it is never sent back to the model as conversation.
NOTICE = "⚠️ "


# The metrics the header names first (the pipeline's gate metric, the loss curve's ends).
EVAL_FIRST = ("exact_match",)


TRAIN_FIRST = ("train_loss_last", "eval_loss_last", "steps")


class EndpointError(Exception):
    """An HTTP error answer of the endpoint (what /v1/models said when it was not 200)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the hf app adds the version and lineage to OpenAI's fields."""

    id: str
    version: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)


# -- pure helpers -----------------------------------------------------------------------------
def endpoint_for(serve_url: str, route_prefix: str) -> str:
    """The OpenAI base URL (ending in /v1) of an application served under ``route_prefix``."""
    return f"{serve_url.rstrip('/')}{route_prefix.rstrip('/')}/v1"


def content_text(content: Any) -> str:
    """The text of a Gradio message's content: a string, a list of parts (Gradio 6 passes
    ``[{"type": "text", "text": ...}]``), or a file or component (no text: "")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content["text"] if isinstance(content.get("text"), str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def is_notice(text: str) -> bool:
    return text.startswith(NOTICE)


def to_openai_messages(
    message: Any, history: Sequence[Any], system: str | None = None
) -> list[dict[str, str]]:
    """Gradio's chat history plus the new message as OpenAI chat messages.

    Args:
        message: the new user message (a string, or a multimodal ``{"text": ...}`` dict).
        history: Gradio's history: message dicts (``{"role", "content"}``), or the older
            ``[user, assistant]`` pairs.
        system: an optional system prompt, sent first.

    Returns:
        ``[{"role": ..., "content": ...}]``. Turns with no text (files, components) are left
        out, and so are the chat's own notices together with the user turn they answered,
        so a failed question asked again is not sent twice.
    """
    turns: list[dict[str, str]] = []
    for item in history:
        if isinstance(item, dict):
            pairs = [(item.get("role", "user"), item.get("content"))]
            if (item.get("metadata") or {}).get("title"):  # a collapsed "thought", not a turn
                continue
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs = [("user", item[0]), ("assistant", item[1])]
        else:
            continue
        for role, content in pairs:
            text = content_text(content)
            if role == "assistant" and is_notice(text):
                if turns and turns[-1]["role"] == "user":
                    turns.pop()
                continue
            if text and role in ("user", "assistant", "system"):
                turns.append({"role": role, "content": text})
    out = [{"role": "system", "content": system}] if system else []
    return out + turns + [{"role": "user", "content": content_text(message)}]


def _short(value: Any, width: int = 12) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width] + "…"


def _metrics(values: Any, prefer: Sequence[str] = (), limit: int = 4) -> str:
    """``a 0.95, b 0.1``: the ``prefer`` keys first (those present), then the rest by name."""
    if not isinstance(values, dict) or not values:
        return ""
    keys = [k for k in prefer if k in values] + sorted(k for k in values if k not in prefer)
    parts = []
    for key, value in ((k, values[k]) for k in keys[:limit]):
        parts.append(f"{key} {value:.4g}" if isinstance(value, (int, float)) else f"{key} {value}")
    return ", ".join(parts)


def describe_model(
    models: Sequence[ServedModel], endpoint: str, prefect_ui: str | None = None
) -> str:
    """Markdown for the page's header: the version serving, its lineage, the endpoint."""
    if not models:
        return f"{NOTICE}No model is listed at `{endpoint}/models`.\n\nEndpoint: `{endpoint}`"
    m = models[0]
    lineage = m.lineage or {}
    head = f"**Serving `{m.id}` version `{m.version}`**" if m.version else f"**Serving `{m.id}`**"
    facts = []
    dataset = lineage.get("dataset") if isinstance(lineage.get("dataset"), dict) else {}
    sha = lineage.get("dataset_sha256") or dataset.get("sha256")
    if sha:
        rows = ""
        if dataset.get("num_train") is not None:
            rows = f" ({dataset['num_train']} train / {dataset.get('num_eval', '?')} eval rows)"
        facts.append(f"dataset `{_short(sha)}`{rows}")
    run = lineage.get("flow_run_id")
    if run:
        facts.append(
            f"flow run [`{_short(run, 8)}`]({prefect_ui.rstrip('/')}/runs/flow-run/{run})"
            if prefect_ui
            else f"flow run `{run}`"
        )
    if _metrics(lineage.get("eval_metrics")):
        facts.append(f"eval: {_metrics(lineage['eval_metrics'], EVAL_FIRST)}")
    train = _metrics(lineage.get("train_metrics"), TRAIN_FIRST, limit=len(TRAIN_FIRST))
    if train:
        facts.append(f"train: {train}")
    if lineage.get("base_model"):
        facts.append(f"base model `{_short(lineage['base_model'], 40)}`")
    lines = [head]
    if facts:
        lines.append("Lineage: " + " · ".join(facts))
    lines.append(f"Endpoint: `{endpoint}`")
    if len(models) > 1:
        lines.append("Also served: " + ", ".join(f"`{x.id}`" for x in models[1:]))
    return "\n\n".join(lines)


def error_text(
    exc: BaseException, endpoint: str, key_source: str | None = None, key_set: bool = False
) -> str:
    """One readable line (a notice) for what went wrong talking to the endpoint.

    Args:
        exc: what the request raised (httpx, the openai client, EndpointError).
        endpoint: the OpenAI base URL asked.
        key_source: where the key comes from, as the user set it (``the environment variable
            X`` or ``the file P``), never the key itself.
        key_set: whether a key was sent.
    """
    status, detail = _status(exc)
    if status == "down":
        return (
            f"{NOTICE}The model endpoint {endpoint} is not reachable. Start the stack with "
            "`llmflow up` and serve a model (`llmflow run pipeline`, or "
            "`llmflow models promote NAME VERSION`)."
        )
    if status == "timeout":
        return (
            f"{NOTICE}The model endpoint {endpoint} did not answer in time; it may be busy. "
            "Try again."
        )
    if status == 401:
        if not key_set:
            where = key_source or "serve.api_key_file or serve.api_key_env"
            return (
                f"{NOTICE}The endpoint {endpoint} needs an API key: set {where} where the "
                f"chat runs ({detail})."
            )
        return f"{NOTICE}The endpoint {endpoint} refused the API key in {key_source}: {detail}"
    if status == 404:
        return (
            f"{NOTICE}Nothing at {endpoint} answers for this model ({detail}). Is a model "
            "served there? Check serve.route_prefix and `llmflow status`."
        )
    if isinstance(status, int) and status < 500:
        return f"{NOTICE}The endpoint rejected the request (HTTP {status}): {detail}"
    if isinstance(status, int):
        return f"{NOTICE}The endpoint failed to answer (HTTP {status}): {detail}"
    return f"{NOTICE}Chat failed: {type(exc).__name__}: {_short(exc, 300)}"


def _status(exc: BaseException) -> tuple[int | str | None, str]:
    """(HTTP status, or "down"/"timeout", or None; the server's message) of an exception
    from httpx or the openai client."""
    try:
        import openai
    except ImportError:  # pragma: no cover - a core dependency
        openai = None  # type: ignore[assignment]
    if isinstance(exc, EndpointError):
        return exc.status, exc.message
    if openai is not None:
        if isinstance(exc, openai.APITimeoutError):
            return "timeout", ""
        if isinstance(exc, openai.APIConnectionError):
            return "down", ""
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            return exc.status_code, str(body.get("message") or exc.message)
        if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
            return 500, exc.message
    if isinstance(exc, httpx.TimeoutException):
        return "timeout", ""
    if isinstance(exc, httpx.TransportError):
        return "down", ""
    return None, str(exc)


def _server_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or r.reason_phrase


# -- talking to the endpoint ------------------------------------------------------------------
class ChatBackend:
    """The chat's side of the endpoint: list the served models, stream answers.

    Args:
        endpoint: the OpenAI base URL, e.g. http://127.0.0.1:8000/v1.
        api_key_env: the environment variable holding the bearer key (serve.api_key_env).
        model: the model id to ask; None: the first one /v1/models lists.
        timeout: seconds to wait for the endpoint.
        api_key_file: a file holding the key (serve.api_key_file); wins over api_key_env.
            Either is read at each request: the key itself is never kept in the page, the
            Serve application's arguments or the logs.
    """

    def __init__(
        self,
        endpoint: str,
        api_key_env: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        api_key_file: str | None = None,
    ):
        self.endpoint = endpoint.rstrip("/")
        self.api_key_env, self.api_key_file = api_key_env, api_key_file
        self.model, self.timeout = model, timeout

    @property
    def api_key(self) -> str | None:
        """The key, or None when none is configured or its source holds none (the endpoint's
        401 then says so, in the chat)."""
        from llmflow.apikey import resolve_api_key

        try:
            return resolve_api_key(self.api_key_env, self.api_key_file)
        except ValueError:
            return None

    @property
    def key_source(self) -> str | None:
        if self.api_key_file:
            return f"the file {self.api_key_file}"
        return f"the environment variable {self.api_key_env}" if self.api_key_env else None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def models(self) -> list[ServedModel]:
        """What /v1/models lists; raises EndpointError or httpx errors."""
        r = httpx.get(
            f"{self.endpoint}/models", headers=self._headers(), timeout=min(self.timeout, 10)
        )
        if r.status_code != 200:
            raise EndpointError(r.status_code, _server_message(r))
        return [
            ServedModel(m["id"], m.get("version"), m.get("lineage") or {})
            for m in r.json().get("data", [])
        ]

    def error(self, exc: BaseException) -> str:
        return error_text(exc, self.endpoint, self.key_source, self.api_key is not None)

    def info(self, prefect_ui: str | None = None) -> str:
        """The page header's markdown; an error notice plus the endpoint when it fails."""
        try:
            models = self.models()
        except Exception as exc:  # noqa: BLE001 - shown in the page, never as a traceback
            return f"{self.error(exc)}\n\nEndpoint: `{self.endpoint}`"
        if self.model:
            models = sorted(models, key=lambda m: m.id != self.model)
        return describe_model(models, self.endpoint, prefect_ui)

    def _model_id(self) -> str:
        if self.model:
            return self.model
        models = self.models()
        if not models:
            raise EndpointError(404, f"no model is listed at {self.endpoint}/models")
        return models[0].id

    def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The answer's pieces as the endpoint streams them (SSE); raises on any failure."""
        import openai

        client = openai.OpenAI(
            base_url=self.endpoint,
            api_key=self.api_key or "none",
            max_retries=0,
            timeout=self.timeout,
        )
        extra = {"seed": int(seed)} if seed is not None else {}
        with client.chat.completions.create(
            model=self._model_id(),
            messages=messages,
            temperature=float(temperature),
            max_tokens=int(max_tokens),
            stream=True,
            **extra,
        ) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def respond(
        self,
        message: Any,
        history: Sequence[Any],
        temperature: float = 0.7,
        max_tokens: int = 64,
        seed: float | None = None,
    ) -> Iterator[str]:
        """ChatInterface's function: yields the answer so far after each streamed piece; on
        failure, yields one notice instead (and raises nothing)."""
        if not content_text(message).strip():
            yield f"{NOTICE}Type a message first."
            return
        messages = to_openai_messages(message, history)
        answer = ""
        try:
            seed_ = None if seed is None or seed == "" else int(seed)
            for piece in self.stream(messages, temperature, max_tokens, seed_):
                answer += piece
                yield answer
        except Exception as exc:  # noqa: BLE001 - one readable line in the chat, never a trace
            note = self.error(exc)
            yield f"{answer}\n\n{note}" if answer else note
            return
        if not answer:
            yield (
                f"{NOTICE}The model answered with no text (it ended at once). Try a higher "
                "temperature or another seed."
            )
