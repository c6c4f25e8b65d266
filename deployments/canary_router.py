"""The canary router: the public OpenAI endpoint while a candidate is on trial, in front of
the champion's and the candidate's own Serve apps (internal route prefixes, either engine).

    (deployed by the promote stage with serve.rollout.strategy: canary; see
    llmflow/promote/canary_apps.py)

Each POST goes to one of the two by the candidate's current weight, sticky per the OpenAI
``user`` field (llmflow.promote.canary.choose); other routes (/health, /v1/models) go to the
champion until the candidate has 100%. The weight and the step id come from the deployment's
user_config, so each step is a reconfigure of the live replica, not a restart. The replica
counts each version's requests, errors (5xx, upstream failures) and latency (to the response
headers: a stream's first byte) per step; ``stats`` returns them. Streams (SSE) pass through.
"""

import json
import random
import time
from collections import deque
from typing import Any

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmflow.promote.canary import CANDIDATE, CHAMPION, choose, summarize

# Hop-by-hop and length headers are the proxy's to set again.
_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_KEEP_LATENCIES = 20_000  # per version and step: p99 over the last ones


@serve.deployment(name="llm", num_replicas=1, ray_actor_options={"num_cpus": 0})
class CanaryRouter:
    """Forwards each request to the champion or the candidate app over HTTP."""

    def __init__(self, upstreams: dict[str, str], versions: dict[str, str], timeout_s=300.0):
        self.upstreams = {role: url.rstrip("/") for role, url in upstreams.items()}
        self.versions = versions
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        self.rng = random.Random()
        self.weight, self.step = 0, None
        self._reset()

    def _reset(self) -> None:
        self.started = time.monotonic()
        self.counts = {r: {"requests": 0, "errors": 0} for r in (CHAMPION, CANDIDATE)}
        self.latencies = {r: deque(maxlen=_KEEP_LATENCIES) for r in (CHAMPION, CANDIDATE)}

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.weight = int(config.get("weight", 0))
        step = config.get("step")
        if step != self.step:  # a new step counts from zero
            self.step = step
            self._reset()

    def stats(self) -> dict[str, Any]:
        """This step's figures: weight, step id, seconds, and ``summarize`` per version."""
        return {
            "step": self.step,
            "weight": self.weight,
            "seconds": round(time.monotonic() - self.started, 2),
            "versions": self.versions,
            **{
                r: summarize(c["requests"], c["errors"], self.latencies[r])
                for r, c in self.counts.items()
            },
        }

    def _count(self, role: str, status: int, start: float) -> None:
        self.counts[role]["requests"] += 1
        self.counts[role]["errors"] += int(status >= 500)
        self.latencies[role].append(time.perf_counter() - start)

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        body = await request.body()
        counted = request.method == "POST"
        if counted:
            role = choose(self.weight, _user(body), self.rng)
        else:
            role = CANDIDATE if self.weight >= 100 else CHAMPION
        url = f"{self.upstreams[role]}{path}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        try:
            upstream = await self.client.send(
                self.client.build_request(
                    request.method, url, params=request.query_params, headers=headers, content=body
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            if counted:
                self._count(role, 502, start)
            error = {"message": f"{role} unreachable: {type(exc).__name__}", "type": "server_error"}
            return JSONResponse({"error": error}, status_code=502)
        if counted:
            self._count(role, upstream.status_code, start)
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP}
        out["x-llmflow-version"] = self.versions.get(role, "")
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                _relay(upstream), status_code=upstream.status_code, headers=out
            )
        try:  # raw bytes: the upstream's own content-encoding, if any, passes through
            content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status_code, headers=out)


async def _relay(upstream: httpx.Response):
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def _user(body: bytes) -> str | None:
    """The OpenAI ``user`` field of a JSON body, if it has one."""
    try:
        user = json.loads(body).get("user") if body else None
    except (ValueError, AttributeError):
        return None
    return user if isinstance(user, str) and user else None


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (a declarative app, so a new user_config is a reconfigure).

    Args:
        args: ``name`` (the deployment's: the plain app's ingress it takes over from,
            "llm" for hf), ``upstreams`` ({champion, candidate}: each version app's base URL),
            ``versions`` ({champion, candidate}: version ids), ``max_surge_percent`` (the
            rolling update between the plain app and the router), ``timeout_s``,
            ``user_config`` ({weight, step}; the promote stage sets it per step instead).
    """
    args = dict(args)
    options: dict[str, Any] = {
        "name": str(args.pop("name", "llm")),  # the ingress deployment's name it replaces
        "max_ongoing_requests": int(args.pop("max_ongoing_requests", 1000)),
    }
    if "max_surge_percent" in args:
        options["max_surge_percent"] = int(args.pop("max_surge_percent"))
    if "user_config" in args:  # the first weight, for `serve run` (the promote stage sets it)
        options["user_config"] = dict(args.pop("user_config"))
    return CanaryRouter.options(**options).bind(**args)
