"""The OpenAI-compatible Ray Serve application on the hf engine (transformers generate).


    serve run deployments.openai_app:build_app model_path=/path/to/model model_name=llmflow-tiny

Endpoints: GET /health, GET /v1/models (with version and lineage), POST /v1/completions and
/v1/chat/completions (streaming over SSE with "stream": true). Requests that arrive together
are generated in one batch (`@serve.batch`): batched generate is what serving speed rests on
(18x one-at-a-time on the tiny model, DESIGN.md). Errors are OpenAI-style JSON
(`{"error": {...}}`): 400 bad input (malformed JSON, wrong types, out-of-range values), 401
missing or wrong key (when an API key is set), 404 unknown model or route, 413 prompt too long
or body over `max_body_bytes`. The schema is at /openapi.json under the route prefix.

No `from __future__ import annotations` here: FastAPI reads the route annotations at
runtime, and with string annotations on methods wrapped by serve.ingress it took the
request body for a query parameter.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field, field_validator
from ray import serve
from starlette.exceptions import HTTPException

api = FastAPI(title="llmflow OpenAI-compatible API")

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

    def response(self) -> Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        # ASCII-escaped: a message quoting client text stays encodable (JSONResponse would
        # raise on a lone surrogate, turning a 4xx into a 500).
        return Response(json.dumps(body), status_code=self.status, media_type="application/json")


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


@api.exception_handler(RequestValidationError)
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


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method, unparsable body) in OpenAI's shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(
        exc.status_code, str(exc.detail), kind, _HTTP_CODES.get(exc.status_code)
    ).response()


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> Response:
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


api.add_middleware(BodyLimit)


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer raises a TypeError on them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class _Sampling(BaseModel):
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


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(description="One prompt, or up to 64 in one request.")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


@dataclass
class GenJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = ()


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def generate_batch(model, tokenizer, jobs: list[GenJob]) -> list[GenResult]:
    """One generate call for jobs that share sampling settings (left padding, KV cache). It
    stops on every id of the model's generation_config.eos_token_id (a turn's end token)."""
    import torch

    from llmflow.engines.stops import (
        cut_at_stop_ids,
        cut_at_stop_strings,
        finish_reason,
        stop_token_ids,
    )

    stop_ids = stop_token_ids(model.generation_config, tokenizer)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for i, j in enumerate(jobs):
        ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
        mask[i, width - len(j.prompt_ids) :] = 1
    first = jobs[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(j.max_tokens for j in jobs),
        "pad_token_id": pad,
        "eos_token_id": list(stop_ids),
    }
    if first.temperature > 0:
        if first.seed is not None:
            torch.manual_seed(first.seed)
        kwargs |= {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
    else:
        kwargs |= {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs
        )
    results = []
    for i, j in enumerate(jobs):
        new, stopped = cut_at_stop_ids(out[i, width:].tolist()[: j.max_tokens], stop_ids)
        new = [t for t in new if t != pad]
        text, hit = cut_at_stop_strings(tokenizer.decode(new, skip_special_tokens=True), j.stop)
        results.append(
            GenResult(
                text,
                len(j.prompt_ids),
                len(new),
                finish_reason(len(new), j.max_tokens, stopped or hit),
            )
        )
    return results


def usage(results: list[GenResult]) -> dict:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@serve.deployment(name="llm", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class OpenAIServer:
    """Serves one registered model version over the OpenAI API."""

    def __init__(
        self,
        model_path: str,
        model_name: str,
        version: str = "",
        lineage: dict | None = None,
        api_key_env: str | None = None,
        api_key_file: str | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        device: str = "auto",
        max_body_bytes: int = 1 << 20,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmflow.engines import local_model_dir

        self.model_name, self.version, self.lineage = model_name, version, lineage or {}
        model_path = local_model_dir(model_path)  # a store URI (s3://...) is copied here first
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, use_safetensors=True, trust_remote_code=False
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        # The key's value stays in the replica (its file or environment): never in the
        # config, the app's args or logs.
        from llmflow.apikey import resolve_api_key

        try:
            self._api_key = resolve_api_key(api_key_env, api_key_file)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        BodyLimit.max_bytes = int(max_body_bytes)
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One thread runs every generate call, batched or streamed, one at a time (generate is
        # not re-entrant on one model). The event loop only awaits it: it never blocks on a
        # lock that a stream holds for a whole generation, so /health and new requests are
        # answered while a batch or a stream runs.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    # -- checks -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self._api_key:
            return
        from llmflow.apikey import bearer_problem

        problem = bearer_problem(request.headers.get("authorization", ""), self._api_key)
        if problem:
            code, message = problem
            raise APIError(401, message, "authentication_error", code)

    def _check_model(self, name: str) -> None:
        if name not in (self.model_name, f"{self.model_name}:{self.version}"):
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves "
                f"'{self.model_name}' (version {self.version}).",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    def _job(self, prompt_ids: list[int], req: _Sampling) -> GenJob:
        if len(prompt_ids) + req.max_tokens > self.context:
            raise APIError(
                413,
                f"Prompt of {len(prompt_ids)} tokens plus max_tokens "
                f"{req.max_tokens} exceeds the model's context of {self.context} tokens.",
                "invalid_request_error",
                "context_length_exceeded",
                "prompt",
            )
        temperature = req.temperature if req.temperature >= GREEDY_EPS else 0.0
        return GenJob(
            prompt_ids, req.max_tokens, temperature, req.top_p, req.seed, tuple(req.stop or ())
        )

    def _chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        from jinja2 import TemplateError

        try:
            enc = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
        except TemplateError as exc:  # e.g. a template that wants user/assistant turns alternating
            raise APIError(
                400,
                f"messages: the model's chat template rejects them: {exc}",
                "invalid_request_error",
                "invalid_value",
                "messages",
            ) from None
        return list(enc["input_ids"])

    def _text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # -- generation ---------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate(self, jobs: list[GenJob]) -> list[GenResult]:
        # Jobs with different sampling settings cannot share one generate call.
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.temperature, j.top_p, j.seed, j.stop), []).append(i)
        results: list[GenResult | None] = [None] * len(jobs)
        for idx in groups.values():
            outs = await asyncio.get_running_loop().run_in_executor(
                self._model_thread,
                generate_batch,
                self.model,
                self.tokenizer,
                [jobs[i] for i in idx],
            )
            for i, r in zip(idx, outs):
                results[i] = r
        return results  # type: ignore[return-value]

    async def _stream(self, job: GenJob, make_chunk, final_chunk):
        """SSE: one event per decoded piece, then the final chunk (its finish_reason) and
        [DONE]. Same generate settings as ``generate_batch``, so a greedy or seeded stream
        says what the same request unstreamed says."""
        import torch
        from transformers import TextIteratorStreamer

        from llmflow.engines.stops import (
            StreamStops,
            cut_at_stop_ids,
            finish_reason,
            stop_token_ids,
        )

        tok = self.tokenizer
        stop_ids = stop_token_ids(self.model.generation_config, tok)
        stops = StreamStops(job.stop)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([job.prompt_ids], device=self.model.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": job.max_tokens,
            "streamer": streamer,
            "pad_token_id": pad,
            "do_sample": False,
            "eos_token_id": list(stop_ids),
        }
        if job.temperature > 0:
            kwargs |= {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
        outcome: dict[str, Any] = {}

        def run():
            try:
                with torch.inference_mode():
                    if job.temperature > 0 and job.seed is not None:
                        torch.manual_seed(job.seed)
                    out = self.model.generate(**kwargs)
                new, stopped = cut_at_stop_ids(out[0, ids.shape[1] :].tolist(), stop_ids)
                outcome["finish"] = finish_reason(len(new), job.max_tokens, stopped)
            except Exception as exc:  # noqa: BLE001 - reported in the stream, not lost in a thread
                outcome["error"] = exc
                streamer.end()  # else the loop below would wait on the streamer forever

        loop = asyncio.get_running_loop()
        generating = loop.run_in_executor(self._model_thread, run)
        while True:
            piece = await loop.run_in_executor(None, lambda: next(streamer, None))
            if piece is None:
                break
            text = stops.feed(piece)  # once a stop string showed, the rest is dropped
            if text:
                yield f"data: {json.dumps(make_chunk(text))}\n\n"
        if rest := stops.flush():
            yield f"data: {json.dumps(make_chunk(rest))}\n\n"
        await generating
        if stops.stopped and "finish" in outcome:
            outcome["finish"] = "stop"
        if "error" in outcome:
            error = {
                "message": f"generation failed: {type(outcome['error']).__name__}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            yield f"data: {json.dumps(final_chunk(outcome['finish']))}\n\n"
        yield "data: [DONE]\n\n"

    # -- routes -------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "version": self.version}

    @api.get("/v1/models")
    def models(self, request: Request) -> dict:
        self._auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llmflow",
                    "version": self.version,
                    "lineage": self.lineage,
                    "context_length": self.context,
                }
            ],
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(
                400,
                "prompt: must be a non-empty string or list of strings",
                "invalid_request_error",
                "invalid_value",
                "prompt",
            )
        if len(prompts) > MAX_PROMPTS:
            raise APIError(
                400,
                f"prompt: at most {MAX_PROMPTS} prompts in one request",
                "invalid_request_error",
                "invalid_value",
                "prompt",
            )
        jobs = [self._job(self._text_ids(p), body) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            if len(jobs) != 1:
                raise APIError(
                    400,
                    "stream: supported for a single prompt",
                    "invalid_request_error",
                    "invalid_value",
                    "stream",
                )
            base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
            return StreamingResponse(
                self._stream(
                    jobs[0],
                    lambda t: base | {"choices": [{"index": 0, "text": t, "finish_reason": None}]},
                    lambda f: base | {"choices": [{"index": 0, "text": "", "finish_reason": f}]},
                ),
                media_type="text/event-stream",
            )
        results = await asyncio.gather(*(self._generate(j) for j in jobs))
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": usage(results),
        }

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._auth(request)
        self._check_model(body.model)
        job = self._job(self._chat_ids(body.messages), body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            base = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
            }
            return StreamingResponse(
                self._stream(
                    job,
                    lambda t: (
                        base
                        | {
                            "choices": [
                                {"index": 0, "delta": {"content": t}, "finish_reason": None}
                            ]
                        }
                    ),
                    lambda f: base | {"choices": [{"index": 0, "delta": {}, "finish_reason": f}]},
                ),
                media_type="text/event-stream",
            )
        r = await self._generate(job)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                }
            ],
            "usage": usage([r]),
        }


def deployment_options(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split builder args into Serve deployment options and OpenAIServer's keyword arguments.

    Args:
        args: OpenAIServer's keyword arguments plus deployment options: ``num_replicas`` or
            ``autoscaling_config`` (a dict of Serve's AutoscalingConfig fields; when given,
            ``num_replicas`` is dropped: Serve refuses both), ``max_ongoing_requests``,
            ``max_surge_percent``, ``num_cpus`` and ``runtime_env`` (never for the API key:
            Ray logs runtime_env env_vars; see llmflow/apikey.py).

    Returns:
        (options for ``OpenAIServer.options``, kwargs for ``.bind``).
    """
    args = dict(args)
    options: dict[str, Any] = {}
    replicas = args.pop("num_replicas", None)
    autoscaling = args.pop("autoscaling_config", None)
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
    elif replicas is not None:
        options["num_replicas"] = int(replicas)
    # Serve's default of 5 ongoing requests a replica would cap every batch at 5: let a full
    # batch queue up while the one before it generates.
    batch = int(args.get("max_batch_size", 16))
    options["max_ongoing_requests"] = int(args.pop("max_ongoing_requests", None) or 2 * batch)
    actor: dict[str, Any] = {"num_cpus": float(args.pop("num_cpus", 1))}
    if "runtime_env" in args:
        actor["runtime_env"] = args.pop("runtime_env")
    options["ray_actor_options"] = actor
    if "max_surge_percent" in args:  # > 0: old replicas serve until their replacements are ready
        options["max_surge_percent"] = int(args.pop("max_surge_percent"))
    return options, args


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / serve configs: ``deployment_options`` says which
    args are deployment options; the rest are OpenAIServer's kwargs."""
    options, kwargs = deployment_options(args)
    return OpenAIServer.options(**options).bind(**kwargs)
