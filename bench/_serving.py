"""Shared parts of the serving benchmarks: a Ray with Serve to deploy on, and timed requests."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all held open at once, since the kernel may hand
    out a port again as soon as its socket is closed."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def ingress_env(ingress: str) -> None:
    """Ray's switches for ``ingress``, as the local stack sets them, before the private Ray
    starts: HAProxy's files in a temporary directory and its stats and metrics on free ports
    (a running stack holds the default ports, or the LLMFLOW_HAPROXY_* ones in its env)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from llmflow.settings import StackSettings

    stats, metrics = free_ports(2)
    s = dataclasses.replace(
        StackSettings.from_env(),
        home=Path(tempfile.mkdtemp()),
        serve_ingress=ingress,
        haproxy_stats_port=stats,
        haproxy_metrics_port=metrics,
    )
    os.environ.update(s.serve_ingress_env())


def add_ingress_option(ap) -> None:
    ap.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="haproxy",
        help="Serve's HTTP ingress, as the local stack's LLMFLOW_SERVE_INGRESS (default haproxy).",
    )


def _serving_at(url: str) -> str:
    """``url`` as where llmflow's rollouts find this Serve (LLMFLOW_SERVE_URL): a deploy waits
    until its ingress routes the app, and the smoke test asks it."""
    os.environ["LLMFLOW_SERVE_URL"] = url.rstrip("/")
    return url.rstrip("/")


def start_serve(address: str | None, num_cpus: int, serve_url: str | None) -> str:
    """Connect to the Ray at ``address`` (its Serve answers at ``serve_url``), or start a
    private one ("local": never whichever cluster started last on this machine) with Serve
    on a free port. Returns the Serve HTTP base URL."""
    import ray
    from ray import serve

    if address:
        from llmflow.cluster import ray_init_kwargs
        from llmflow.config import ClusterConfig
        from llmflow.settings import StackSettings

        # Replicas still write their access logs (a cost measured here), just not to stdout.
        ray.init(address, **(ray_init_kwargs(ClusterConfig()) | {"log_to_driver": False}))
        return _serving_at(
            serve_url or os.environ.get("LLMFLOW_SERVE_URL") or StackSettings.from_env().serve_url
        )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    # Picked after ray.init, whose processes take ephemeral ports too; one retry on a clash.
    for attempt in range(2):
        [port] = free_ports(1)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return _serving_at(f"http://127.0.0.1:{port}")
        except RuntimeError:
            serve.shutdown()
            if attempt:
                raise
    raise AssertionError("unreachable")


def end_serve(address: str | None, *apps: str) -> None:
    """Leave the cluster as found: on one of someone else's (``address``) this script's apps
    go; a private one ends whole with ray.shutdown (a serve.delete first waits ~4 s an app)."""
    import ray
    from ray import serve

    if address:
        for app in apps:
            serve.delete(app)
    ray.shutdown()


@dataclass
class Run:
    """Requests of one timed run: latencies (s) of the answered ones, failures, wall time."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    wall_s: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.latencies) + self.failures

    def row(self) -> dict[str, float]:
        from llmflow.evaluate.scoring import percentile

        return {
            "requests": self.sent,
            "req_per_s": round(len(self.latencies) / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_ms": round(percentile(self.latencies, 50, "inverted_cdf") * 1e3, 1),
            "p99_ms": round(percentile(self.latencies, 99, "inverted_cdf") * 1e3, 1),
            "failures": self.failures,
        }


def one_at_a_time(calls: dict, requests: int) -> dict[str, Run]:
    """Concurrency 1 for each of ``calls`` (name -> call of the request's index, returning
    success), taking turns request by request, so a change in the machine's load weighs on
    all alike."""
    runs = {name: Run() for name in calls}
    for i in range(requests):
        for name, call in calls.items():
            t0 = time.perf_counter()
            try:
                ok = call(i)
            except Exception:  # noqa: BLE001 - a failed request, counted
                ok = False
            if ok:
                runs[name].latencies.append(time.perf_counter() - t0)
            else:
                runs[name].failures += 1
    for run in runs.values():
        run.wall_s = sum(run.latencies)  # one request at a time: the time spent on them
    return runs


def drive(url: str, body: dict, concurrency: int, requests: int) -> Run:
    """POST ``body`` to ``url`` ``requests`` times from ``concurrency`` clients at once.

    aiohttp, not httpx: the client shares the machine's cores with the server it measures,
    and aiohttp costs less CPU a request (measured: a no-op Serve app answered 313 req/s to
    aiohttp and 246 req/s to httpx at concurrency 32 on 2 cores)."""
    import asyncio

    import aiohttp

    async def main() -> Run:
        run = Run()
        left = iter(range(requests))
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:

            async def worker() -> None:
                for _ in left:
                    t0 = time.perf_counter()
                    try:
                        async with client.post(url, json=body) as r:
                            await r.read()
                            ok = r.status == 200
                    except (TimeoutError, aiohttp.ClientError):
                        ok = False
                    if ok:
                        run.latencies.append(time.perf_counter() - t0)
                    else:
                        run.failures += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            run.wall_s = time.perf_counter() - t0
        return run

    return asyncio.run(main())
