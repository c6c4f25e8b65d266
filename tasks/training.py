"""The finetune stage: supervised fine-tuning of a causal LM on Ray Train, resumable.

Pure parts (encoding and masking, batching, the LR schedule, the NaN check, the export of a
Hugging Face directory) are plain functions, unit tested without Ray. ``train_loop`` is what
each Ray Train worker runs; ``run_training`` launches the TorchTrainer; the Prefect tasks at
the bottom add the registry, the artifacts and the logs.

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

import functools
import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.basemodels import ModelError
from llmflow.config import TrainConfig
from llmflow.errors import LlmflowError
from llmflow.refs import DatasetRef, ModelRef, TrainRun
from llmflow.runs import flow_run_id
from llmflow.store import MANIFEST, Store

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
MAX_GRAD_NORM = 1.0
MAX_EVAL_ROWS = 256  # eval loss on at most this many eval rows: a trend, not a benchmark
EVAL_BATCH_SIZE = 64
TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"
RESULT = "llmflow_result.json"  # a finished run's TrainRun, next to Ray Train's own files

# Fields of TrainConfig that do not change the weights a run produces: left out of the run's
# key, so changing them (say max_failures) still resumes the same run.
OPERATIONAL_FIELDS = frozenset(
    {"model_name", "merge_lora", "eval_every", "checkpoint_every", "checkpoints_to_keep",
     "max_failures", "cpus_per_worker", "resources_per_worker"}
)  # fmt: skip


class TrainingError(LlmflowError):
    """Training could not start, or stopped before its last step."""


class DatasetNotFound(LlmflowError):
    """The DatasetRef handed to finetune names nothing in the store."""


class InsufficientResources(TrainingError):
    """The cluster could never place the requested training workers."""


class NonFiniteLoss(TrainingError):
    """The training loss became NaN or infinite."""


# -- input checks (run before any cluster work) ----------------------------------------------
def check_dataset(dataset: DatasetRef) -> None:
    """Fail with one line when ``dataset`` is not a prepared dataset directory."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(dataset.uri)
    for name in (MANIFEST, "train.parquet"):
        if not fs.exists(f"{path.rstrip('/')}/{name}"):
            raise DatasetNotFound(
                f"dataset {dataset.uri}: no {name} there (sha {dataset.short_sha}); prepare it "
                "with `llmflow run prepare` or pass a DatasetRef of this store"
            )


def check_causal_lm(model_uri: str) -> None:
    """Fail with one line when ``model_uri`` is not a causal language model transformers knows."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmflow.engines import loadable_path

    try:
        # transformers reads local paths and hub ids, not store URIs (s3://...): copy first.
        path = loadable_path(model_uri)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - one line naming the model and the cause
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"train.base_model: {model_uri}: cannot read its config: {first}") from None
    # A type with a causal head (bert has one) saved as another head (BertForMaskedLM) is
    # refused too: its checkpoint holds no trained causal head.
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal = {causal} if isinstance(causal, str) else set(causal or ())
    listed = list(getattr(config, "architectures", None) or [])
    if not causal or (listed and not causal & set(listed)):
        archs = ", ".join(listed) or "none listed"
        raise ModelError(
            f"train.base_model: {model_uri}: model type '{config.model_type}' is not a causal "
            f"language model (architectures: {archs})"
        )


def check_placeable(train: TrainConfig, nodes: Sequence[dict[str, Any]]) -> None:
    """Fail when the alive nodes could never hold ``train.num_workers`` workers at once.

    Each worker is one bundle (``worker_resources``) that must fit on a single node, so the
    count that fits is the sum over nodes of how many bundles each node's totals hold. Other
    jobs' usage is not counted: this catches what can never run, not what must wait.

    Args:
        train: the train config.
        nodes: ``ray.nodes()`` entries (``Alive`` and ``Resources`` are read).
    """
    from llmflow.preflight import bundles_on_node, describe_nodes

    need = worker_resources(train)
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    fits = sum(bundles_on_node(need, res) for res in alive)
    if fits >= train.num_workers:
        return
    total = {k: sum(r.get(k, 0.0) for r in alive) for k in need}
    per_node = describe_nodes(need, alive) or "no alive nodes"
    wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
    raise InsufficientResources(
        f"train.num_workers={train.num_workers} x ({wanted}) needs "
        + ", ".join(f"{train.num_workers * v:g} {k}" for k, v in need.items())
        + ", but the Ray cluster has "
        + ", ".join(f"{total[k]:g} {k}" for k in need)
        + f" in total and at most {fits} such worker(s) fit (nodes: {per_node})"
    )


def worker_resources(train: TrainConfig) -> dict[str, float]:
    """What each training worker reserves: its CPUs, one GPU when ``use_gpu``, and the
    custom resources of ``resources_per_worker`` (which place it on the nodes declaring them)."""
    res = {"CPU": float(train.cpus_per_worker)}
    if train.use_gpu:
        res["GPU"] = 1.0
    res.update(train.resources_per_worker)
    return res


# -- data ------------------------------------------------------------------------------------
def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat; labels are IGNORE_INDEX outside assistant tokens.

    The chat template's ``{% generation %}`` blocks give the assistant mask (the tiny model
    has them). A template without them masks nothing; then the last assistant reply is the
    target: the tokens after the prompt rendered with ``add_generation_prompt``.
    """
    from llmflow.tinymodel import assistant_mask

    ids, mask = assistant_mask(tokenizer, messages)
    if not any(mask) and messages and messages[-1]["role"] == "assistant":
        prompt = tokenizer.apply_chat_template(
            list(messages[:-1]), tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        n = len(prompt) if list(ids[: len(prompt)]) == list(prompt) else len(ids)
        mask = [0] * n + [1] * (len(ids) - n)
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
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        attn[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of ``n`` rows in one epoch: a function of (seed, epoch) only."""
    order = list(range(n))
    random.Random(f"llmflow-{seed}-{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(
    n: int, seed: int, step: int, micro: int, grad_accum: int, rank: int, world: int,
    batch_size: int,
) -> list[int]:  # fmt: skip
    """Rows of one worker's micro-batch: consecutive slices of an endless stream of epochs.

    Global micro-batch ``g = step * grad_accum + micro`` covers stream positions
    ``[g * world * batch_size, (g + 1) * world * batch_size)``; worker ``rank`` takes its
    ``batch_size`` slice. No state: a resumed run computes the same batches from the step.
    """
    start = ((step * grad_accum + micro) * world + rank) * batch_size
    return [epoch_order(n, seed, i // n)[i % n] for i in range(start, start + batch_size)]


def read_rows(dataset_uri: str, split: str) -> list[dict]:
    """The rows of ``<dataset_uri>/<split>.parquet`` as dicts (messages as lists of dicts)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(f"{dataset_uri.rstrip('/')}/{split}.parquet", "rb") as f:
        return pq.read_table(f, columns=["id", "messages"]).to_pylist()


# -- schedule and checks ---------------------------------------------------------------------
def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def run_key(train: TrainConfig, dataset_sha256: str, base_model_uri: str) -> str:
    """16 hex digits naming a training run: the same inputs give the same key (and resume)."""
    hyper = {k: v for k, v in train.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    raw = json.dumps(
        {"train": hyper, "dataset": dataset_sha256, "base": base_model_uri, "v": 1},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


# -- model -----------------------------------------------------------------------------------
def load_model(base_model_uri: str, train: TrainConfig):
    """The base model in float32, wrapped in a LoRA adapter when ``train.lora``."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.engines import loadable_path

    path = loadable_path(base_model_uri)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
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


def export_model(base_model_uri: str, state: dict[str, Any], train: TrainConfig, out_dir: Path) -> str:
    """Write the trained model to ``out_dir`` as a Hugging Face directory (safetensors).

    Returns the format written: ``full`` (all weights trained), ``merged`` (LoRA folded into
    the base: a plain model directory), or ``adapter`` (adapter_model.safetensors with an
    adapter_config.json whose base_model_name_or_path names the base).
    """
    from llmflow.basemodels import load_tokenizer

    model = load_model(base_model_uri, train)
    load_trainable_state(model, state)
    fmt = export_format(train)
    if fmt == "merged":
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_model_uri).save_pretrained(out_dir)
    return fmt


def export_format(train: TrainConfig) -> str:
    """What ``export_model`` writes for this config: full, merged or adapter."""
    if not train.lora:
        return "full"
    return "merged" if train.merge_lora else "adapter"


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
            "here (torch %s): training on CPU", torch.__version__,
        )  # fmt: skip
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

    model = load_model(cfg["base_model"], train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    history: dict[str, list] = {"train": [], "eval": []}
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY).read_text())
        load_trainable_state(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
    model = prepare_model(model, move_to_device=device)
    backend = dist.get_backend() if dist.is_initialized() else "none"

    def eval_loss() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), autocast:
            mine = eval_data[rank::world]
            for i in range(0, len(mine), EVAL_BATCH_SIZE):
                b = {k: v.to(device) for k, v in collate(mine[i : i + EVAL_BATCH_SIZE], tokenizer.pad_token_id).items()}
                n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += torch.tensor([float(model(**b).loss) * n, n], dtype=torch.float64)
        model.train()
        s, n = all_sum(total.tolist(), device)
        return s / n if n else float("nan")

    def save_checkpoint(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = {"model": trainable_state(model), "optimizer": opt.state_dict(), "step": step}
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
            idx = batch_indices(len(data), train.seed, step, micro, train.grad_accum, rank,
                                world, train.batch_size)  # fmt: skip
            b = {k: v.to(device) for k, v in collate([data[i] for i in idx], tokenizer.pad_token_id).items()}
            last = micro == train.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync, autocast:
                loss = model(**b).loss
                (loss / train.grad_accum).backward()
            loss = loss.detach()
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            sums = [sums[0] + loss.item() * n, sums[1] + n, sums[2] + int(b["attention_mask"].sum())]
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


# -- the launcher ----------------------------------------------------------------------------
def cuda_on_gpu_nodes() -> bool:
    """Whether a process holding one Ray GPU sees CUDA (a node may declare GPUs it lacks)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(probe.remote(), timeout=120))


def run_training(
    train: TrainConfig, dataset: DatasetRef, base_model_uri: str, store: Store
) -> TrainRun:
    """Run (or resume) the TorchTrainer run of these inputs and return where it ended.

    The run lives at ``<store>/runs/finetune-<run_key>``: the same inputs find the same
    directory, and Ray Train V2 restores its checkpoint manager from the snapshot there, so
    ``get_checkpoint()`` in the workers returns the latest checkpoint and the run goes on
    from it. A run that finished (its TrainRun is stored, its last checkpoint still there)
    is returned as it is, ``reused``, without starting a trainer: a re-run of a pipeline
    that failed later on skips the training it had done.

    Raises:
        InsufficientResources: the cluster could never place the workers (before any start).
        NonFiniteLoss: the loss became NaN or infinite (names the step).
        TrainingError: the run failed more than ``train.max_failures`` times.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_dataset(dataset)
    name = f"finetune-{run_key(train, dataset.sha256, base_model_uri)}"
    done = finished_run(store, name, train)
    if done is not None:
        return done
    check_placeable(train, ray.nodes())
    backend = "gloo"
    if train.use_gpu:
        if cuda_on_gpu_nodes():
            backend = "nccl"
        else:
            log.warning("train.use_gpu: the GPU node has no CUDA; workers use gloo and the CPU")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": train.model_dump(mode="json"),
            "base_model": base_model_uri,
            "dataset_uri": dataset.uri,
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=worker_resources(train),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=store.uri("runs"),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and kin: one line naming the run
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(
            f"training run {store.uri('runs', name)} failed (train.max_failures="
            f"{train.max_failures}): {type(exc).__name__}: {first}"
        ) from None
    fit_s = time.time() - t0
    out = result.return_value or {}
    if out.get("error"):
        raise NonFiniteLoss(out["error"])
    if result.checkpoint is None:
        raise TrainingError(f"training run {store.uri('runs', name)} left no checkpoint")
    history = out["history"]
    losses = [loss for _, loss, _ in history["train"]]
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "steps": float(out["end_step"]),
        "steps_run": float(out["steps_run"]),
        "start_step": float(out["start_step"]),
        "tokens": float(out["tokens"]),
        "train_s": out["train_s"],
        "tokens_per_s": out["tokens"] / out["train_s"] if out["train_s"] > 0 else 0.0,
        "fit_s": fit_s,
        "startup_s": out["t_first_step"] - t0,  # fit() called -> first step
        "worker_setup_s": out["t_first_step"] - out["t_start"],  # data, tokenizer, model
    }
    if history["eval"]:
        metrics["eval_loss_last"] = history["eval"][-1][1]
    run = TrainRun(
        uri=store.uri("runs", name),
        checkpoint_uri=result.checkpoint.path
        if store.local
        else result.checkpoint.filesystem.type_name + "://" + result.checkpoint.path,
        metrics=metrics,
        history=history,
        device=out["device"],
        precision=out.get("precision", "fp32"),
        backend=out.get("backend", "none"),
        node_id=out["node_id"],
        world_size=out["world_size"],
    )
    store.write_json(run.model_dump(mode="json"), "runs", name, RESULT)  # atomic
    return run


def finished_run(store: Store, name: str, train: TrainConfig) -> TrainRun | None:
    """The stored TrainRun of run ``name`` if it reached ``train.max_steps`` and its last
    checkpoint is still in the store; None otherwise (the run then starts or resumes)."""
    import fsspec

    if not store.exists("runs", name, RESULT):
        return None
    run = TrainRun.model_validate(store.read_json("runs", name, RESULT))
    fs, path = fsspec.core.url_to_fs(run.checkpoint_uri)
    if run.metrics.get("steps") != train.max_steps or not fs.exists(f"{path}/{TRAIN_STATE}"):
        return None
    return run.model_copy(update={"reused": True})


def checkpoint_state(checkpoint_uri: str) -> dict[str, Any]:
    """The trainable weights kept in a training checkpoint directory."""
    import fsspec
    import torch

    with fsspec.open(f"{checkpoint_uri.rstrip('/')}/{TRAIN_STATE}", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)["model"]


# -- artifacts -------------------------------------------------------------------------------
def loss_table(history: dict[str, list], max_rows: int = 100) -> list[dict[str, Any]]:
    """Rows of the loss curve (at most ``max_rows``, evenly spaced, the last step kept)."""
    evals = {int(s): loss for s, loss in history["eval"]}
    train = history["train"]
    every = max(1, math.ceil(len(train) / max_rows))
    keep = [r for i, r in enumerate(train) if i % every == 0 or i == len(train) - 1]
    return [
        {"step": int(s), "train_loss": round(loss, 5), "lr": float(f"{lr:.3g}"),
         "eval_loss": round(evals[int(s)], 5) if int(s) in evals else None}
        for s, loss, lr in keep
    ]  # fmt: skip


def loss_plot_png(history: dict[str, list], title: str) -> bytes:
    """The loss curve (train per step, eval where measured) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: render to a buffer
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history["train"]:
        s, loss, _ = zip(*history["train"])
        ax.plot(s, loss, label="train loss", linewidth=1)
    if history["eval"]:
        s, loss = zip(*history["eval"])
        ax.plot(s, loss, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def git_commit() -> str | None:
    """The project's git commit (with ``-dirty`` when it has changes), or None outside git."""
    import subprocess

    from llmflow.settings import project_dir

    try:
        run = functools.partial(subprocess.run, cwd=project_dir(), capture_output=True,
                                text=True, timeout=10)  # fmt: skip
        sha = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


# -- Prefect tasks ---------------------------------------------------------------------------
def _export_and_register(
    store: Store, train: TrainConfig, dataset: DatasetRef, base_model_uri: str, run: TrainRun,
    config: dict[str, Any] | None, fmt: str, loss_plot: str,
) -> ModelRef:  # fmt: skip
    """The run's final checkpoint as a HF directory, registered as the next version."""
    from llmflow.registry import register_version

    with tempfile.TemporaryDirectory(prefix="llmflow-export-") as tmp:
        export_model(base_model_uri, checkpoint_state(run.checkpoint_uri), train, Path(tmp))
        return register_version(
            store,
            train.model_name,
            Path(tmp),
            base_model=base_model_uri,
            dataset_sha256=dataset.sha256,
            metrics={k: float(v) for k, v in run.metrics.items()},
            lineage={
                "format": fmt,
                "dataset": dataset.model_dump(mode="json"),
                "train_config": train.model_dump(mode="json"),
                "pipeline_config": config,
                "flow_run_id": flow_run_id(),
                "git_commit": git_commit(),
                "train_run": run.uri,
                "checkpoint": run.checkpoint_uri,
                "device": run.device,
                "precision": run.precision,
                "world_size": run.world_size,
                "loss_plot": loss_plot,
            },
        )


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(train: TrainConfig, dataset: DatasetRef, base_model_uri: str) -> TrainRun:
    """Run the TorchTrainer (resuming an earlier run of the same inputs); no retries here:
    Ray Train's FailureConfig replaces failed workers, and a re-run resumes anyway."""
    from prefect import get_run_logger

    logger = get_run_logger()
    run = run_training(train, dataset, base_model_uri, Store())
    m = run.metrics
    if run.reused:
        logger.info("reused the finished run %s (%d steps, loss %.4f -> %.4f): nothing to train",
                    run.uri, m["steps"], m["train_loss_first"], m["train_loss_last"])  # fmt: skip
        return run
    logger.info(
        "trained %s: steps %d..%d (%d run) on %s, loss %.4f -> %.4f, %.0f tokens/s, "
        "fit %.1f s (start-up %.1f s)", run.uri, m["start_step"], m["steps"], m["steps_run"],
        run.device, m["train_loss_first"], m["train_loss_last"], m["tokens_per_s"], m["fit_s"],
        m["startup_s"],
    )  # fmt: skip
    return run


@task(name="register-model", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def register_model(
    train: TrainConfig, dataset: DatasetRef, base_model_uri: str, run: TrainRun,
    config: dict[str, Any] | None = None,
) -> ModelRef:  # fmt: skip
    """Export the final checkpoint as a HF directory, register it, publish the loss curve.

    Idempotent: a checkpoint already registered in this format returns that version (a
    re-run of a pipeline registers nothing new).
    """
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from llmflow.registry import find_version

    logger = get_run_logger()
    store = Store()
    run_id = flow_run_id()
    png = store.write_bytes(
        loss_plot_png(run.history, f"{train.model_name}: {Path(run.uri).name}"),
        "runs", run_id, "finetune", "loss.png",
    )  # fmt: skip
    store.write_json(run.history, "runs", run_id, "finetune", "history.json")
    fmt = export_format(train)
    ref = find_version(store, train.model_name, checkpoint=run.checkpoint_uri, format=fmt)
    if ref is not None:
        logger.info("checkpoint %s is already registered as %s %s", run.checkpoint_uri,
                    ref.name, ref.version)  # fmt: skip
    else:
        ref = _export_and_register(store, train, dataset, base_model_uri, run, config, fmt, png)
    m = run.metrics
    create_table_artifact(
        key="finetune-loss",
        table=loss_table(run.history),
        description=f"Loss curve of {ref.name} {ref.version} ({Path(run.uri).name})",
    )
    create_markdown_artifact(
        key="finetune-report",
        markdown=(
            f"## {ref.name} {ref.version}\n\n"
            f"**model** `{ref.uri}` ({fmt}) · **base** `{base_model_uri}` · **dataset** "
            f"`{dataset.short_sha}`\n\n"
            f"steps {m['start_step']:.0f} → {m['steps']:.0f} ({m['steps_run']:.0f} this run) "
            f"on {run.device} x {run.world_size} · loss {m['train_loss_first']:.4f} → "
            f"{m['train_loss_last']:.4f}"
            + (f" · eval loss {m['eval_loss_last']:.4f}" if "eval_loss_last" in m else "")
            + f" · {m['tokens_per_s']:.0f} tokens/s · fit {m['fit_s']:.1f} s (start-up "
            f"{m['startup_s']:.1f} s)\n\n"
            f"Loss curve: [{png}]({png if '://' in png else 'file://' + png})\n\nTraining run (checkpoints): `{run.uri}`\n"
        ),
    )
    logger.info("registered %s %s at %s", ref.name, ref.version, ref.uri)
    return ref


def latest_if_same_data(store: Store, model_name: str, dataset_sha256: str) -> tuple[ModelRef | None, bool]:
    """(latest version of ``model_name`` or None, whether it was trained on this dataset)."""
    from llmflow.registry import list_versions

    versions = list_versions(store, model_name)
    latest = versions[-1] if versions else None
    return latest, latest is not None and latest.dataset_sha256 == dataset_sha256


@task(name="check-data-changed", cache_policy=NO_CACHE)
def trained_on_same_data(train: TrainConfig, dataset: DatasetRef) -> ModelRef | None:
    """The latest version of ``train.model_name`` when it was trained on this very dataset
    (same content hash), else None: the dataset hash decides whether to retrain."""
    from prefect import get_run_logger

    latest, same = latest_if_same_data(Store(), train.model_name, dataset.sha256)
    get_run_logger().info(
        "dataset %s; latest version %s: %s", dataset.short_sha,
        f"{latest.version} (dataset {latest.dataset_sha256 and latest.dataset_sha256[:16]})" if latest else "none",
        "same data: nothing to retrain" if same else "new data: retraining",
    )  # fmt: skip
    return latest if same else None


def check_inputs(train: TrainConfig, dataset: DatasetRef | None) -> None:
    """What finetune can check before any cluster work: the base model and the dataset."""
    from llmflow.basemodels import resolve_base_model

    if train.base_model != "tiny":
        uri = resolve_base_model(train)  # a missing local directory fails here
        if Path(uri).is_dir():
            check_causal_lm(uri)
    if dataset is not None:
        check_dataset(dataset)
