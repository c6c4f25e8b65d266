"""Benchmark: the hf Serve app's requests/s and latency, with and without dynamic batching,
and Serve's overhead against calling the engine directly.

    .venv/bin/python bench/serve.py [--requests 64] [--max-tokens 16] [--max-batch-size 16]
        [--address ADDR --serve-url URL] [--json out.json]

One run, the tiny model (built locally), greedy chat requests of --max-tokens tokens:
  (a) direct: the replica's own code path in this process (chat template, then
      deployments.hf_generation.generate_batch on one request), on as many torch threads as a
      replica has (Ray sets OMP_NUM_THREADS to its num_cpus: 1);
  (b) batched: the app as shipped (@serve.batch, --max-batch-size), over HTTP;
  (c) unbatched: the same app with max_batch_size 1, over HTTP.
At concurrency 1, (a), (b) and (c) take turns request by request, so a change in the
machine's load (other work may share its cores) weighs on all three alike; then (b) and (c)
at concurrency 8 and 32. Ray is a private local instance (--num-cpus, no dashboard) unless
--address names one whose Serve answers at --serve-url. Targets (issue 6): batched >= 4x
unbatched requests/s at concurrency 32; Serve adds <= 5 ms at p50 over (a) at concurrency 1.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serving import Run, drive, start_serve

DIRECT = "direct (no Serve)"


def chat_body(max_tokens: int) -> dict:
    return {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Reverse this number: 90817"}],
    }


def direct_call(model_path: str, body: dict, threads: int):
    """What a replica does for one request, minus Serve (template, tokenize, generate), as a
    function of no arguments."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.hf_generation import GenJob, generate_batch

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True).eval()

    def once() -> bool:
        ids = tok.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        generate_batch(model, tok, [GenJob(list(ids), body["max_tokens"], 0.0, 1.0, None)])
        return True

    return once


def one_at_a_time(calls: dict, requests: int) -> dict[str, Run]:
    """Concurrency 1 for each of ``calls`` (name -> call returning success), interleaved."""
    runs = {name: Run() for name in calls}
    for _ in range(requests):
        for name, call in calls.items():
            t0 = time.perf_counter()
            try:
                ok = call()
            except Exception:  # noqa: BLE001 - a failed request, counted
                ok = False
            if ok:
                runs[name].latencies.append(time.perf_counter() - t0)
            else:
                runs[name].failures += 1
    for run in runs.values():
        run.wall_s = sum(run.latencies)  # one request at a time: the time spent on them
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="Requests a setting and concurrency.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16, help="The batched app's batch size.")
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the private Ray.")
    ap.add_argument("--address", help="Use this Ray cluster instead of a private one.")
    ap.add_argument("--serve-url", help="Its Serve HTTP address (with --address).")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args()

    import httpx
    import ray
    import transformers
    from ray import serve

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model_path = resolve_base_model(TrainConfig())
    body = chat_body(args.max_tokens)
    direct = direct_call(model_path, body, threads=1)
    base = start_serve(args.address, args.num_cpus, args.serve_url)
    apps = {"batched": args.max_batch_size, "unbatched": 1}
    urls = {name: f"{base}/bench-{name}/v1/chat/completions" for name in apps}
    rows: list[dict] = []
    try:
        for name, batch in apps.items():
            app = build_app(
                {"model_path": model_path, "model_name": "tiny", "max_batch_size": batch}
            )
            serve.run(app, name=f"bench-{name}", route_prefix=f"/bench-{name}")
        for url in urls.values():
            drive(url, body, 8, 16)  # warm-up: connections, first generate calls
        with httpx.Client(timeout=120) as http:
            calls = {DIRECT: direct}
            calls |= {
                name: (lambda u=url: http.post(u, json=body).status_code == 200)
                for name, url in urls.items()
            }
            one_at_a_time(calls, 5)  # warm-up
            for name, run in one_at_a_time(calls, args.requests).items():
                rows.append({"setting": name, "concurrency": 1} | run.row())
        for name, url in urls.items():
            for c in (8, 32):
                rows.append(
                    {"setting": name, "concurrency": c} | drive(url, body, c, args.requests).row()
                )
    finally:
        for name in apps:
            serve.delete(f"bench-{name}")
        ray.shutdown()
    rows.sort(key=lambda r: ([DIRECT, *apps].index(r["setting"]), r["concurrency"]))

    def cell(setting: str, c: int) -> dict:
        return next(r for r in rows if r["setting"] == setting and r["concurrency"] == c)

    speedup = cell("batched", 32)["req_per_s"] / max(cell("unbatched", 32)["req_per_s"], 1e-9)
    overhead = cell("unbatched", 1)["p50_ms"] - cell(DIRECT, 1)["p50_ms"]
    overhead_batched = cell("batched", 1)["p50_ms"] - cell(DIRECT, 1)["p50_ms"]
    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "requests_per_cell": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "rows": rows,
        "batched_vs_unbatched_c32": round(speedup, 2),
        "serve_p50_overhead_ms_c1": round(overhead, 1),
        "serve_p50_overhead_ms_c1_batched": round(overhead_batched, 1),
    }
    print(
        f"machine: {figures['machine']}, load average {figures['load_avg_1m_at_end']}; tiny model, "
        f"greedy chat, max_tokens {args.max_tokens}, {args.requests} requests a cell"
    )
    print(f"{'setting':<18} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failures':>8}")
    for r in rows:
        print(
            f"{r['setting']:<18} {r['concurrency']:>4} {r['req_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['failures']:>8}"
        )
    print(
        f"dynamic batching (max_batch_size {args.max_batch_size}) vs unbatched at concurrency 32: "
        f"{speedup:.2f}x requests/s (target >= 4x)"
    )
    print(
        f"Serve p50 overhead over the direct call at concurrency 1: {overhead:+.1f} ms unbatched "
        f"(target <= 5 ms); {overhead_batched:+.1f} ms batched (includes the batch wait)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
