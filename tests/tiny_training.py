"""Test helper: fine-tune the tiny model in-process for a few steps (plain torch loop).

The scoring tests need a model that answers with real text; the untrained tiny model only
repeats special tokens. This is bench/tiny_task.py's loop, cut down: no Ray, no Prefect.
"""

from __future__ import annotations

import random
from pathlib import Path


def train_tiny(
    base_dir: str,
    out_dir: str | Path,
    rows: list[dict],
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> str:
    """Train ``base_dir``'s model on ``rows`` for ``steps`` and save it (safetensors) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.basemodels import load_tokenizer
    from llmflow.engines.hf import loss_mask

    torch.manual_seed(seed)
    tok = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    data = []
    for row in rows:
        ids, mask = loss_mask(tok, row["messages"])  # the trainer's mask, any template
        data.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(data, batch_size)
        width = max(len(x) for x, _ in batch)
        ids = torch.full((batch_size, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], attn[i, : len(x)] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def write_eval_split(store, rows: list[dict], name: str, id_prefix: str) -> str:
    """A prepared-format dataset directory in ``store`` whose eval.parquet holds ``rows``
    (bundled examples), ids ``<id_prefix>000``..; returns its URI."""
    from llmflow.prepare.dataset import parquet_bytes

    prepared = [
        {"id": f"{id_prefix}{i:03d}", "messages": r["messages"], "n_chars": 0, "n_tokens": 0}
        for i, r in enumerate(rows)
    ]
    store.write_bytes(parquet_bytes(prepared), "datasets", name, "eval.parquet")
    return store.uri("datasets", name)
