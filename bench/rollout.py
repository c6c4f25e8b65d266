"""Benchmark: failed requests and latency during a rolling update of the Serve app under load.

    .venv/bin/python bench/rollout.py [--clients 4] [--before 10] [--after 10]
        [--max-surge-percent 100] [--address ADDR --serve-url URL] [--smoke] [--json out.json]

Serves version A of the tiny model with llmflow.promote.rollout.deploy (what the promote stage runs),
puts --clients clients on it, each looping greedy chat requests back to back, then rolls the
app in place to version B with the same deploy and keeps the load on --after seconds more.
A poller reads /health every 0.2 s to see when B starts answering. --max-surge-percent 0
(Serve's own default) shows what the config's 100 avoids: the old replica stops before the
new one has loaded, and requests wait meanwhile. Prints requests sent
and failed, p50/p99 before, during and after the rollout, and how long the rollout took.
Target (issue 6): zero failed requests. Ray is a private local instance (--num-cpus, no
dashboard) unless --address names one whose Serve answers at --serve-url. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serving import Run, end_serve, start_serve
from _smoke import parse_with_smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4, help="Concurrent clients looping requests.")
    ap.add_argument("--before", type=float, default=10, help="Seconds of load before the rollout.")
    ap.add_argument("--after", type=float, default=10, help="Seconds of load after it.")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument(
        "--max-surge-percent", type=int, help="serve.max_surge_percent (default: the config's)"
    )
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the private Ray.")
    ap.add_argument("--address", help="Use this Ray cluster instead of a private one.")
    ap.add_argument("--serve-url", help="Its Serve HTTP address (with --address).")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"before": 1.0, "after": 1.0})

    import httpx

    from llmflow.basemodels import resolve_base_model
    from llmflow.config import ServeConfig, TrainConfig
    from llmflow.promote.rollout import deploy
    from llmflow.refs import ModelRef

    path = resolve_base_model(TrainConfig())
    cfg = ServeConfig(app_name="bench-rollout", route_prefix="/bench-rollout", engine="hf")
    if args.max_surge_percent is not None:
        cfg.max_surge_percent = args.max_surge_percent
    a, b = (ModelRef(uri=path, name="tiny", version=v, base_model="tiny") for v in ("A", "B"))
    base = start_serve(args.address, args.num_cpus, args.serve_url)
    url = f"{base}/bench-rollout"
    body = {
        "model": "tiny",
        "max_tokens": args.max_tokens,
        "messages": [{"role": "user", "content": "Reverse this number: 4321"}],
    }
    sent: list[tuple[float, float, bool]] = []  # (sent at, latency s, answered 200)
    versions: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = http.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                sent.append((t0, time.perf_counter() - t0, ok))

    def poll_health() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.get(f"{url}/health")
                    version = r.json().get("version") if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    version = None
                versions.append((time.perf_counter(), version))
                time.sleep(0.2)

    try:
        deploy(cfg, a)
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        threads.append(threading.Thread(target=poll_health))
        for t in threads:
            t.start()
        time.sleep(args.before)
        start = time.perf_counter()
        deploy(cfg, b)  # returns once the app is RUNNING on B
        end = time.perf_counter()
        time.sleep(args.after)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        end_serve(args.address, cfg.app_name)

    phases = {"before": Run(), "during": Run(), "after": Run()}
    for t0, latency, ok in sent:
        run = phases["before" if t0 < start else "during" if t0 <= end else "after"]
        if ok:
            run.latencies.append(latency)
        else:
            run.failures += 1
    # Each phase's wall time is its length: requests/s is what the clients got in it.
    phases["before"].wall_s = start - min(t for t, _, _ in sent)
    phases["during"].wall_s = end - start
    phases["after"].wall_s = args.after
    first_b = next((t - start for t, v in versions if v == "B"), None)
    last_a = max((t - start for t, v in versions if v == "A"), default=None)
    health_gaps = sum(1 for _, v in versions if v is None)
    rows = {name: run.row() for name, run in phases.items()}
    total = sum(r["requests"] for r in rows.values())
    failed = sum(r["failures"] for r in rows.values())
    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "max_surge_percent": cfg.max_surge_percent,
        "phases": rows,
        "requests": total,
        "failed": failed,
        "rollout_s": round(end - start, 2),
        "health_first_B_s": None if first_b is None else round(first_b, 2),
        "health_last_A_s": None if last_a is None else round(last_a, 2),
        "health_without_answer": health_gaps,
    }
    print(
        f"machine: {figures['machine']}; tiny model, {args.clients} clients looping greedy chat "
        f"requests (max_tokens {args.max_tokens}); in-place rollout A -> B with llmflow.promote.rollout.deploy, "
        f"max_surge_percent {cfg.max_surge_percent}"
    )
    print(f"{'phase':<8} {'requests':>8} {'failed':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows.items():
        print(
            f"{name:<8} {r['requests']:>8} {r['failures']:>7} {r['req_per_s']:>7.1f} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
        )
    print(
        f"rollout (deploy B until RUNNING): {end - start:.1f} s; /health first answered B at "
        f"{figures['health_first_B_s']} s, last answered A at {figures['health_last_A_s']} s "
        f"(from the rollout's start); /health unanswered {health_gaps} times"
    )
    print(f"failed requests: {failed} of {total} (target 0)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
