"""Benchmark: does the tiny model learn the bundled task in about two minutes on 2 CPU cores?

    .venv/bin/python bench/tiny_task.py [--steps 600] [--batch-size 16] [--lr 3e-3] [--threads 2]
        [--smoke] [--json out.json]

A plain torch loop (no Ray, no Prefect): build the tiny model in a temporary directory,
split the bundled JSONL 90/10 by a hash of each example, score exact match of greedy
generation on the eval split, fine-tune on assistant tokens only, score again, and print
the figures configs/tiny.yaml is tuned from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _smoke import parse_with_smoke


def is_eval(row: dict, fraction: float) -> bool:
    """Hash-based split: the same example always lands on the same side."""
    raw = json.dumps(row["messages"], sort_keys=True).encode()
    return int(hashlib.sha256(raw).hexdigest()[:8], 16) / 16**8 < fraction


def encode_train(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; labels are -100 outside the assistant tokens."""
    from llmflow.tinymodel import assistant_mask

    out = []
    for row in rows:
        ids, mask = assistant_mask(tokenizer, row["messages"])
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def collate(batch, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        attn[i, : len(x)] = 1
    return ids, labels, attn


def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of rows whose greedy answer (max 16 new tokens) equals the reference exactly."""
    import torch

    model.eval()
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                r["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            for r in chunk
        ]
        enc = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False)
        answers = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        hits += sum(a.strip() == r["messages"][-1]["content"] for a, r in zip(answers, chunk))
    model.train()
    return hits / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"steps": 5, "eval_examples": 8, "log_every": 5})

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmflow.bundled import bundled_path, read_examples
    from llmflow.tinymodel import build_tiny_model, example_texts

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    rows = read_examples(bundled_path())
    train_rows = [r for r in rows if not is_eval(r, 0.1)]
    eval_rows = [r for r in rows if is_eval(r, 0.1)][: args.eval_examples]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_tiny_model(
            tmp,
            example_texts(rows),
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
        )
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp)
        build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"rows: {len(train_rows)} train, {len(eval_rows)} eval scored; vocab {len(tokenizer)}")
    print(f"params: {params} ({params / 1e6:.2f} M); build {build_s:.1f} s")

    t0 = time.perf_counter()
    em_before = exact_match(model, tokenizer, eval_rows)
    print(f"EM before: {em_before:.3f} ({time.perf_counter() - t0:.1f} s to score)")

    data = encode_train(tokenizer, train_rows)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_lambda(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    rng = random.Random(args.seed)
    order: list[int] = []
    losses, tokens = [], 0
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        batch = [data[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]
        ids, labels, attn = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(attn.sum())
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  step {step + 1}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    em_after = exact_match(model, tokenizer, eval_rows)
    score_s = time.perf_counter() - t0
    print(f"steps: {args.steps}, batch {args.batch_size}, lr {args.lr}, warmup {args.warmup}")
    print(
        f"train: {train_s:.1f} s, {tokens / train_s:.0f} tokens/s, {args.steps / train_s:.1f} steps/s"
    )
    print(
        f"loss: first {losses[0]:.4f}, last {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of 10)"
    )
    print(f"EM: before {em_before:.3f}, after {em_after:.3f} ({score_s:.1f} s to score)")
    if args.json:
        figures = {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "train_rows": len(train_rows),
            "eval_examples": len(eval_rows),
            "vocab": len(tokenizer),
            "params": params,
            "build_s": round(build_s, 2),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "threads": args.threads,
            "train_s": round(train_s, 2),
            "tokens_per_s": round(tokens / train_s),
            "steps_per_s": round(args.steps / train_s, 2),
            "loss_first": round(losses[0], 4),
            "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "em_before": em_before,
            "em_after": em_after,
            "score_s": round(score_s, 2),
        }
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
