"""The teacher-forced loss of chats' reply tokens at real sizes: logits only at the positions
that predict a reply token, in passes bounded by LOGITS_BUDGET (the evaluate stage's loss
pass, the hf engine's ``losses``; the training loop bounds its in-training eval with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmflow.engines.hf import context_length, loss_mask, pad

# The most logits a loss pass holds at once (values): 2**28 is 1 GiB in float32 after the
# upcast. One row of 1024 tokens of a 152k vocabulary is 156 M values, so a batch of 32 such
# rows as whole-sequence float32 logits was about 20 GB (issue 30); passes are packed below it.
LOGITS_BUDGET = 2**28


def example_losses(
    model, tokenizer, chats: Sequence[Sequence[Mapping[str, str]]], budget: int = LOGITS_BUDGET
) -> list[tuple[float, int]]:
    """(summed loss, tokens) of each chat's reply tokens, teacher forced.

    Only the positions that predict a reply token get logits (``logits_to_keep``), and the
    rows go through in passes of at most ``budget`` logits (rows x kept positions x
    vocabulary); a row whose reply alone exceeds it takes several passes over parts of its
    positions. Sequences longer than the model's context keep their last tokens (the reply
    is last).
    """
    limit = context_length(model.config, tokenizer)
    encoded = []
    for chat in chats:
        ids, mask = loss_mask(tokenizer, chat)
        encoded.append((ids[-limit:], mask[-limit:]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return encoded_losses(model, pad_id, encoded, budget)


def encoded_losses(
    model, pad_id: int, encoded: Sequence[tuple[list[int], list[int]]], budget: int = LOGITS_BUDGET
) -> list[tuple[float, int]]:
    """``example_losses`` of rows already encoded: (token ids, 0/1 target mask) each, packed
    into passes of at most ``budget`` logits."""
    # Position t's logits predict token t + 1: keep t where token t + 1 is a target.
    rows = [(ids, mask, [t for t in range(len(ids) - 1) if mask[t + 1]]) for ids, mask in encoded]
    vocab = model.get_output_embeddings().weight.shape[0]
    per_pass = max(1, budget // vocab)  # positions a pass may keep
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    group: list[int] = []
    kept: set[int] = set()
    for i, (_, _, positions) in enumerate(rows):
        union = kept | set(positions)
        if group and (len(group) + 1) * len(union) > per_pass:
            _losses_of(model, pad_id, rows, group, sorted(kept), per_pass, results)
            group, union = [], set(positions)
        group.append(i)
        kept = union
    if group:
        _losses_of(model, pad_id, rows, group, sorted(kept), per_pass, results)
    return results


def _losses_of(model, pad_id, encoded, rows, positions, per_pass, results) -> None:
    """Add the summed loss and token count at ``positions`` of each row of ``rows`` (indices
    into ``encoded``) to ``results``: one forward pass per chunk of the positions, each
    keeping at most ``per_pass`` logits (one chunk unless a lone row's reply is longer)."""
    import torch

    device = next(model.parameters()).device
    x = pad([encoded[r][0] for r in rows], pad_id).to(device)
    attn = pad([[1] * len(encoded[r][0]) for r in rows], 0).to(device)
    targets = pad(
        [
            [t if m else -100 for t, m in zip(ids, mask)]
            for ids, mask, _ in (encoded[r] for r in rows)
        ],
        -100,
    ).to(device)
    width = max(1, per_pass // len(rows))
    for start in range(0, len(positions), width):
        keep = torch.tensor(positions[start : start + width], dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=attn, logits_to_keep=keep).logits
            labels = targets[:, keep + 1]
            losses = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(labels.shape)
        valid = labels != -100
        for j, r in enumerate(rows):
            s, n = results[r]
            results[r] = (s + float(losses[j][valid[j]].sum()), n + int(valid[j].sum()))
