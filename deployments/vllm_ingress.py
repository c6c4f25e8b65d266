"""The vllm app's OpenAI ingress: ray.serve.llm's, plus what llmflow's hf app also serves.

Imported only in the vLLM engine environment (it needs ray.serve.llm, hence vllm): the
declarative Serve application of deployments/vllm_app.py names it. On top of ray.serve.llm's
`OpenAiIngress` (completions, chat, streaming, /v1/models) it adds the served version and
lineage to /v1/models, a /health that names the version (the promote stage's rollback reads
it), the bearer API key (serve.api_key_env / api_key_file; llmflow.apikey.bearer_problem), and
the `name:version` model alias.

Two guards make the canary's switches of the public app lossless (llmflow/promote/canary_apps.py):
a replica is ready only once its engine is (so the router answers until the new public app
can), and a replica whose engine deployment was deleted under it (the public app became the
canary router; Serve removes the engine at once, the old ingress answers until the router's
replica is ready) hands its requests to the same version's engine in the internal champion
app, which the canary deployed before the switch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import (
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from llmflow.apikey import bearer_problem, resolve_api_key
from llmflow.promote.canary import CHAMPION, internal_app

log = logging.getLogger("ray.serve")
ENGINE_CHECK_S = 1.0  # a request waiting this long for the engine asks whether it still exists
_HANDED_OVER, _END = object(), object()


class WeightsInPlace(CallbackBase):
    """The engine reads its weights where they are (a path of the store, on the replica's
    node): no node initialization. ray.serve.llm otherwise runs a download task on the
    replica's node before each engine start, a fresh worker process of the engine
    environment importing vLLM, that for a path mirrors nothing (measured: 10.6 s of a 49 s
    replica start on 2 cores). deployments/vllm_app.py names it for local paths on one node;
    bucket URIs keep the task, which mirrors the weights."""

    async def on_before_node_init(self) -> None:
        # What the skipped task did besides downloading: a workaround for torch, which cannot
        # create its kernels cache when the hub directory is missing.
        import torch

        os.makedirs(os.path.join(os.path.dirname(torch.hub.get_dir()), "kernels"), exist_ok=True)
        self.ctx.run_init_node = False


class LlmflowIngress(OpenAiIngress):
    """ray.serve.llm's ingress for one model version, with llmflow's version, lineage and key."""

    async def __init__(
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
        self._app_name = serve.get_replica_context().app_name
        # The app whose engine this replica calls: its own, or after a hand-over the champion's.
        self._engine_app = self._app_name
        self._checked_at, self._engine_gone = 0.0, False
        self._hand_over_lock = asyncio.Lock()
        # Ready when the engine is: in a rolling update of the public app (a canary's last
        # switch) the old replicas answer until then, instead of requests queueing here for
        # the engine's start.
        for handle in self._default_serve_handles.values():
            await handle.check_health.remote()

    async def _get_response(self, *, body, **kwargs: Any):
        if getattr(body, "model", None) == f"{self._model_name}:{self._version}":
            # The hf app's version alias; to Ray ':' means a LoRA adapter, to vLLM an unknown
            # model, so the request goes on under the model's own name.
            body = body.model_copy(update={"model": self._model_name})
        engine_app = self._engine_app
        attempt = super()._get_response(body=body, **kwargs).__aiter__()
        first = await self._first(attempt, engine_app)
        if first is _HANDED_OVER:  # the engine went while this request waited for it
            attempt = super()._get_response(body=body, **kwargs).__aiter__()
            first = await self._first(attempt, self._engine_app)
        if first is _END:
            return
        yield first
        async for response in attempt:
            yield response

    async def _first(self, attempt, engine_app: str):
        """The first response of ``attempt`` (sent to ``engine_app``'s engine), or
        _HANDED_OVER when that engine was deleted while it waited (the canary's first switch)
        and its own version's champion app took over, here or for another request: the
        request must be sent again. _END for an empty stream."""
        step = asyncio.ensure_future(attempt.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=ENGINE_CHECK_S)
                if done:
                    break
                if self._engine_app != engine_app or (
                    await self._engine_deleted() and await self._hand_over()
                ):
                    return _HANDED_OVER
            return step.result()
        except StopAsyncIteration:
            return _END
        except DeploymentUnavailableError:
            if self._engine_app != engine_app or await self._hand_over():
                return _HANDED_OVER
            raise
        finally:
            if not step.done():
                step.cancel()

    async def _engine_deleted(self) -> bool:
        """Whether the engine's app no longer has the engine deployment (asked of the
        controller at most once every ENGINE_CHECK_S per replica, only while a request waits)."""
        now = time.monotonic()
        if now - self._checked_at >= ENGINE_CHECK_S:
            self._checked_at = now
            status = await asyncio.get_running_loop().run_in_executor(None, serve.status)
            app = status.applications.get(self._engine_app)
            names = set(app.deployments) if app else set()
            self._engine_gone = any(
                h.deployment_name not in names for h in self._default_serve_handles.values()
            )
        return self._engine_gone

    async def _hand_over(self) -> bool:
        """Point this replica at the engine of its own version's internal champion app, if
        there is one: this app's engine was deleted (the public app is becoming the canary
        router) while this replica still answers. Once only: False after that."""
        app = internal_app(self._app_name, CHAMPION)
        async with self._hand_over_lock:  # one hand-over, however many requests wait
            if self._engine_app == app:
                return False
            try:
                health = await serve.get_app_handle(app).health.remote()
            except Exception:  # noqa: BLE001 - no such app, or not answering: none to hand to
                return False
            if health.get("version") != self._version:
                return False
            for model_id, handle in list(self._default_serve_handles.items()):
                self._default_serve_handles[model_id] = serve.get_deployment_handle(
                    handle.deployment_name, app_name=app
                )
            self._configured_serve_handles.clear()
            self._engine_app, self._checked_at, self._engine_gone = app, 0.0, False
        log.info("engine of app '%s' gone: requests go to '%s'", self._app_name, app)
        return True

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
    # The engine's surge holds for the ingress too: in a switch of the public app (the
    # canary router <-> this app, one deployment name) the old replica answers until this
    # one is ready, that is until its engine is. Without it Serve stopped the router first
    # and requests queued in the proxy for the whole engine start (measured: 2 of 2307
    # requests waited past a client's 60 s on 2 cores).
    surge = (config.get("deployment_config") or {}).get("max_surge_percent")
    if surge is not None:
        options["max_surge_percent"] = int(surge)
    return serve.deployment(ingress, **options).bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        version=str(args.get("version") or ""),
        lineage=args.get("lineage") or {},
        api_key_env=args.get("api_key_env"),
        api_key_file=args.get("api_key_file"),
    )
