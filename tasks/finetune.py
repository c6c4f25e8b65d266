"""Prefect tasks of the finetune stage: train-model (the TorchTrainer run of
llmflow/finetune/trainer.py, resumed when its inputs match an earlier run), register-model
(the HF export, the registry version with lineage, the loss curve as artifacts) and
check-data-changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options

from llmflow.config import ClusterConfig, PipelineConfig, TrainConfig
from llmflow.finetune.export import (
    export_and_register,
    export_format,
    latest_if_same_data,
    loss_plot_png,
    loss_table,
)
from llmflow.finetune.trainer import run_training
from llmflow.progress import listening
from llmflow.refs import DatasetRef, ModelRef, TrainRun
from llmflow.runs import flow_run_id
from llmflow.store import Store
from llmflow.terminal import stage


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(
    train: TrainConfig,
    dataset: DatasetRef,
    base_model_uri: str,
    cluster: ClusterConfig | None = None,
) -> TrainRun:
    """Run the TorchTrainer (resuming an earlier run of the same inputs); no retries here:
    Ray Train's FailureConfig replaces failed workers, and a re-run resumes anyway."""
    from prefect import get_run_logger

    logger = get_run_logger()
    run = run_training(
        train, dataset, base_model_uri, Store(), progress_run=flow_run_id(), cluster=cluster
    )
    m = run.metrics
    if run.reused:
        logger.info(
            "reused the finished run %s (%d steps, loss %.4f -> %.4f): nothing to train",
            run.uri,
            m["steps"],
            m["train_loss_first"],
            m["train_loss_last"],
        )
        return run
    logger.info(
        "trained %s: steps %d..%d (%d run) on %s, loss %.4f -> %.4f, %.0f tokens/s, "
        "fit %.1f s (start-up %.1f s)",
        run.uri,
        m["start_step"],
        m["steps"],
        m["steps_run"],
        run.device,
        m["train_loss_first"],
        m["train_loss_last"],
        m["tokens_per_s"],
        m["fit_s"],
        m["startup_s"],
    )
    return run


@task(name="register-model", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def register_model(
    train: TrainConfig,
    dataset: DatasetRef,
    base_model_uri: str,
    run: TrainRun,
    config: dict[str, Any] | None = None,
) -> ModelRef:
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
        "runs",
        run_id,
        "finetune",
        "loss.png",
    )
    store.write_json(run.history, "runs", run_id, "finetune", "history.json")
    fmt = export_format(train)
    ref = find_version(store, train.model_name, checkpoint=run.checkpoint_uri, format=fmt)
    if ref is not None:
        logger.info(
            "checkpoint %s is already registered as %s %s",
            run.checkpoint_uri,
            ref.name,
            ref.version,
        )
    else:
        ref = export_and_register(store, train, dataset, base_model_uri, run, config, fmt, png)
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


@task(name="check-data-changed", cache_policy=NO_CACHE)
def trained_on_same_data(train: TrainConfig, dataset: DatasetRef) -> ModelRef | None:
    """The latest version of ``train.model_name`` when it was trained on this very dataset
    (same content hash), else None: the dataset hash decides whether to retrain."""
    from prefect import get_run_logger

    latest, same = latest_if_same_data(Store(), train.model_name, dataset.sha256)
    get_run_logger().info(
        "dataset %s; latest version %s: %s",
        dataset.short_sha,
        f"{latest.version} (dataset {latest.dataset_sha256 and latest.dataset_sha256[:16]})"
        if latest
        else "none",
        "same data: nothing to retrain" if same else "new data: retraining",
    )
    return latest if same else None


def finetune_stage(
    config: PipelineConfig, dataset: DatasetRef, model_uri: str
) -> tuple[TrainRun, ModelRef]:
    """train-model, then register-model: (the training run, the registered version)."""
    # The trainer's workers hold the resources; the terminal draws their steps (progress).
    with listening(flow_run_id()) as steps, remote_options(num_cpus=0, num_gpus=0):
        run = steps.wait(
            train_model.submit(config.train, dataset, model_uri, config.cluster), "train", "train"
        )
    lineage = config.model_dump(mode="json")
    ref = register_model.submit(config.train, dataset, model_uri, run, lineage).result()
    stage("finetune", train_line(ref, run))
    return run, ref


def train_line(ref: ModelRef, run: TrainRun) -> str:
    m = run.metrics
    how = "reused a finished run" if run.reused else f"{m.get('fit_s', 0):.0f} s on {run.device}"
    return (
        f"{ref.name}:{ref.version}: loss {m.get('train_loss_first', float('nan')):.3f} -> "
        f"{m.get('train_loss_last', float('nan')):.3f} in {m.get('steps', 0):.0f} steps ({how})"
    )
