"""train.backend llamafactory on the session stack: LlamaFactory's SFT in the TorchTrainer's
workers (the .venv-llamafactory environment), through the whole pipeline to a served
model, and an interrupted run resumed from its checkpoint in the store.

    .venv/bin/python -m pytest tests/integration/test_llamafactory.py -q -x
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import (
    checkpoints,
    kill_worker_after_first_checkpoint,
    run_in_thread,
    unserve,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
NAME = "lf-test"
# LoRA on the tiny Llama: LlamaFactory's own arguments (template: the tokenizer's).
LORA = [
    "train.backend=llamafactory",
    "train.lora=true",
    "train.lora_rank=8",
    "train.learning_rate=0.01",
    "train.batch_size=16",
    "train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def app(stack):
    yield NAME
    unserve(NAME, NAME)  # free its replica's CPU for the tests after this module


def test_a_llamafactory_lora_run_is_registered_and_served_by_the_pipeline(stack, app):
    from flows.pipeline import pipeline

    config = load_config(
        "configs/tiny.yaml",
        [
            *LORA,
            "train.max_steps=30",
            "train.checkpoint_every=15",
            f"train.model_name={NAME}",
            f"serve.app_name={NAME}",
            "serve.route_prefix=/lf",
            "eval.max_examples=32",
            # 30 steps answer no row exactly, as the base: the lowered loss passes the gate.
            "gate.primary_metric=eval_loss",
        ],
    )
    state = pipeline(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    version = result["model"]["version"]
    ref = registry.get_version(Store(), NAME, version)
    m = ref.train_metrics
    assert m["start_step"] == 0 and m["steps"] == 30 and m["steps_run"] == 30, m
    assert m["train_loss_last"] < m["train_loss_first"] - 0.5, m  # LoRA learns the task
    manifest = json.loads((Path(ref.uri) / "manifest.json").read_text())
    assert manifest["train_config"]["backend"] == "llamafactory"
    assert manifest["format"] == "merged" and manifest["dataset"]["sha256"]
    # The run's checkpoints are LlamaFactory's (the HF Trainer's), kept in the store.
    assert (Path(manifest["checkpoint"]) / "trainer_state.json").is_file()
    assert (Path(manifest["checkpoint"]) / "adapter_model.safetensors").is_file()
    # Promoted (no champion before it) and served on the OpenAI endpoint.
    assert aliases.read_aliases(Store(), NAME)["champion"] == version
    served = httpx.get(f"{stack.serve_url}/lf/v1/models", timeout=30).json()["data"][0]
    assert served["version"] == version
    chat = httpx.post(
        f"{stack.serve_url}/lf/v1/chat/completions",
        json={"model": NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "12"}]},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1


def test_an_interrupted_llamafactory_run_resumes_from_its_checkpoint(stack):
    from flows.finetune import finetune
    from flows.prepare import prepare
    from llmflow.basemodels import resolve_base_model
    from llmflow.finetune.checks import TrainingError
    from llmflow.finetune.trainer import run_key

    long = [*LORA, "train.max_steps=120", "train.checkpoint_every=10", "train.model_name=lf-kill"]
    first = load_config("configs/tiny.yaml", [*long, "train.max_failures=0"])
    dataset = prepare(config=first)
    key = run_key(first.train, dataset.sha256, resolve_base_model(first.train))
    path = Path(Store().path("runs", f"finetune-{key}"))
    t, done, out = run_in_thread(first, dataset)
    kill_worker_after_first_checkpoint(path, done)
    t.join(timeout=600)
    state = out["state"]
    assert state.is_failed()
    with pytest.raises(TrainingError, match="failed"):
        state.result()
    assert checkpoints(path)

    # max_failures does not change the weights: the same run, resumed from its checkpoint.
    ref = finetune(config=load_config("configs/tiny.yaml", long), dataset=dataset)
    m = ref.train_metrics
    assert 0 < m["start_step"] < 120 and m["start_step"] % 10 == 0, m
    assert m["steps"] == 120 and m["steps_run"] == 120 - m["start_step"], m
    history = json.loads((Path(ref.uri) / "manifest.json").read_text())
    assert history["train_config"]["backend"] == "llamafactory"
