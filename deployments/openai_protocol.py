"""The OpenAI API's request bodies, responses and error shape as the hf app accepts and
answers them: validated pydantic requests, the responses and stream chunks built on the
`openai` package's own types, `{"error": {...}}` bodies for every 4xx and 5xx (FastAPI's and
Starlette's own included), and the body-size limit.

No `from __future__ import annotations` here: FastAPI reads these annotations at runtime.
"""

import json
import logging
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import AfterValidator, BaseModel, Field, field_validator
from starlette.exceptions import HTTPException

log = logging.getLogger("ray.serve")

MAX_PROMPTS = 64  # a list prompt: one request must not hold a replica for thousands


# Below this, sampling divides the logits into inf and NaN: treated as greedy (vLLM's epsilon).
GREEDY_EPS = 1e-5


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> Response:
        # ASCII-escaped: a message quoting client text stays encodable (JSONResponse would
        # raise on a lone surrogate, turning a 4xx into a 500).
        return Response(
            json.dumps(self.body()), status_code=self.status, media_type="application/json"
        )


async def _api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        why = first.get("ctx", {}).get("error")
        return APIError(
            400, f"request body is not valid JSON ({why})", "invalid_request_error", "invalid_json"
        ).response()
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return APIError(
        400,
        f"{param or 'request'}: {first['msg']}",
        "invalid_request_error",
        "invalid_value",
        param,
    ).response()


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


async def _http_error(_: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method, unparsable body) in OpenAI's shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(
        exc.status_code, str(exc.detail), kind, _HTTP_CODES.get(exc.status_code)
    ).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    # The client gets the exception's type only; the replica's log keeps the traceback.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is parsed.

    The limit is a class attribute that the replica sets: a Serve replica is one process
    serving one OpenAIServer, and FastAPI builds its middleware stack on the first request.
    """

    max_bytes = 1 << 20

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send)
        # No (or a lying) Content-Length, e.g. chunked: read up to the limit, then replay.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await APIError(
            413,
            f"Request body exceeds {self.max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        ).response()(scope, receive, send)


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer raises a TypeError on them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from exc
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class Sampling(BaseModel):
    model: Text
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch.manual_seed's range
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings that end the answer.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty strings")
        return stops


class CompletionRequest(Sampling):
    prompt: Text | list[Text] = Field(description="One prompt, or up to 64 in one request.")


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


# -- responses ----------------------------------------------------------------------------------
# Built on openai's types, dumped with exclude_unset: the keys set here and no more (none of
# the optional ones, system_fingerprint, refusal..., that the API would send as null).


def _dump(response: BaseModel) -> dict:
    return response.model_dump(mode="json", exclude_unset=True)


def models_list(name: str, version: str, lineage: dict, context_length: int) -> dict:
    """GET /v1/models: the served model, with llmflow's version, lineage and context length
    (extra fields, which openai's Model keeps)."""
    card = Model(
        id=name,
        object="model",
        created=0,
        owned_by="llmflow",
        version=version,
        lineage=lineage,
        context_length=context_length,
    )
    return {"object": "list", "data": [_dump(card)]}


def completion(
    rid: str, created: int, model: str, choices: list[tuple[str, str]], usage: CompletionUsage
) -> dict:
    """POST /v1/completions: one choice a prompt, from its (text, finish_reason)."""
    return _dump(
        Completion(
            id=rid,
            object="text_completion",
            created=created,
            model=model,
            choices=[
                CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=None)
                for i, (text, finish) in enumerate(choices)
            ],
            usage=usage,
        )
    )


def completion_chunk(
    rid: str, created: int, model: str, text: str | None, finish: str | None = None
) -> dict:
    """One SSE event of a streamed completion: a piece of text (finish None), or the last one
    (text None, the finish_reason)."""
    # Completion is both the streamed and the unstreamed shape, and its finish_reason is
    # required: built unvalidated (as the openai client reads it) for the null of a chunk.
    choice = CompletionChoice.model_construct(index=0, text=text or "", finish_reason=finish)
    return _dump(
        Completion(id=rid, object="text_completion", created=created, model=model, choices=[choice])
    )


def chat_completion(
    rid: str, created: int, model: str, content: str, finish: str, usage: CompletionUsage
) -> dict:
    """POST /v1/chat/completions: the assistant's answer."""
    message = ChatCompletionMessage(role="assistant", content=content)
    return _dump(
        ChatCompletion(
            id=rid,
            object="chat.completion",
            created=created,
            model=model,
            choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
            usage=usage,
        )
    )


def chat_completion_chunk(
    rid: str, created: int, model: str, content: str | None, finish: str | None = None
) -> dict:
    """One SSE event of a streamed chat answer: a piece of content, or the last one (content
    None: an empty delta, and the finish_reason)."""
    delta = ChoiceDelta() if content is None else ChoiceDelta(content=content)
    return _dump(
        ChatCompletionChunk(
            id=rid,
            object="chat.completion.chunk",
            created=created,
            model=model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
        )
    )


def install(api: FastAPI) -> None:
    """OpenAI-shaped errors for every failure, and the body limit, on the app's FastAPI."""
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _server_error)
    api.add_middleware(BodyLimit)
