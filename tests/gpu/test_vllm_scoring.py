"""The vllm engine for real: ray.data.llm's vLLM processor, built by llmflow/engines/vllm.py,
scores a model on a GPU through llmflow/evaluate/scoring.py, and the report's metrics are computed.

    .venv/bin/python -m pytest tests/gpu/test_vllm_scoring.py -q -rs

The model is the tiny Llama, briefly trained so that it answers with text, or the local
Hugging Face directory named by LLMFLOW_GPU_TEST_MODEL (a small chat model). The engine runs
in the CUDA variant of the vLLM engine environment (LLMFLOW_VLLM_PYTHON, or .venv-vllm built
by `make install` on a GPU machine). Skipped, with the reason, without CUDA
(tests/gpu/conftest.py) or without that environment; its CPU twin is
tests/integration/test_vllm.py, which runs in `make test`.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from llmflow import engine_env
from llmflow.config import EvalConfig

_ENV = engine_env.probe()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _ENV.healthy or _ENV.dist != "vllm",
        reason=f"needs the CUDA vLLM engine environment ({_ENV.problem or _ENV.dist})",
    ),
]
N_EVAL = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from llmflow.store import Store

    return Store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def model_dir(store, tmp_path_factory) -> str:
    """LLMFLOW_GPU_TEST_MODEL, else the tiny model after 150 steps (it answers with digits)."""
    given = os.environ.get("LLMFLOW_GPU_TEST_MODEL")
    if given:
        return given
    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import bundled_path, read_examples
    from llmflow.config import TrainConfig
    from tests.tiny_training import train_tiny

    base = resolve_base_model(TrainConfig(), store)
    rows = read_examples(bundled_path())[:-N_EVAL]
    return train_tiny(base, tmp_path_factory.mktemp("trained"), rows, steps=150)


@pytest.fixture(scope="module")
def eval_dataset(store) -> str:
    """A prepared-format dataset directory whose eval.parquet holds N_EVAL bundled rows."""
    from llmflow.bundled import bundled_path, read_examples
    from tests.tiny_training import write_eval_split

    return write_eval_split(store, read_examples(bundled_path())[-N_EVAL:], "vllm-test", "g")


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray instance that sees this machine's GPU."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_vllm_engine_scores_a_model_on_the_gpu(local_ray, model_dir, eval_dataset, store):
    from llmflow.evaluate.scoring import score_dataset

    cfg = EvalConfig(
        engine="vllm",
        batch_size=16,
        concurrency=1,
        max_new_tokens=12,
        # Small and quick to start: a short context, no CUDA graphs, a share of the GPU.
        vllm_engine_kwargs={
            "max_model_len": 512,
            "enforce_eager": True,
            "gpu_memory_utilization": 0.3,
        },
    )
    report = score_dataset(cfg, model_dir, eval_dataset, store.uri("runs", "gpu", "vllm"))

    assert report.engine == "vllm" and report.num_examples == N_EVAL
    for name in (
        "exact_match",
        "normalized_exact_match",
        "token_f1",
        "rouge_l",
        "bleu",
        "eval_loss",
        "perplexity",
        "truncated_prompts",
        "empty_generations",
    ):
        assert name in report.metrics and report.metrics[name] == report.metrics[name], name
    assert 0.0 <= report.metrics["exact_match"] <= 1.0 and report.metrics["perplexity"] > 1.0
    assert report.throughput["examples_per_s"] > 0 and report.throughput["tokens_per_s"] > 0

    rows = pq.read_table(report.predictions_uri).to_pylist()
    assert len(rows) == N_EVAL and rows[0]["id"] == "g000"
    assert all(isinstance(r["generation"], str) and r["generation"].strip() for r in rows), rows
    assert all(r["num_prompt_tokens"] > 0 and 1 <= r["num_generated_tokens"] <= 12 for r in rows)
    assert report.metrics["empty_generations"] == 0
