"""Benchmark: the hf Serve app against the same engine without Serve, and where the time goes.

    .venv/bin/python bench/serve.py [--requests 64] [--max-tokens 16] [--max-batch-size 16]
        [--rounds 2] [--smoke] [--json out.json]

One run, the tiny model (built locally), the same greedy chat request of --max-tokens tokens
everywhere, a private local Ray (--num-cpus logical CPUs, no dashboard):
  (a) direct: the replica's own code path in this process (chat template, then
      deployments.hf_generation.generate_batch on one request) on one torch thread, as a
      replica has (Ray sets OMP_NUM_THREADS to its num_cpus: 1);
  (b) offline: the same engine batched, no Serve: generate_batch over --max-batch-size copies
      of the request on one thread, in this process: the engine's offline batched rate;
  (c) served: the app as shipped (continuous batching, --max-batch-size), over HTTP;
  (d) unbatched: the same app with max_batch_size 1;
  (e) no-op: a Serve deployment that answers a fixed JSON at once: the same client, proxy,
      router and replica hops with no work, so its latency is Serve's floor on this machine
      and its rate Serve's ceiling.
At concurrency 1, (a), (c) and (e) take turns request by request; at concurrency 32, (b), (c),
(d) and (e) take turns round by round (--rounds), so a change in the machine's load weighs on
all alike. During (c) at concurrency 32 the CPU seconds of the replica, the proxy and this
process (the client) are read from /proc, per request: the breakdown in bench/RESULTS.md.
Targets (issue 19): (c) at concurrency 32 >= 0.25x (b); (c) p50 at concurrency 1 within 5 ms of
(a). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
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
from ray import serve


def chat_body(max_tokens: int) -> dict:
    return {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Reverse this number: 90817"}],
    }


@serve.deployment(name="noop", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class NoOp:
    """Answers at once: what Serve costs a request with no work behind it."""

    async def __call__(self, request) -> dict:
        await request.body()
        return {"ok": True}


class Engine:
    """What a replica does, minus Serve: the chat template, tokenization and generate_batch."""

    def __init__(self, model_path: str, body: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True).eval()
        self.body = body

    def jobs(self, n: int):
        from deployments.hf_generation import GenJob

        ids = self.tok.apply_chat_template(
            self.body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return [GenJob(list(ids), self.body["max_tokens"], 0.0, 1.0, None) for _ in range(n)]

    def once(self) -> bool:
        from deployments.hf_generation import generate_batch

        generate_batch(self.model, self.tok, self.jobs(1))
        return True

    def offline_rate(self, batch: int, prompts: int) -> float:
        """Prompts per second, batches of ``batch``, the template and tokenization included."""
        from deployments.hf_generation import generate_batch

        t0 = time.perf_counter()
        for _ in range(max(1, prompts // batch)):
            generate_batch(self.model, self.tok, self.jobs(batch))
        return max(1, prompts // batch) * batch / (time.perf_counter() - t0)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of the benchmark's Serve replica, the ingress (the
    proxy actor, and HAProxy when it runs) and this process (the client), by role."""
    import psutil

    roles = {"replica": ("ServeReplica:bench-served",), "ingress": ("ProxyActor", "haproxy")}
    out = dict.fromkeys([*roles, "client"], 0.0)
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        t = p.info["cpu_times"]
        for role, markers in roles.items():
            if t is not None and any(m in cmd for m in markers):
                out[role] += t.user + t.system
    t = psutil.Process().cpu_times()
    out["client"] = t.user + t.system
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="Requests at concurrency 1.")
    ap.add_argument("--c32-requests", type=int, default=640, help="Requests a c=32 round.")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of the c=32 comparison.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16, help="The served app's batch size.")
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the private Ray.")
    add_ingress_option(ap)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"requests": 4, "c32_requests": 8, "rounds": 1})
    ingress_env(args.ingress)

    import httpx
    import transformers

    from deployments.openai_app import build_app
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model_path = resolve_base_model(TrainConfig())
    body = chat_body(args.max_tokens)
    engine = Engine(model_path, body)
    base = start_serve(None, args.num_cpus, None)
    apps = {
        "served": build_app(
            {"model_path": model_path, "model_name": "tiny", "max_batch_size": args.max_batch_size}
        ),
        "unbatched": build_app(
            {"model_path": model_path, "model_name": "tiny", "max_batch_size": 1}
        ),
        "no-op": NoOp.bind(),
    }
    urls = {name: f"{base}/bench-{name}/v1/chat/completions" for name in apps}
    c1: dict[str, Run] = {}
    c32: dict[str, list[float]] = {"offline": [], **{name: [] for name in apps}}
    p50_32: dict[str, list[float]] = {name: [] for name in apps}
    cpu_ms: dict[str, list[float]] = {"replica": [], "ingress": [], "client": []}
    try:
        for name, app in apps.items():
            serve.run(app, name=f"bench-{name}", route_prefix=f"/bench-{name}")
        for url in urls.values():
            drive(url, body, 8, 32)  # warm-up: connections, first generate calls
        engine.offline_rate(args.max_batch_size, 4 * args.max_batch_size)
        with httpx.Client(timeout=120) as http:
            calls = {"direct": lambda _i: engine.once()}
            calls |= {
                name: (lambda _i, u=urls[name]: http.post(u, json=body).status_code == 200)
                for name in ("served", "no-op")
            }
            one_at_a_time(calls, 5)  # warm-up
            c1 = one_at_a_time(calls, args.requests)
        for _ in range(args.rounds):
            c32["offline"].append(engine.offline_rate(args.max_batch_size, args.c32_requests))
            for name, url in urls.items():
                before = cpu_seconds()
                run = drive(url, body, 32, args.c32_requests)
                after = cpu_seconds()
                c32[name].append(run.row()["req_per_s"])
                p50_32[name].append(run.row()["p50_ms"])
                if name == "served":
                    for role, values in cpu_ms.items():
                        values.append((after[role] - before[role]) * 1e3 / run.sent)
    finally:
        end_serve(None, *(f"bench-{name}" for name in apps))

    mean = {name: statistics.fmean(v) for name, v in c32.items()}
    c1_rows = {name: run.row() for name, run in c1.items()}
    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "ingress": args.ingress,
        "c1": c1_rows,
        "c32_req_per_s": {k: [round(x, 1) for x in v] for k, v in c32.items()},
        "c32_p50_ms": p50_32,
        "offline_prompts_per_s": round(mean["offline"], 1),
        "served_c32_req_per_s": round(mean["served"], 1),
        "served_vs_offline_c32": round(mean["served"] / mean["offline"], 3),
        "batched_vs_unbatched_c32": round(mean["served"] / max(mean["unbatched"], 1e-9), 2),
        "noop_c32_req_per_s": round(mean["no-op"], 1),
        "serve_p50_overhead_ms_c1": round(
            c1_rows["served"]["p50_ms"] - c1_rows["direct"]["p50_ms"], 1
        ),
        "noop_p50_ms_c1": c1_rows["no-op"]["p50_ms"],
        "direct_p50_ms_c1": c1_rows["direct"]["p50_ms"],
        "cpu_ms_per_request_c32": {k: round(statistics.fmean(v), 2) for k, v in cpu_ms.items()},
        "generate_ms_per_prompt_offline": round(1e3 / mean["offline"], 2),
    }
    print(
        f"machine: {figures['machine']}, load average {figures['load_avg_1m_at_end']}; tiny model, "
        f"greedy chat, max_tokens {args.max_tokens}, max_batch_size {args.max_batch_size}, "
        f"ingress {args.ingress}"
    )
    for name, r in c1_rows.items():
        print(f"c=1  {name:<10} p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms")
    for name, v in c32.items():
        unit = "prompts/s" if name == "offline" else "req/s"
        print(f"c=32 {name:<10} {statistics.fmean(v):7.1f} {unit}  rounds {v}")
    print(
        f"served at c=32 / offline batched: {figures['served_vs_offline_c32']:.3f}x "
        f"(target >= 0.25x); served p50 over direct at c=1: "
        f"{figures['serve_p50_overhead_ms_c1']:+.1f} ms (target <= 5 ms; the no-op's whole "
        f"round trip: {figures['noop_p50_ms_c1']:.1f} ms)"
    )
    print(f"CPU ms a request at c=32: {figures['cpu_ms_per_request_c32']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
