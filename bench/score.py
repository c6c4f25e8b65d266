"""Benchmark: Ray Data batch scoring (hf engine) against one-at-a-time and local batched generate.

    .venv/bin/python bench/score.py [--prompts 5000] [--naive 200] [--batch-size 64]
        [--concurrency 1] [--cpus-per-actor 2] [--threads 2] [--max-new-tokens 16]

Same tiny model, same prompts (the bundled task's generator), same max_new_tokens, one run:
  (a) naive: one prompt per generate call, in this process (on the first --naive prompts);
  (b) local: batched generate in this process, no Ray: the local limit;
  (c) ray:   tasks.scoring.generate_predictions, the scoring job itself (read parquet ->
             split_chat -> HFGenerator actor pool -> score_row), wall time including the
             actors' start-up.
Ray is a local instance (num_cpus=2, no dashboard) unless LLMFLOW_RAY_ADDRESS is set.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prompt_batch(rows: list[dict]):
    import numpy as np

    chats = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        chats[i] = r["prompt_messages"]
    return {"id": np.array([r["id"] for r in rows]), "prompt_messages": chats}


def run_local(gen, rows: list[dict], batch_size: int) -> tuple[float, int]:
    """Seconds and generated tokens of ``gen`` over ``rows`` in batches, in this process."""
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(rows), batch_size):
        out = gen(prompt_batch(rows[start : start + batch_size]))
        tokens += int(out["num_generated_tokens"].sum())
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5000)
    ap.add_argument("--naive", type=int, default=200, help="Prompts for the one-at-a-time run.")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1, help="Scoring actors.")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="Torch threads per actor.")
    ap.add_argument("--local-threads", type=int, default=2, help="Torch threads of (a), (b).")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args()

    import ray
    import torch
    import transformers

    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import generate_examples
    from llmflow.config import EvalConfig, TrainConfig
    from llmflow.engines.hf import HFGenerator
    from llmflow.store import Store
    from tasks.prepare import _parquet_bytes
    from tasks.scoring import generate_predictions, split_chat

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="llmflow-bench-score-")
    store = Store(tmp)
    model = resolve_base_model(TrainConfig(), store)
    examples = generate_examples(args.prompts, seed=1)
    prepared = [
        {"id": f"p{i:05d}", "messages": r["messages"], "n_chars": 0, "n_tokens": 0}
        for i, r in enumerate(examples)
    ]
    store.write_bytes(_parquet_bytes(prepared), "datasets", "bench", "eval.parquet")
    dataset_uri = store.uri("datasets", "bench")
    rows = [split_chat(r) for r in prepared]
    cfg = EvalConfig(
        engine="hf",
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
    )

    torch.set_num_threads(args.local_threads)
    gen = HFGenerator(model, max_new_tokens=args.max_new_tokens, torch_threads=args.local_threads)
    run_local(gen, rows[:64], args.batch_size)  # warm-up
    figures: dict[str, float | str] = {}
    if not args.skip_naive:
        naive_s, _ = run_local(gen, rows[: args.naive], 1)
        figures["naive_examples_per_s"] = args.naive / naive_s
    local_s, local_tokens = run_local(gen, rows, args.batch_size)
    figures["local_examples_per_s"] = len(rows) / local_s
    figures["local_tokens_per_s"] = local_tokens / local_s
    del gen

    address = os.environ.get("LLMFLOW_RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": a fresh instance, never whichever cluster started last on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        options = {"num_cpus": args.cpus_per_actor, "torch_threads": args.threads}
        out, _, ray_s = generate_predictions(cfg, model, dataset_uri, engine_options=options)
    finally:
        ray.shutdown()
    assert len(out) == len(rows)
    ray_tokens = sum(int(r["num_generated_tokens"]) for r in out)
    figures["ray_examples_per_s"] = len(out) / ray_s
    figures["ray_tokens_per_s"] = ray_tokens / ray_s
    figures["ray_wall_s"] = ray_s
    # Seconds spent inside generate, summed over batches: the rest is start-up and Ray Data.
    figures["ray_generate_s"] = sum({r["batch_id"]: r["latency_s"] for r in out}.values())
    figures["local_wall_s"] = local_s

    figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
    figures.update(
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        prompts=len(rows),
        naive_prompts=0 if args.skip_naive else args.naive,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"machine: {figures['machine']}; {len(rows)} prompts, max_new_tokens {args.max_new_tokens}")
    if "naive_examples_per_s" in figures:
        print(f"(a) naive, one prompt a call ({args.naive} prompts): {figures['naive_examples_per_s']} ex/s")
    print(f"(b) local batched generate (batch {args.batch_size}, no Ray): "
          f"{figures['local_examples_per_s']} ex/s ({local_s:.1f} s)")  # fmt: skip
    print(f"(c) Ray Data scoring job ({args.concurrency} actor(s) x {args.threads} threads, "
          f"batch {args.batch_size}): {figures['ray_examples_per_s']} ex/s ({ray_s:.1f} s, "
          f"start-up included; {figures['ray_generate_s']} s in generate)")  # fmt: skip
    if "naive_examples_per_s" in figures:
        figures["ray_vs_naive"] = round(figures["ray_examples_per_s"] / figures["naive_examples_per_s"], 2)
        print(f"ray vs naive: {figures['ray_vs_naive']}x (target >= 10x)")
    figures["ray_vs_local"] = round(figures["ray_examples_per_s"] / figures["local_examples_per_s"], 2)
    print(f"ray vs local batched: {figures['ray_vs_local']}x (target >= 0.7x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
