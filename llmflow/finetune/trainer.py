"""Launching the TorchTrainer: scaling, failure handling, the run's storage in the store, and
resume from the latest checkpoint of a run with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from llmflow.config import ClusterConfig, TrainConfig
from llmflow.finetune.checks import (
    InsufficientResources,
    NonFiniteLoss,
    TrainingError,
    check_dataset,
    check_placeable,
    worker_resources,
)
from llmflow.finetune.loop import TRAIN_STATE, log, train_loop
from llmflow.refs import DatasetRef, TrainRun
from llmflow.store import Store

RESULT = "llmflow_result.json"  # a finished run's TrainRun, next to Ray Train's own files


# Fields of TrainConfig that do not change the weights a run produces: left out of the run's
# key, so changing them (say max_failures) still resumes the same run.
OPERATIONAL_FIELDS = frozenset(
    {
        "model_name",
        "merge_lora",
        "eval_every",
        "checkpoint_every",
        "checkpoints_to_keep",
        "max_failures",
        "cpus_per_worker",
        "resources_per_worker",
        # The same math with less memory: a run that ran out of it resumes with it turned on.
        "gradient_checkpointing",
    }
)


def run_key(train: TrainConfig, dataset_sha256: str, base_model_uri: str) -> str:
    """16 hex digits naming a training run: the same inputs give the same key (and resume)."""
    hyper = {k: v for k, v in train.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    raw = json.dumps(
        {"train": hyper, "dataset": dataset_sha256, "base": base_model_uri, "v": 1},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def resolve_epochs(train: TrainConfig, num_train: int) -> TrainConfig:
    """``train`` with ``epochs`` turned into ``max_steps`` for a train split of ``num_train``
    rows (unchanged without epochs): what the run, its key and its reuse count in."""
    if train.epochs is None:
        return train
    from llmflow.finetune.recipe import steps_for_epochs

    steps = steps_for_epochs(
        train.epochs, num_train, train.batch_size, train.grad_accum, train.num_workers
    )
    return train.model_copy(update={"max_steps": steps, "epochs": None})


# -- the launcher ----------------------------------------------------------------------------
def cuda_on_gpu_nodes() -> bool:
    """Whether a process holding one Ray GPU sees CUDA (a node may declare GPUs it lacks)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    ref = probe.remote()
    try:
        return bool(ray.get(ref, timeout=120))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise InsufficientResources(
            "train.use_gpu: no GPU of the Ray cluster came free in 120 s (Serve replicas or "
            "another run hold them: `llmflow models list` shows what is served)"
        ) from None


def run_training(
    train: TrainConfig,
    dataset: DatasetRef,
    base_model_uri: str,
    store: Store,
    progress_run: str | None = None,
    cluster: ClusterConfig | None = None,
) -> TrainRun:
    """Run (or resume) the TorchTrainer run of these inputs and return where it ended.
    ``cluster`` names the LlamaFactory environment (``train.backend: llamafactory``) and the
    env_vars its workers get.

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
    train = resolve_epochs(train, dataset.num_train)
    name = f"finetune-{run_key(train, dataset.sha256, base_model_uri)}"
    done = finished_run(store, name, train)
    if done is not None:
        return done
    check_placeable(train, ray.nodes())
    loop, loop_config, worker_env = train_loop, {}, None
    if train.backend == "llamafactory":
        loop, loop_config, worker_env = _llamafactory(
            train, dataset, base_model_uri, store, name, cluster
        )
    backend = "gloo"
    if train.use_gpu:
        if cuda_on_gpu_nodes():
            backend = "nccl"
        else:
            log.warning("train.use_gpu: the GPU node has no CUDA; workers use gloo and the CPU")
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "train": train.model_dump(mode="json"),
            "base_model": base_model_uri,
            "dataset_uri": dataset.uri,
            "progress_run": progress_run,  # rank 0 reports its steps (llmflow.progress)
            **loop_config,
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
            worker_runtime_env=worker_env,
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(
            f"training run {store.uri('runs', name)} failed (train.max_failures="
            f"{train.max_failures}): {type(exc).__name__}: {first}"
        ) from exc
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


def _llamafactory(
    train: TrainConfig,
    dataset: DatasetRef,
    base_model_uri: str,
    store: Store,
    name: str,
    cluster: ClusterConfig | None,
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """train.backend llamafactory: the workers' loop, its config (the LlamaFactory arguments,
    the dataset in its format) and their runtime_env (the LlamaFactory environment, with the
    cluster section's env_vars)."""
    from llmflow import engine_env
    from llmflow.finetune import llamafactory
    from llmflow.finetune.recipe import llamafactory_args

    config = {
        "args": llamafactory_args(train.model_dump(mode="json"), base_model_uri),
        "data_uri": llamafactory.write_dataset(store, dataset.uri, name),
        "use_gpu": train.use_gpu,
    }
    env = engine_env.runtime_env(cluster, engine_env.LLAMAFACTORY)
    return llamafactory.train_loop, config, env


def finished_run(store: Store, name: str, train: TrainConfig) -> TrainRun | None:
    """The stored TrainRun of run ``name`` if it reached ``train.max_steps`` and its last
    checkpoint is still in the store; None otherwise (the run then starts or resumes)."""
    import fsspec

    if not store.exists("runs", name, RESULT):
        return None
    run = TrainRun.model_validate(store.read_json("runs", name, RESULT))
    fs, path = fsspec.core.url_to_fs(run.checkpoint_uri)
    from llmflow.finetune.llamafactory import STATE_FILE

    marker = TRAIN_STATE if train.backend == "llmflow" else STATE_FILE
    if run.metrics.get("steps") != train.max_steps or not fs.exists(f"{path}/{marker}"):
        return None
    return run.model_copy(update={"reused": True})


def checkpoint_state(checkpoint_uri: str) -> dict[str, Any]:
    """The trainable weights kept in a training checkpoint directory."""
    import fsspec
    import torch

    with fsspec.open(f"{checkpoint_uri.rstrip('/')}/{TRAIN_STATE}", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)["model"]
