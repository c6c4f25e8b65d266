"""The OpenAI-compatible Ray Serve application on the hf engine (transformers generate).


    serve run deployments.openai_app:build_app model_path=/path/to/model model_name=llmflow-tiny

Endpoints: GET /health, GET /v1/models (with version and lineage), POST /v1/completions and
/v1/chat/completions (streaming over SSE with "stream": true). Requests that arrive together
are generated in one batch (deployments/batcher.py: a batch starts when the model is free, with
every request that queued while the one before generated): batched generate is what serving
speed rests on (18x one-at-a-time on the tiny model). Errors are OpenAI-style JSON
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
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from deployments import serve_metrics
from deployments.batcher import ContinuousBatcher
from deployments.hf_generation import (
    GenJob,
    StreamEnd,
    generate_batch,
    stream_generate,
    usage,
)
from deployments.openai_protocol import (
    GREEDY_EPS,
    MAX_PROMPTS,
    APIError,
    BodyLimit,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_completion,
    chat_completion_chunk,
    completion,
    completion_chunk,
    install,
    models_list,
)
from deployments.serve_metrics import ServeMetrics, route_label

api = FastAPI(title="llmflow OpenAI-compatible API")


install(api)


@api.middleware("http")
async def measure(request: Request, call_next):
    """Count and time every request by route and status (an exception that escapes every
    handler counts as the 500 Starlette answers it with)."""
    start, status = time.perf_counter(), 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        # Through the module: Serve pickles the ingress app by value, with its own globals.
        metrics = serve_metrics.REPLICA.get("metrics")
        if metrics is not None:
            route = route_label(request.url.path, request.scope.get("root_path", ""))
            metrics.request(route, status, time.perf_counter() - start)


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
        batch_wait_timeout_s: float = 0.0,
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
            raise RuntimeError(str(exc)) from exc
        BodyLimit.max_bytes = int(max_body_bytes)
        # One thread runs every generate call, batched or streamed, one at a time (generate is
        # not re-entrant on one model). The event loop only awaits it: it never blocks on a
        # lock that a stream holds for a whole generation, so /health and new requests are
        # answered while a batch or a stream runs.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.metrics = serve_metrics.REPLICA["metrics"] = ServeMetrics(model_name, version)
        # Requests with the same sampling settings share one generate call; a batch starts
        # when the model thread is free, with what queued meanwhile (deployments/batcher.py).
        self._batcher = ContinuousBatcher(
            partial(generate_batch, self.model, self.tokenizer),
            self._model_thread,
            max_batch_size=max_batch_size,
            wait_s=batch_wait_timeout_s,
            key=lambda j: (j.temperature, j.top_p, j.seed, j.stop),
            on_batch=lambda results: self.metrics.generated(
                sum(r.completion_tokens for r in results), len(results)
            ),
        )

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

    def _job(self, prompt_ids: list[int], req: Sampling) -> GenJob:
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
            ) from exc
        return list(enc["input_ids"])

    def _text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # -- generation ---------------------------------------------------------------------------
    async def _stream(self, job: GenJob, chunk):
        """SSE: one event per decoded piece (``chunk(piece)``), then the final one
        (``chunk(None, finish_reason)``) and [DONE]. Same generate settings as
        ``generate_batch``, so a greedy or seeded stream says what the same request unstreamed
        says."""
        pieces = stream_generate(self.model, self.tokenizer, job, self._model_thread)
        text: list[str] = []
        async for piece in pieces:
            if not isinstance(piece, StreamEnd):
                text.append(piece)
                yield f"data: {json.dumps(chunk(piece))}\n\n"
            elif piece.error is not None:
                message = f"generation failed: {type(piece.error).__name__}"
                yield f"data: {json.dumps(APIError(500, message, 'server_error').body())}\n\n"
            else:
                yield f"data: {json.dumps(chunk(None, piece.finish))}\n\n"
        tokens = len(self.tokenizer("".join(text), add_special_tokens=False)["input_ids"])
        self.metrics.generated(tokens, 1)
        yield "data: [DONE]\n\n"

    # -- routes -------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        """Liveness, the version served and the last minute's request rate (this replica)."""
        return {
            "status": "ok",
            "model": self.model_name,
            "version": self.version,
            **self.metrics.recent(),
        }

    @api.get("/v1/models")
    def models(self, request: Request) -> dict:
        self._auth(request)
        return models_list(self.model_name, self.version, self.lineage, self.context)

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
            return StreamingResponse(
                self._stream(jobs[0], partial(completion_chunk, rid, created, body.model)),
                media_type="text/event-stream",
            )
        results = await asyncio.gather(*(self._batcher.submit(j) for j in jobs))
        choices = [(r.text, r.finish_reason) for r in results]
        return completion(rid, created, body.model, choices, usage(results))

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._auth(request)
        self._check_model(body.model)
        job = self._job(self._chat_ids(body.messages), body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream(job, partial(chat_completion_chunk, rid, created, body.model)),
                media_type="text/event-stream",
            )
        r = await self._batcher.submit(job)
        return chat_completion(rid, created, body.model, r.text, r.finish_reason, usage([r]))


def deployment_options(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split builder args into Serve deployment options and OpenAIServer's keyword arguments.

    Args:
        args: OpenAIServer's keyword arguments plus deployment options: ``num_replicas`` or
            ``autoscaling_config`` (a dict of Serve's AutoscalingConfig fields; when given,
            ``num_replicas`` is dropped: Serve refuses both), ``max_ongoing_requests``,
            ``max_surge_percent``, ``max_constructor_retry_count`` (starts of a replica that
            fails to load before the deployment fails), ``num_cpus`` and ``runtime_env``
            (never for the API key: Ray logs runtime_env env_vars; see llmflow/apikey.py).

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
    if "max_constructor_retry_count" in args:
        options["max_constructor_retry_count"] = int(args.pop("max_constructor_retry_count"))
    return options, args


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / serve configs: ``deployment_options`` says which
    args are deployment options; the rest are OpenAIServer's kwargs."""
    options, kwargs = deployment_options(args)
    return OpenAIServer.options(**options).bind(**kwargs)
