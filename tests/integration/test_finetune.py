"""Fine-tuning on the session stack: a real TorchTrainer run, resume, a killed worker and the
bad-input errors. (Placement on a second node, by GPU or custom resource: test_two_nodes.py.)

    .venv/bin/python -m pytest tests/integration/test_finetune.py -q -x
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llmflow.basemodels import ModelError
from llmflow.configfile import load_config
from llmflow.refs import DatasetRef
from llmflow.store import Store
from tests.integration.helpers import (
    checkpoints,
    kill_worker_after_first_checkpoint,
    run_in_thread,
    wait_for_logs,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Small enough for 2 CPU cores: the tiny Llama learns most of its loss drop in 40 steps.
TINY = [
    "train.max_steps=40",
    "train.checkpoint_every=10",
    "train.eval_every=20",
    "train.warmup_steps=5",
    "train.model_name=ft-test",
]
# Runs long enough to be killed between their first checkpoint and their end.
LONG = [
    "train.max_steps=200",
    "train.checkpoint_every=20",
    "train.eval_every=100",
    "train.warmup_steps=5",
    "train.model_name=ft-kill",
]


def cfg(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def dataset(stack) -> DatasetRef:
    from flows.prepare import prepare

    return prepare(config=cfg(*TINY))


def base_uri() -> str:
    from llmflow.basemodels import resolve_base_model

    return resolve_base_model(cfg().train)


def dataset_of(ref) -> DatasetRef:
    """The DatasetRef a registered version was trained on (its manifest keeps it)."""
    return DatasetRef.model_validate(
        json.loads((Path(ref.uri) / "manifest.json").read_text())["dataset"]
    )


def run_dir(config, dataset: DatasetRef) -> Path:
    from llmflow.finetune.trainer import run_key

    return Path(
        Store().path("runs", f"finetune-{run_key(config.train, dataset.sha256, base_uri())}")
    )


def test_finetune_lowers_the_loss_and_registers_a_loadable_version(stack, prefect_client):
    from transformers import AutoModelForCausalLM

    from flows.finetune import finetune

    state = finetune(config=cfg(*TINY), return_state=True)  # prepares the data itself (cached)
    assert state.is_completed(), state.message
    ref = state.result()
    m = ref.train_metrics
    assert m["start_step"] == 0 and m["steps"] == 40 and m["steps_run"] == 40
    assert m["train_loss_last"] < m["train_loss_first"] - 1.0, m  # about 5.8 -> 2.2 measured
    assert m["eval_loss_last"] < m["train_loss_first"] - 1.0, m

    path = Path(ref.uri)
    assert ref.name == "ft-test" and ref.version.startswith("v") and path.is_dir()
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt"))]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["flow_run_id"] == str(state.state_details.flow_run_id)
    assert manifest["dataset"]["sha256"] == ref.dataset_sha256
    assert manifest["train_config"]["max_steps"] == 40 and manifest["format"] == "full"
    assert manifest["git_commit"] and manifest["ref"]["base_model"] == ref.base_model
    assert Path(manifest["loss_plot"]).read_bytes()[:4] == b"\x89PNG"

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    artifacts = prefect_client.read_artifacts(flow_run_filter=run_filter)
    assert {"finetune-loss", "finetune-report"} <= {a.key for a in artifacts}

    # The same inputs again: the finished run is reused (no trainer starts) and its
    # checkpoint is already registered, so the same version comes back.
    from llmflow.finetune.trainer import RESULT

    stamp = (Path(run_dir(cfg(*TINY), dataset_of(ref))) / RESULT).stat().st_mtime_ns
    again = finetune(config=cfg(*TINY), return_state=True)
    assert again.result() == ref
    assert (Path(run_dir(cfg(*TINY), dataset_of(ref))) / RESULT).stat().st_mtime_ns == stamp
    wait_for_logs(
        prefect_client,
        again.state_details.flow_run_id,
        "reused the finished run",
        f"already registered as ft-test {ref.version}",
    )


def test_two_ddp_workers_with_grad_accum_train_a_lora_adapter_merged_on_export(stack, dataset):
    """The distributed path for real: 2 gloo workers (DDP), 2 micro-batches a step, LoRA."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flows.finetune import finetune

    config = cfg(
        "train.max_steps=30",
        "train.checkpoint_every=30",
        "train.eval_every=30",
        "train.warmup_steps=3",
        "train.model_name=ft-ddp",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.batch_size=8",
        "train.grad_accum=2",
        "train.lora=true",
        "train.lora_rank=16",
        "train.learning_rate=0.01",
    )
    ref = finetune(config=config, dataset=dataset)
    m = ref.train_metrics
    assert m["steps_run"] == 30 and m["train_loss_last"] < m["train_loss_first"] - 0.5, m
    manifest = json.loads((Path(ref.uri) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["format"] == "merged"
    assert manifest["train_config"]["grad_accum"] == 2
    weights = load_file(Path(ref.uri) / "model.safetensors")
    assert not [k for k in weights if "lora" in k]  # merged: a plain model directory
    base = load_file(Path(base_uri()) / "model.safetensors")
    changed = [k for k in base if k in weights and not (weights[k] == base[k]).all()]
    assert changed and all("proj" in k for k in changed), changed  # the adapted linears only
    assert AutoModelForCausalLM.from_pretrained(ref.uri).config.model_type == "llama"


def test_interrupted_run_resumes_from_its_latest_checkpoint(stack, dataset):
    from llmflow.finetune.checks import TrainingError

    first = cfg(*LONG, "train.weight_decay=0.001", "train.max_failures=0")
    path = run_dir(first, dataset)
    t, done, out = run_in_thread(first, dataset)
    kill_worker_after_first_checkpoint(path, done)
    t.join(timeout=300)
    state = out["state"]
    assert state.is_failed()
    with pytest.raises(TrainingError, match="failed"):
        state.result()
    kept = checkpoints(path)
    assert kept

    # max_failures does not change the weights, so this is the same run: it resumes.
    from flows.finetune import finetune

    ref = finetune(config=cfg(*LONG, "train.weight_decay=0.001"), dataset=dataset)
    m = ref.train_metrics
    assert 0 < m["start_step"] < 200 and m["start_step"] % 20 == 0, m
    assert m["steps"] == 200 and m["steps_run"] == 200 - m["start_step"]


# -- bad input -------------------------------------------------------------------------------
def test_missing_base_model_is_a_clear_error(stack, tmp_path):
    from flows.finetune import finetune

    with pytest.raises(ModelError, match=f"{tmp_path}/nope: no such model directory"):
        finetune(config=cfg(*TINY, f"train.base_model={tmp_path}/nope"))


def test_base_model_that_is_not_a_causal_lm_is_refused(stack, tmp_path):
    from transformers import BertConfig

    from flows.finetune import finetune

    BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        finetune(config=cfg(*TINY, f"train.base_model={tmp_path}"))


def test_missing_dataset_ref_is_refused(stack, dataset):
    from flows.finetune import finetune
    from llmflow.finetune.checks import DatasetNotFound

    gone = dataset.model_copy(update={"uri": Store().uri("datasets", "0" * 16)})
    with pytest.raises(DatasetNotFound, match="datasets/0000000000000000: no manifest.json"):
        finetune(config=cfg(*TINY), dataset=gone)


def test_more_workers_than_the_cluster_holds_fails_fast(stack, dataset):
    from flows.finetune import finetune
    from llmflow.errors import ConfigError

    t0 = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"^train.num_workers=64 .* needs 64 CPU, but the Ray "
        r"cluster has \d+ CPU in total",
    ):
        finetune(config=cfg(*TINY, "train.num_workers=64"), dataset=dataset)
    assert time.monotonic() - t0 < 60


def test_nan_loss_stops_the_run_and_names_the_step(stack, dataset):
    from flows.finetune import finetune
    from llmflow.finetune.checks import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"loss became (nan|inf) at step \d+"):
        finetune(
            config=cfg(*TINY, "train.learning_rate=1e30", "train.max_steps=10"), dataset=dataset
        )
