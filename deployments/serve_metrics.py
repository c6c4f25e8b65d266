"""The hf replica's serving metrics, exported by Ray's metrics agent in Prometheus format
(each node's --metrics-export-port; `llmflow up` puts the head's on LLMFLOW_METRICS_PORT,
default 8080). Ray prefixes every name with ``ray_``:

    ray_llmflow_requests_total{model, version, route, status}      requests, errors by status
    ray_llmflow_request_seconds{model, version, route}             latency (to the response's
                                                                   start: time to first byte
                                                                   for a stream)
    ray_llmflow_generated_tokens_total{model, version}             completion tokens
    ray_llmflow_batch_size{model, version}                         prompts per generate call

The served version is a label on every one of them, so a rollout shows as a new series.
``ServeMetrics.recent`` also keeps the last minute's requests in the replica, which /health
reports (``requests_per_s``): `llmflow status` shows it without a Prometheus server.
"""

import time
from collections import deque

ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions")
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]
WINDOW_S = 60.0
# The replica's ServeMetrics, set by its constructor (one replica a process): the app's
# middleware reads it here.
REPLICA: dict[str, "ServeMetrics"] = {}


def route_label(path: str, root_path: str = "") -> str:
    """One of ROUTES, or "other" (an unknown path must not make a series of its own)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :] or "/"
    return path if path in ROUTES else "other"


class ServeMetrics:
    """The metrics of one replica serving ``model`` at ``version``."""

    def __init__(self, model: str, version: str):
        from ray.util import metrics

        self.tags = {"model": model, "version": version}
        self.requests = metrics.Counter(
            "llmflow_requests",
            "Requests by route and HTTP status.",
            tag_keys=("model", "version", "route", "status"),
        )
        self.latency = metrics.Histogram(
            "llmflow_request_seconds",
            "Request latency to the response's start (a stream's first byte).",
            boundaries=LATENCY_S,
            tag_keys=("model", "version", "route"),
        )
        self.tokens = metrics.Counter(
            "llmflow_generated_tokens",
            "Completion tokens generated.",
            tag_keys=("model", "version"),
        )
        self.batch = metrics.Histogram(
            "llmflow_batch_size",
            "Prompts in one generate call.",
            boundaries=BATCH,
            tag_keys=("model", "version"),
        )
        self._recent: deque[tuple[float, bool]] = deque()

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {**self.tags, "route": route, "status": str(status)})
        self.latency.observe(seconds, {**self.tags, "route": route})
        if route != "/health":  # probes are not traffic
            now = time.monotonic()
            self._recent.append((now, status >= 500))
            self._trim(now)

    def generated(self, tokens: int, batch_size: int | None = None) -> None:
        if tokens:
            self.tokens.inc(tokens, self.tags)
        if batch_size:
            self.batch.observe(batch_size, self.tags)

    def recent(self) -> dict[str, float]:
        """Requests and server errors a second, averaged over the last minute."""
        now = time.monotonic()
        self._trim(now)
        n = len(self._recent)
        errors = sum(1 for _, e in self._recent if e)
        return {
            "requests_per_s": round(n / WINDOW_S, 3),
            "errors_per_s": round(errors / WINDOW_S, 3),
        }

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()
