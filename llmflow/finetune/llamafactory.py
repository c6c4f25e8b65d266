"""``train.backend: llamafactory``: LlamaFactory's SFT inside llmflow's TorchTrainer workers.

llmflow launches the TorchTrainer as for its own loop (trainer.py: same ScalingConfig,
placement, FailureConfig, checkpoints in the store, resume); the workers run in the
LlamaFactory environment (``RunConfig(worker_runtime_env=...)`` of
``engine_env.runtime_env(cluster, LLAMAFACTORY)``: its transformers, peft and datasets clash
with the main venv's) and call LlamaFactory's ``run_exp`` there. The Ray Train worker has set up torch.distributed already (gloo or NCCL,
RANK/WORLD_SIZE/LOCAL_RANK in the environment), and the HF Trainer inside LlamaFactory
joins that process group, as in Ray Train's own transformers integration.

- Data: the driver writes the prepared train split as LlamaFactory's openai-messages
  ("sharegpt" with role/content tags) JSON lines, with its dataset_info.json entry, into the
  run's directory in the store (``write_dataset``); each worker copies it to local disk.
- Checkpoints: on each HF save, rank 0 reports LlamaFactory's checkpoint directory (adapter
  or full weights, optimizer, scheduler, trainer_state.json) plus llmflow's loss history to
  Ray Train (``ray.train.report``); the other ranks report with it, without a checkpoint.
- Resume: the latest Ray Train checkpoint becomes ``resume_from_checkpoint``: the HF Trainer
  restores weights, optimizer, scheduler and step, and skips the batches already seen.
- Export (the register task, main venv): PEFT loads the adapter on the base and merges it,
  or the full weights load as they are (``export_model``).

This module is imported in both environments: the LlamaFactory one runs ``train_loop``, the
main one the rest. Only the standard library at import time.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# A finished LlamaFactory checkpoint has this file (the HF Trainer writes it with the state).
STATE_FILE = "trainer_state.json"
HISTORY = "llmflow_history.json"
DATA_DIR = "llamafactory-data"
DATASET_FILE = "train.jsonl"


def dataset_info(file_name: str = DATASET_FILE) -> dict[str, Any]:
    """The dataset_info.json of the prepared split: OpenAI-style ``messages`` rows."""
    from llmflow.finetune.recipe import DATASET_NAME

    return {
        DATASET_NAME: {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }


def write_dataset(store, dataset_uri: str, run_name: str) -> str:
    """The prepared train split as LlamaFactory reads it, in the run's directory of the store
    (one JSON line a row, and dataset_info.json); returns that directory's URI. Written once
    per content: a resumed run finds it."""
    from llmflow.finetune.batches import read_rows

    if not store.exists("runs", run_name, DATA_DIR, "dataset_info.json"):
        rows = read_rows(dataset_uri, "train")
        lines = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows)
        store.write_bytes(lines.encode(), "runs", run_name, DATA_DIR, DATASET_FILE)
        store.write_json(dataset_info(), "runs", run_name, DATA_DIR, "dataset_info.json")
    return store.uri("runs", run_name, DATA_DIR)


# -- the Ray Train worker, in the LlamaFactory environment ---------------------------------------
def _local(uri: str, dest: Path) -> Path:
    """A directory of the store on local disk: itself when the store is local, else a copy
    at ``dest`` (``Store.download_dir``)."""
    from llmflow.store import Store

    return Store(uri).download_dir(uri, dest)


def _callback(rank: int, history: dict[str, list], cfg: dict[str, Any], times: dict):
    import ray.train
    from transformers import TrainerCallback

    from llmflow import progress

    class Report(TrainerCallback):
        """Loss history, progress, the NaN stop, and each checkpoint to Ray Train."""

        error: str | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            times["first_step"] = time.time()
            times["tokens_before"] = state.num_input_tokens_seen  # a resumed run's count

        def on_train_end(self, args, state, control, **kwargs):
            times["tokens"] = state.num_input_tokens_seen - times.get("tokens_before", 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                loss = float(logs["loss"])
                history["train"].append([state.global_step, loss, logs.get("learning_rate", 0.0)])
                if not math.isfinite(loss):
                    self.error = (
                        f"training loss became {loss} at step {state.global_step}: lower "
                        "train.learning_rate or check the data; the run keeps its checkpoints "
                        "from before that step"
                    )
                    control.should_training_stop = True
                    control.should_save = False
            if "eval_loss" in logs:
                history["eval"].append([state.global_step, float(logs["eval_loss"])])
            if rank == 0:
                progress.report(
                    cfg.get("progress_run"),
                    "train",
                    state.global_step,
                    state.max_steps,
                    final=state.global_step >= state.max_steps,
                )

        def on_save(self, args, state, control, **kwargs):
            checkpoint = None
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if rank == 0 and (saved / STATE_FILE).exists():
                (saved / HISTORY).write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(str(saved))
            metrics = {"step": state.global_step}
            if history["train"]:
                metrics["loss"] = history["train"][-1][1]
            ray.train.report(metrics, checkpoint=checkpoint)

    return Report()


def train_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker running LlamaFactory's SFT (in the LlamaFactory environment).

    ``cfg``: ``args`` (``llmflow.finetune.recipe.llamafactory_args``), ``data_uri`` (write_dataset's directory), ``progress_run``. Returns
    the same fields as llmflow's own loop (``llmflow.finetune.loop.train_loop``).
    """
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from llamafactory.train.tuner import run_exp

    from llmflow.engines import loadable_path

    t_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = Path(tempfile.mkdtemp(prefix="llmflow-llamafactory-"))
    args = dict(cfg["args"])
    args["dataset_dir"] = str(_local(cfg["data_uri"], work / "data"))
    args["output_dir"] = str(work / "out")
    args["model_name_or_path"] = loadable_path(args["model_name_or_path"])  # a remote store's
    history: dict[str, list] = {"train": [], "eval": []}
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        local = Path(ckpt.to_directory(str(work / "resume")))
        history = json.loads((local / HISTORY).read_text())
        start_step = int(json.loads((local / STATE_FILE).read_text())["global_step"])
        args["resume_from_checkpoint"] = str(local)
    times: dict[str, float] = {}
    report = _callback(rank, history, cfg, times)
    try:
        run_exp(args=args, callbacks=[report])
    finally:  # the checkpoints are in the store (report persists them before it returns)
        shutil.rmtree(work, ignore_errors=True)
    end_step = history["train"][-1][0] if history["train"] else start_step
    cuda = bool(cfg.get("use_gpu")) and torch.cuda.is_available()
    return {
        "history": history,
        "start_step": start_step,
        "end_step": end_step,
        "steps_run": end_step - start_step,
        "tokens": int(times.get("tokens", 0)),
        "train_s": time.time() - times.get("first_step", t_start),
        "t_start": t_start,
        "t_first_step": times.get("first_step", t_start),
        "device": f"cuda:{ctx.get_local_rank()}" if cuda else "cpu",
        "precision": "bf16" if args.get("bf16") else ("fp16" if args.get("fp16") else "fp32"),
        "world_size": world,
        "backend": dist.get_backend() if dist.is_initialized() else "none",
        "node_id": ray.get_runtime_context().get_node_id(),
        "error": report.error,
    }


# -- export, in the main venv ---------------------------------------------------------------------
def export_model(
    base_model_uri: str, checkpoint_uri: str, lora: bool, merge: bool, out_dir: Path, dtype=None
):
    """The final LlamaFactory checkpoint as a HF directory: the adapter merged into the base
    (``merge``), the adapter alone, or the full weights; the full or merged weights in
    ``dtype`` (export.export_dtype: the base's unless train.export_dtype says)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.basemodels import load_tokenizer
    from llmflow.engines import loadable_path

    with tempfile.TemporaryDirectory(prefix="llmflow-lf-export-") as tmp:
        ckpt = _local(checkpoint_uri, Path(tmp) / "ckpt")
        if lora:  # PEFT's own loading, from the safetensors file only
            from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
            from safetensors.torch import load_file

            base = AutoModelForCausalLM.from_pretrained(
                loadable_path(base_model_uri),
                dtype=torch.float32,
                use_safetensors=True,
                trust_remote_code=False,
            )
            config = json.loads((ckpt / "adapter_config.json").read_text())
            model = get_peft_model(base, PeftConfig.from_peft_type(**config))
            loaded = set_peft_model_state_dict(
                model, load_file(str(ckpt / "adapter_model.safetensors"))
            )
            if loaded.unexpected_keys:
                raise ValueError(
                    f"{checkpoint_uri}: the adapter does not fit the base model "
                    f"(unexpected {loaded.unexpected_keys[:3]})"
                )
            if merge:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
            )
        if dtype is not None and not (lora and not merge):
            model = model.to(dtype)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_model_uri).save_pretrained(out_dir)
