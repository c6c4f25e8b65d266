"""The vllm app's OpenAI ingress: ray.serve.llm's, plus what llmflow's hf app also serves.

Imported only in the vLLM engine environment (it needs ray.serve.llm, hence vllm): the
declarative Serve application of deployments/vllm_app.py names it. On top of ray.serve.llm's
`OpenAiIngress` (completions, chat, streaming, /v1/models) it adds the served version and
lineage to /v1/models, a /health that names the version (the promote stage's rollback reads
it), the bearer API key (serve.api_key_env / api_key_file; llmflow.apikey.bearer_problem), and
the `name:version` model alias.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import (
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from llmflow.apikey import bearer_problem, resolve_api_key


class LlmflowIngress(OpenAiIngress):
    """ray.serve.llm's ingress for one model version, with llmflow's version, lineage and key."""

    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        version: str = "",
        lineage: dict[str, Any] | None = None,
        api_key_env: str | None = None,
        api_key_file: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._model_name = next(iter(model_cards))
        self._version, self._lineage = version, dict(lineage or {})
        # Read in the replica: only the variable's name or the file's path travelled.
        self._api_key = resolve_api_key(api_key_env, api_key_file)

    async def _get_response(self, *, body, **kwargs: Any):
        if getattr(body, "model", None) == f"{self._model_name}:{self._version}":
            # The hf app's version alias; to Ray ':' means a LoRA adapter, to vLLM an unknown
            # model, so the request goes on under the model's own name.
            body = body.model_copy(update={"model": self._model_name})
        async for response in super()._get_response(body=body, **kwargs):
            yield response

    async def _get_model_id(self, model: str | None) -> str:
        try:
            return await super()._get_model_id(model)
        except HTTPException as exc:  # FastAPI's {"detail"} shape: answer in OpenAI's
            raise OpenAIHTTPException(
                status_code=exc.status_code,
                message=str(exc.detail),
                type="NotFoundError" if exc.status_code == 404 else "BadRequestError",
            ) from exc

    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self._model_name, "version": self._version}

    async def models(self) -> dict[str, Any]:
        listing = (await super().models()).model_dump()
        for card in listing["data"]:
            if card["id"] == self._model_name:
                card.update(version=self._version, lineage=self._lineage)
        return listing


# /health besides ray.serve.llm's routes; /v1/models without its response_model, which
# would drop the version and lineage.
ENDPOINTS = {
    **DEFAULT_ENDPOINTS,
    "models": lambda app: app.get("/v1/models"),
    "health": lambda app: app.get("/health"),
}


def _with_key_check(app, api_key_env: str | None, api_key_file: str | None):
    """The bearer check on /v1/ routes, in OpenAI's error shape (as the hf app answers). The
    key is read in the replica, once (LlmflowIngress reads it at start-up too, so a missing
    key fails the deployment rather than a request)."""
    cache: list[str | None] = []

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if not cache:
            cache.append(resolve_api_key(api_key_env, api_key_file))
        key = cache[0]
        if key and "/v1/" in request.url.path:
            problem = bearer_problem(request.headers.get("authorization", ""), key)
            if problem:
                return _unauthorized(*problem)
        return await call_next(request)

    return app


def _unauthorized(code: str, message: str) -> JSONResponse:
    return JSONResponse(
        status_code=401,
        content={
            "error": {
                "message": message,
                "type": "authentication_error",
                "param": None,
                "code": code,
            }
        },
    )


def build(config: dict[str, Any], args: dict[str, Any]) -> serve.Application:
    """The application: one LLMServer deployment (the vLLM engine) behind LlmflowIngress."""
    llm = LLMConfig(**config)
    server = build_llm_deployment(llm)
    app = _with_key_check(init(), args.get("api_key_env"), args.get("api_key_file"))
    ingress = make_fastapi_ingress(LlmflowIngress, endpoint_map=ENDPOINTS, app=app)
    options = OpenAiIngress.get_deployment_options([llm])
    # A router that awaits the engine's replicas: no CPU of its own (as ray.serve.llm's own
    # LLMRouter), so a rolling update's surge replica of the engine can be placed on a
    # small cluster (measured: with 1 CPU a replica it waited forever on 4 logical CPUs).
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        version=str(args.get("version") or ""),
        lineage=args.get("lineage") or {},
        api_key_env=args.get("api_key_env"),
        api_key_file=args.get("api_key_file"),
    )
