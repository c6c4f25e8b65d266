"""Benchmark: Ray Data batch scoring (hf engine) against one-at-a-time and local batched generate.

    .venv/bin/python bench/score.py [--prompts 5000] [--naive 200] [--config configs/tiny.yaml]
        [--set eval.batch_size=64 ...] [--local-threads 1,2] [--skip-naive] [--smoke] [--json out.json]

Same tiny model, same prompts (the bundled task's generator), same max_new_tokens and batch
size, one run:
  (a) naive: one prompt per generate call, in this process (on the first --naive prompts);
  (b) local: batched generate in this process, no Ray, with 1 and with 2 torch threads: the
      faster is the local limit (on a busy machine 2 threads spin-wait and can be 10x
      slower than 1, so one fixed setting would flatter (c));
  (c) ray:   llmflow.evaluate.scoring.generate_predictions, the scoring job itself, with the eval
             section of --config (actors, CPUs and threads per actor, batch size) as the
             evaluate flow runs it: read eval.parquet, split_chats, the HFGenerator actor
             pool on Ray Data, score_row. Wall time of the whole job, the actors' start-up
             included;
  (d) the cold start of one actor alone: a fresh process importing torch and transformers
      and loading the model, the floor of (c)'s start-up;
  (e) the evaluate stage's scoring with the eval loss (on the first --loss-prompts prompts):
      generation and the teacher-forced loss in one actor pass (what score_dataset does
      with the hf engine) against a generation job followed by a separate loss job (two
      model loads, as before).
Ray is a local instance declaring the logical CPUs `llmflow up` declares (two per core),
unless LLMFLOW_RAY_ADDRESS is set. Prints figures; asserts nothing.
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
from _smoke import parse_with_smoke


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


COLD_START = """
import sys, time
t0 = time.perf_counter()
from llmflow.engines.hf import HFGenerator
HFGenerator(sys.argv[1], max_new_tokens=1, torch_threads=1)
print(time.perf_counter() - t0)
"""


def cold_start_s(model: str) -> float:
    """Seconds a fresh Python process takes to import the hf engine and load ``model``."""
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", COLD_START, model],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5000)
    ap.add_argument("--naive", type=int, default=200, help="Prompts for the one-at-a-time run.")
    ap.add_argument("--config", default="configs/tiny.yaml", help="Its eval section runs (c).")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override, e.g. eval.concurrency=1 (repeatable).",
    )
    ap.add_argument(
        "--local-threads",
        default="1,2",
        help="Torch thread counts tried for (b); (a) uses the first.",
    )
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument(
        "--loss-prompts",
        type=int,
        default=400,
        help="Prompts for (e), the eval loss in the same pass or apart; 0 skips.",
    )
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"prompts": 32, "naive": 4, "loss_prompts": 8})

    import ray
    import torch
    import transformers

    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import generate_examples
    from llmflow.config import TrainConfig
    from llmflow.configfile import load_config
    from llmflow.engines.hf import HFGenerator
    from llmflow.evaluate.eval_split import split_chat
    from llmflow.evaluate.scoring import eval_loss, generate_predictions
    from llmflow.launch import default_logical_cpus
    from llmflow.prepare.dataset import parquet_bytes
    from llmflow.store import Store

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    root = Path(__file__).resolve().parent.parent
    config = Path(args.config) if Path(args.config).is_absolute() else root / args.config
    cfg = load_config(config, ["eval.engine=hf", *args.set]).eval
    tmp = tempfile.mkdtemp(prefix="llmflow-bench-score-")
    store = Store(tmp)
    model = resolve_base_model(TrainConfig(), store)
    examples = generate_examples(args.prompts, seed=1)
    prepared = [
        {"id": f"p{i:05d}", "messages": r["messages"], "n_chars": 0, "n_tokens": 0}
        for i, r in enumerate(examples)
    ]
    store.write_bytes(parquet_bytes(prepared), "datasets", "bench", "eval.parquet")
    dataset_uri = store.uri("datasets", "bench")
    rows = [split_chat(r) for r in prepared]
    threads = cfg.threads_per_actor or max(1, int(cfg.cpus_per_actor))

    figures: dict[str, float | str] = {"cold_start_s": cold_start_s(model)}
    gen = HFGenerator(model, max_new_tokens=cfg.max_new_tokens)
    local: dict[int, tuple[float, int]] = {}
    for i, n in enumerate(int(t) for t in args.local_threads.split(",")):
        torch.set_num_threads(n)
        run_local(gen, rows[:64], cfg.batch_size)  # warm-up
        if i == 0 and not args.skip_naive:
            naive_s, _ = run_local(gen, rows[: args.naive], 1)
            figures["naive_examples_per_s"] = args.naive / naive_s
            figures["naive_threads"] = n
        local[n] = run_local(gen, rows, cfg.batch_size)
        figures[f"local_{n}t_examples_per_s"] = len(rows) / local[n][0]
    del gen
    local_threads = min(local, key=lambda n: local[n][0])
    local_s, local_tokens = local[local_threads]
    figures["local_examples_per_s"] = len(rows) / local_s
    figures["local_tokens_per_s"] = local_tokens / local_s

    address = os.environ.get("LLMFLOW_RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": a fresh instance, never whichever cluster started last on this machine.
        ray.init(
            address="local",
            num_cpus=default_logical_cpus(),
            include_dashboard=False,
            logging_level="WARNING",
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        out, _, ray_s = generate_predictions(cfg, model, dataset_uri)
        if args.loss_prompts:
            small = cfg.model_copy(update={"max_examples": args.loss_prompts})
            t0 = time.perf_counter()
            generate_predictions(small, model, dataset_uri)
            eval_loss(small, model, dataset_uri)
            figures["loss_apart_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            both, _, _ = generate_predictions(small, model, dataset_uri, with_loss=True)
            figures["loss_same_pass_s"] = time.perf_counter() - t0
            assert "loss_sum" in both[0]
    finally:
        ray.shutdown()
    assert len(out) == len(rows)
    ray_tokens = sum(int(r["num_generated_tokens"]) for r in out)
    figures["ray_examples_per_s"] = len(out) / ray_s
    figures["ray_tokens_per_s"] = ray_tokens / ray_s
    figures["ray_wall_s"] = ray_s
    # Seconds spent inside generate, summed over batches (all actors): the rest of the wall
    # time is start-up and Ray Data.
    figures["ray_generate_s"] = sum({r["batch_id"]: r["latency_s"] for r in out}.values())
    figures["ray_other_s"] = ray_s - figures["ray_generate_s"] / cfg.concurrency
    figures["local_wall_s"] = local_s

    figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
    figures.update(
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        prompts=len(rows),
        naive_prompts=0 if args.skip_naive else args.naive,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        cpus_per_actor=cfg.cpus_per_actor,
        threads_per_actor=threads,
        local_threads=local_threads,
        max_new_tokens=cfg.max_new_tokens,
    )
    print(
        f"machine: {figures['machine']}; {len(rows)} prompts, max_new_tokens {cfg.max_new_tokens}"
    )
    if "naive_examples_per_s" in figures:
        print(
            f"(a) naive, one prompt a call ({args.naive} prompts, {figures['naive_threads']} "
            f"thread(s)): {figures['naive_examples_per_s']} ex/s"
        )
    tried = ", ".join(f"{n} thread(s) {figures[f'local_{n}t_examples_per_s']}" for n in local)
    print(
        f"(b) local batched generate (batch {cfg.batch_size}, no Ray): "
        f"{figures['local_examples_per_s']} ex/s ({local_s:.1f} s; {tried} ex/s)"
    )
    print(
        f"(c) Ray Data scoring job ({cfg.concurrency} actor(s) x {threads} thread(s), "
        f"{cfg.cpus_per_actor} CPU each, batch {cfg.batch_size}): {figures['ray_examples_per_s']} "
        f"ex/s ({ray_s:.1f} s, start-up included; {figures['ray_generate_s']} s in generate "
        f"over all actors, {figures['ray_other_s']} s of start-up and Ray Data)"
    )
    print(
        f"(d) cold start of one actor's process (imports + model load): {figures['cold_start_s']} s"
    )
    if "loss_same_pass_s" in figures:
        figures["loss_same_pass_vs_apart"] = round(
            figures["loss_apart_s"] / figures["loss_same_pass_s"], 2
        )
        print(
            f"(e) scoring + eval loss on {args.loss_prompts} prompts: one pass "
            f"{figures['loss_same_pass_s']} s, two jobs {figures['loss_apart_s']} s: "
            f"{figures['loss_same_pass_vs_apart']}x"
        )
    if "naive_examples_per_s" in figures:
        figures["ray_vs_naive"] = round(
            figures["ray_examples_per_s"] / figures["naive_examples_per_s"], 2
        )
        print(f"ray vs naive: {figures['ray_vs_naive']}x (target >= 10x)")
    figures["ray_vs_local"] = round(
        figures["ray_examples_per_s"] / figures["local_examples_per_s"], 2
    )
    print(f"ray vs local batched: {figures['ray_vs_local']}x (target >= 0.7x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
