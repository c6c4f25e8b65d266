"""What each Ray Train worker runs: ``train_loop``, a plain torch loop under DDP with
gradient accumulation and checkpoints (batches.py builds its batches, trainer.py launches it).

Why a plain torch loop with ``ray.train.torch.prepare_model`` and not the HF Trainer or
``prepare_data_loader``: resuming must land on exactly the batch the interrupted run would
have seen next, and the loss must stay on assistant tokens of the chat template. A batch
here is a pure function of (seed, step, rank) (``batch_indices``), so a resumed or replaced
worker needs only the step from its checkpoint; a DistributedSampler would need its
position replayed, and the HF Trainer brings a second checkpoint format (and its own
resume logic) on top of Ray's. The loop is the one bench/tiny_task.py measured, plus DDP,
gradient accumulation and checkpoints: about 100 lines a reader can hold in mind.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from llmflow import progress
from llmflow.config import TrainConfig
from llmflow.finetune.batches import (
    IGNORE_INDEX,
    batch_indices,
    collate,
    encode_rows,
    lr_at,
    read_rows,
)
from llmflow.finetune.checks import NonFiniteLoss, TrainingError

log = logging.getLogger(__name__)


MAX_GRAD_NORM = 1.0


MAX_EVAL_ROWS = 256  # eval loss on at most this many eval rows: a trend, not a benchmark


EVAL_BATCH_SIZE = 64  # rows, at most: eval_batch_rows bounds them by their logits too


TRAIN_STATE = "train_state.pt"


HISTORY = "history.json"


def check_finite_loss(loss: float, step: int) -> None:
    """Raise NonFiniteLoss naming the (1-based) step when ``loss`` is NaN or infinite."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"training loss became {loss} at step {step}: lower train.learning_rate or check "
            "the data; the run keeps its checkpoints from before that step"
        )


def is_checkpoint_step(step: int, train: TrainConfig) -> bool:
    """Checkpoint every ``checkpoint_every`` steps and always after the last one."""
    return step % train.checkpoint_every == 0 or step == train.max_steps


# -- model -----------------------------------------------------------------------------------
def load_model(base_model_uri: str, train: TrainConfig, dtype=None):
    """The base model in ``dtype`` (float32 unless given: see load_dtype), wrapped in a LoRA
    adapter when ``train.lora`` (PEFT keeps the adapter's own weights in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.engines import loadable_path

    path = loadable_path(base_model_uri)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or torch.float32,
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation=train.attn_implementation,  # None: transformers' default
    )
    if train.gradient_checkpointing:  # in train() mode only; non-reentrant: LoRA, DDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=train.lora_rank,
            lora_alpha=2 * train.lora_rank,
            lora_dropout=0.0,  # no dropout: runs stay reproducible on CPU
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    return model


def eval_batch_rows(rows: list[tuple[list[int], list[int]]], vocab: int) -> int:
    """Rows per batch of the in-training eval loss: at most EVAL_BATCH_SIZE, and few enough
    that their logits (rows x the longest row x vocabulary: the kept positions' bound) stay
    within the loss passes' LOGITS_BUDGET: 64 rows of 300 tokens of a 152k vocabulary were
    29 GB in float32 (issue 30)."""
    from llmflow.engines.losses import LOGITS_BUDGET

    longest = max((len(x) for x, _ in rows), default=1)
    return max(1, min(EVAL_BATCH_SIZE, LOGITS_BUDGET // (max(1, longest) * vocab)))


def reply_loss(model, batch: dict[str, Any]):
    """The mean loss over the batch's target tokens, as ``model(**batch).loss`` computes it,
    with logits only at the positions that predict a target (``logits_to_keep``): a batch of
    8 x 1024 tokens of a 152k vocabulary holds its reply positions' logits, not all 1.24 G
    values (2.5 GB in bf16, 5 GB more once the loss upcasts them; issue 30)."""
    import torch

    labels = batch["labels"]
    # Position t predicts token t + 1: keep the positions where some row's t + 1 is a target.
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels[:, keep + 1].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def load_dtype(train: TrainConfig, device, bf16_supported: bool):
    """The dtype a worker loads its base model in: bfloat16 for a LoRA run on a GPU that
    supports it (the base is frozen: Phi-3-mini's 3.8 B weights are 7.6 GB, not 15.3 GB in
    float32 with bf16 copies made by autocast on top); float32 otherwise (what trains is
    kept in float32, AdamW's state with it; autocast computes in bf16 on such a GPU)."""
    import torch

    if train.lora and device.type == "cuda" and bf16_supported:
        return torch.bfloat16
    return torch.float32


def trainable_state(model) -> dict[str, Any]:
    """The trainable parameters (all of them, or the LoRA adapter's), on CPU."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, Any]) -> None:
    """Put ``trainable_state`` output back into a model built by ``load_model``."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise TrainingError(
            f"checkpoint does not match the model: unexpected keys {result.unexpected_keys[:3]}"
        )


def build_optimizer(model, train: TrainConfig, device, state: dict[str, Any] | None = None):
    """AdamW over the trainable parameters of ``model`` moved to ``device`` first, with the
    checkpoint's ``state`` (``trainable_state``, optimizer, step) loaded when resuming:
    ``(optimizer, start_step)``.

    The order matters: ``Optimizer.load_state_dict`` puts each moment tensor on its
    parameter's device at load time, so a model moved afterwards (to CUDA) would leave
    ``exp_avg``/``exp_avg_sq`` on the CPU and the first step after a resume would fail.
    """
    import torch

    model.to(device)
    # A move that makes new Parameters (to XLA, or to meta) unties tied embeddings; a move to
    # CUDA keeps them, and tying again is then a no-op.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    if state is None:
        return opt, 0
    load_trainable_state(model, state["model"])
    opt.load_state_dict(state["optimizer"])
    return opt, int(state["step"])


def all_sum(values: list[float], device) -> list[float]:
    """``values`` summed over every rank of the process group (as they are without one).

    The tensor lives on ``device``, the worker's own: NCCL, the backend of GPU training,
    refuses CPU tensors ("No backend type associated with device type cpu"); gloo takes either.
    """
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def pick_device(use_gpu: bool):
    """The worker's torch device: its GPU when it has one, else CPU (with a warning if asked).

    A node can declare GPUs (``ray start --num-gpus``) that CUDA cannot see; training then
    runs on that node's CPU instead of crashing.
    """
    import torch

    if use_gpu and torch.cuda.is_available():
        from ray.train.torch import get_device

        return get_device()
    if use_gpu:
        log.warning(
            "train.use_gpu is set and this worker holds a Ray GPU, but CUDA is not available "
            "here (torch %s): training on CPU",
            torch.__version__,
        )
    return torch.device("cpu")


# -- the Ray Train worker --------------------------------------------------------------------
def train_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: resume from the latest checkpoint, train, checkpoint, eval.

    ``cfg``: ``train`` (TrainConfig as a dict), ``base_model``, ``dataset_uri``. Returns
    (from rank 0, as ``Result.return_value``) the loss history and timings; a non-finite loss
    ends the loop on every worker at the same step and comes back as ``error`` (raising would
    count as a worker failure, and a deterministic NaN would be retried max_failures times).
    """
    import contextlib

    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from llmflow.basemodels import load_tokenizer

    t_start = time.time()
    train = TrainConfig.model_validate(cfg["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(train.seed)
    device = pick_device(train.use_gpu)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else contextlib.nullcontext()
    )

    tokenizer = load_tokenizer(cfg["base_model"])
    data = encode_rows(tokenizer, read_rows(cfg["dataset_uri"], "train"))
    eval_data = encode_rows(tokenizer, read_rows(cfg["dataset_uri"], "eval")[:MAX_EVAL_ROWS])
    if not data:
        raise TrainingError(f"{cfg['dataset_uri']}: no training row has an assistant token")

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = load_model(cfg["base_model"], train, load_dtype(train, device, bf16))
    history: dict[str, list] = {"train": [], "eval": []}
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY).read_text())
    opt, start_step = build_optimizer(model, train, device, state)
    params = [p for group in opt.param_groups for p in group["params"]]
    # Already on its device (a no-op move): prepare_model wraps it in DDP when world > 1.
    model = prepare_model(model, move_to_device=device)
    backend = dist.get_backend() if dist.is_initialized() else "none"

    vocab = getattr(model, "module", model).get_output_embeddings().weight.shape[0]
    eval_rows = eval_batch_rows(eval_data, vocab)

    def eval_loss() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), autocast:
            mine = eval_data[rank::world]
            for i in range(0, len(mine), eval_rows):
                b = {
                    k: v.to(device)
                    for k, v in collate(mine[i : i + eval_rows], tokenizer.pad_token_id).items()
                }
                n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += torch.tensor([float(reply_loss(model, b)) * n, n], dtype=torch.float64)
        model.train()
        s, n = all_sum(total.tolist(), device)
        return s / n if n else float("nan")

    def save_checkpoint(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": trainable_state(model),
                    "optimizer": opt.state_dict(),
                    "step": step,
                }
                torch.save(state, Path(d) / TRAIN_STATE)
                (Path(d) / HISTORY).write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    model.train()
    tokens, error = 0, None
    t_first_step = time.time()
    for step in range(start_step, train.max_steps):
        lr = lr_at(step, train.learning_rate, train.warmup_steps, train.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        sums = [0.0, 0.0, 0.0]  # loss x target tokens, target tokens, input tokens
        for micro in range(train.grad_accum):
            idx = batch_indices(
                len(data), train.seed, step, micro, train.grad_accum, rank, world, train.batch_size
            )
            b = {
                k: v.to(device)
                for k, v in collate([data[i] for i in idx], tokenizer.pad_token_id).items()
            }
            last = micro == train.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync, autocast:
                loss = reply_loss(model, b)
                (loss / train.grad_accum).backward()
            loss = loss.detach()
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            sums = [
                sums[0] + loss.item() * n,
                sums[1] + n,
                sums[2] + int(b["attention_mask"].sum()),
            ]
        loss_sum, n_target, n_tokens = all_sum(sums, device)
        step_loss = loss_sum / max(1.0, n_target)
        try:
            check_finite_loss(step_loss, step + 1)
        except NonFiniteLoss as exc:
            error = str(exc)
            break
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(n_tokens)
        done = step + 1
        history["train"].append([done, step_loss, lr])
        metrics = {"step": done, "loss": step_loss, "lr": lr}
        if done % train.eval_every == 0 or done == train.max_steps:
            metrics["eval_loss"] = eval_loss()
            history["eval"].append([done, metrics["eval_loss"]])
        if is_checkpoint_step(done, train):
            save_checkpoint(done, metrics)
        if rank == 0:
            progress.report(
                cfg.get("progress_run"),
                "train",
                done,
                train.max_steps,
                final=done == train.max_steps,
            )
    t_end = time.time()
    steps_run = len([s for s, *_ in history["train"] if s > start_step])
    return {
        "history": history,
        "start_step": start_step,
        "end_step": start_step + steps_run,
        "steps_run": steps_run,
        "tokens": tokens,
        "train_s": t_end - t_first_step,
        "t_start": t_start,
        "t_first_step": t_first_step,
        "device": str(device),
        "precision": "bf16" if not isinstance(autocast, contextlib.nullcontext) else "fp32",
        "world_size": world,
        "backend": backend,
        "node_id": ray.get_runtime_context().get_node_id(),
        "error": error,
    }
