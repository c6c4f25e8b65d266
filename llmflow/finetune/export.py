"""A finished run becomes a registry version: the Hugging Face directory, its lineage, the
loss curve as a table and a plot.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path
from typing import Any

from llmflow.config import TrainConfig
from llmflow.finetune.loop import load_model, load_trainable_state
from llmflow.finetune.trainer import checkpoint_state
from llmflow.refs import DatasetRef, ModelRef, TrainRun
from llmflow.runs import flow_run_id
from llmflow.store import Store


def export_model(
    base_model_uri: str, state: dict[str, Any], train: TrainConfig, out_dir: Path
) -> str:
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
        model = model.merge_and_unload()  # in float32, then cast: one rounding, not two
    if fmt != "adapter":
        model = model.to(export_dtype(train, base_model_uri))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_model_uri).save_pretrained(out_dir)
    return fmt


def export_dtype(train: TrainConfig, base_model_uri: str):
    """The dtype a full or merged version is saved in: train.export_dtype, else the base's.
    A bf16 base (Qwen2.5, Phi-3) stays bf16: half the bytes in the store and in every
    replica's download (7.6 GB, not 15.3, for Phi-3-mini)."""
    import torch

    if train.export_dtype:
        return getattr(torch, train.export_dtype)
    return base_dtype(base_model_uri)


def base_dtype(base_model_uri: str):
    """The torch dtype the base model's config.json declares (``dtype``, or ``torch_dtype``
    as older transformers wrote it); float32 when it names none."""
    import json

    import torch

    from llmflow.engines import loadable_path

    path = Path(loadable_path(base_model_uri)) / "config.json"
    if not path.is_file():  # a hub id: its config.json from the hub cache
        from transformers import AutoConfig

        declared = AutoConfig.from_pretrained(base_model_uri, trust_remote_code=False).to_dict()
    else:
        declared = json.loads(path.read_text())
    name = declared.get("dtype") or declared.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def export_format(train: TrainConfig) -> str:
    """What ``export_model`` writes for this config: full, merged or adapter."""
    if not train.lora:
        return "full"
    return "merged" if train.merge_lora else "adapter"


# -- artifacts -------------------------------------------------------------------------------
def loss_table(history: dict[str, list], max_rows: int = 100) -> list[dict[str, Any]]:
    """Rows of the loss curve (at most ``max_rows``, evenly spaced, the last step kept)."""
    evals = {int(s): loss for s, loss in history["eval"]}
    train = history["train"]
    every = max(1, math.ceil(len(train) / max_rows))
    keep = [r for i, r in enumerate(train) if i % every == 0 or i == len(train) - 1]
    return [
        {
            "step": int(s),
            "train_loss": round(loss, 5),
            "lr": float(f"{lr:.3g}"),
            "eval_loss": round(evals[int(s)], 5) if int(s) in evals else None,
        }
        for s, loss, lr in keep
    ]


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
        run = functools.partial(
            subprocess.run, cwd=project_dir(), capture_output=True, text=True, timeout=10
        )
        sha = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


# -- Prefect tasks ---------------------------------------------------------------------------
def export_and_register(
    store: Store,
    train: TrainConfig,
    dataset: DatasetRef,
    base_model_uri: str,
    run: TrainRun,
    config: dict[str, Any] | None,
    fmt: str,
    loss_plot: str,
) -> ModelRef:
    """The run's final checkpoint as a HF directory, registered as the next version."""
    from llmflow.registry import register_version

    with tempfile.TemporaryDirectory(prefix="llmflow-export-") as tmp:
        if train.backend == "llamafactory":
            from llmflow.finetune import llamafactory

            dtype = export_dtype(train, base_model_uri)
            llamafactory.export_model(
                base_model_uri, run.checkpoint_uri, train.lora, train.merge_lora, Path(tmp), dtype
            )
        else:
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


def latest_if_same_data(
    store: Store, model_name: str, dataset_sha256: str
) -> tuple[ModelRef | None, bool]:
    """(latest version of ``model_name`` or None, whether it was trained on this dataset)."""
    from llmflow.registry import list_versions

    versions = list_versions(store, model_name)
    latest = versions[-1] if versions else None
    return latest, latest is not None and latest.dataset_sha256 == dataset_sha256
