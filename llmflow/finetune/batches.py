"""Encoding chats for training (loss on assistant tokens only), padding, and the batch order:
a batch is a pure function of (seed, step, rank), so a resumed worker needs only its step.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


# -- data ------------------------------------------------------------------------------------
def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat; labels are IGNORE_INDEX outside assistant tokens.

    The mask is the eval loss's (``engines.hf.loss_mask``): the chat template's
    ``{% generation %}`` blocks where it has them (the tiny model does), else the tokens of the
    last reply, after the prompt rendered with ``add_generation_prompt``.
    """
    from llmflow.engines.hf import loss_mask

    ids, mask = loss_mask(tokenizer, messages)
    return list(ids), [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def encode_rows(tokenizer, rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """``encode_chat`` of each row's ``messages``; rows with no target token are dropped."""
    out = []
    for row in rows:
        ids, labels = encode_chat(tokenizer, row["messages"])
        if any(label != IGNORE_INDEX for label in labels[1:]):
            out.append((ids, labels))
    return out


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (pads carry no loss)."""
    from llmflow.engines.hf import pad

    return {
        "input_ids": pad([x for x, _ in batch], pad_id),
        "attention_mask": pad([[1] * len(x) for x, _ in batch], 0),
        "labels": pad([y for _, y in batch], IGNORE_INDEX),
    }


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of ``n`` rows in one epoch: a function of (seed, epoch) only."""
    order = list(range(n))
    random.Random(f"llmflow-{seed}-{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(
    n: int,
    seed: int,
    step: int,
    micro: int,
    grad_accum: int,
    rank: int,
    world: int,
    batch_size: int,
) -> list[int]:
    """Rows of one worker's micro-batch: consecutive slices of an endless stream of epochs.

    Global micro-batch ``g = step * grad_accum + micro`` covers stream positions
    ``[g * world * batch_size, (g + 1) * world * batch_size)``; worker ``rank`` takes its
    ``batch_size`` slice. No state: a resumed run computes the same batches from the step.
    """
    start = ((step * grad_accum + micro) * world + rank) * batch_size
    return [epoch_order(n, seed, i // n)[i % n] for i in range(start, start + batch_size)]


def read_rows(dataset_uri: str, split: str) -> list[dict]:
    """The rows of ``<dataset_uri>/<split>.parquet`` as dicts (messages as lists of dicts)."""
    from llmflow.store import read_parquet

    return read_parquet(
        f"{dataset_uri.rstrip('/')}/{split}.parquet", ["id", "messages"]
    ).to_pylist()


# -- schedule and checks ---------------------------------------------------------------------
def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
