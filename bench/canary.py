"""Benchmark: what the canary router (deployments/canary_router.py) adds to a request.

    .venv/bin/python bench/canary.py [--requests 64] [--max-tokens 16] [--smoke] [--json out.json]

One private Ray (--num-cpus, Serve on a free port), the tiny model (built locally) as one hf
app at an internal prefix, and the router as a second app in front of it (both of its
upstreams are that app, weight 50, so every request takes the router's whole path: body
parse, sticky choice, forward, count). Greedy chat requests, half of them naming an OpenAI
``user``. At concurrency 1, direct and routed requests take turns request by request (a
change in the machine's load weighs on both alike); then each alone at concurrency 32.
Prints p50/p99 and requests/s side by side and the router's added p50; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serving import (
    Run,
    add_ingress_option,
    drive,
    end_serve,
    ingress_env,
    one_at_a_time,
    start_serve,
)
from _smoke import parse_with_smoke


def bodies(max_tokens: int) -> list[dict]:
    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Reverse this number: 90817"}],
    }
    return [body, body | {"user": "bench-user-7"}]


def interleaved(urls: dict[str, str], body_list: list[dict], requests: int) -> dict[str, Run]:
    """Concurrency 1, the settings taking turns request by request."""
    import httpx

    with httpx.Client(timeout=120) as http:
        calls = {
            name: (lambda i, u=url: http.post(u, json=body_list[i % 2]).status_code == 200)
            for name, url in urls.items()
        }
        return one_at_a_time(calls, requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="Requests a setting and concurrency.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the private Ray.")
    add_ingress_option(ap)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"requests": 4})
    ingress_env(args.ingress)

    from ray import serve

    from deployments.canary_router import build_app as build_router
    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    model_path = resolve_base_model(TrainConfig())
    body_list = bodies(args.max_tokens)
    base = start_serve(None, args.num_cpus, None)
    internal = f"{base}/_llmflow/bench/1"
    urls = {
        "direct": f"{internal}/v1/chat/completions",
        "router": f"{base}/bench/v1/chat/completions",
    }
    rows: list[dict] = []
    try:
        serve.run(
            build_app({"model_path": model_path, "model_name": "tiny", "version": "1"}),
            name="bench-version",
            route_prefix="/_llmflow/bench/1",
        )
        router = build_router(
            {
                "upstreams": {"champion": internal, "candidate": internal},
                "versions": {"champion": "1", "candidate": "1"},
                "user_config": {"weight": 50, "step": "bench"},
            }
        )
        serve.run(router, name="bench-router", route_prefix="/bench")
        for url in urls.values():
            drive(url, body_list[0], 8, 16)  # warm-up: connections, first generate calls
        interleaved(urls, body_list, 5)
        for name, run in interleaved(urls, body_list, args.requests).items():
            rows.append({"setting": name, "concurrency": 1} | run.row())
        for name, url in urls.items():
            run = drive(url, body_list[1], 32, args.requests)
            rows.append({"setting": name, "concurrency": 32} | run.row())
    finally:
        end_serve(None, "bench-router", "bench-version")

    def cell(setting: str, c: int) -> dict:
        return next(r for r in rows if r["setting"] == setting and r["concurrency"] == c)

    figures = {
        "ingress": args.ingress,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "requests_per_cell": args.requests,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "router_p50_added_ms_c1": round(
            cell("router", 1)["p50_ms"] - cell("direct", 1)["p50_ms"], 1
        ),
        "router_p50_added_ms_c32": round(
            cell("router", 32)["p50_ms"] - cell("direct", 32)["p50_ms"], 1
        ),
        "router_req_per_s_ratio_c32": round(
            cell("router", 32)["req_per_s"] / max(cell("direct", 32)["req_per_s"], 1e-9), 2
        ),
    }
    print(
        f"machine: {figures['machine']}, load average {figures['load_avg_1m_at_end']}; tiny model, "
        f"greedy chat, max_tokens {args.max_tokens}, {args.requests} requests a cell"
    )
    print(f"{'setting':<8} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failures':>8}")
    for r in rows:
        print(
            f"{r['setting']:<8} {r['concurrency']:>4} {r['req_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['failures']:>8}"
        )
    print(
        f"router adds {figures['router_p50_added_ms_c1']:+.1f} ms p50 at concurrency 1, "
        f"{figures['router_p50_added_ms_c32']:+.1f} ms at 32; requests/s at 32: "
        f"{figures['router_req_per_s_ratio_c32']:.2f}x of direct"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
