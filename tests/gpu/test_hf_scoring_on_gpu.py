"""The hf engine on a GPU: Ray Data's actor pool asks for a GPU, the model generates on CUDA,
and the trained tiny model scores far above the untrained one.

    .venv/bin/python -m pytest tests/gpu/test_hf_scoring_on_gpu.py -q

Skipped, with the reason, without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from llmflow.config import EvalConfig

N_EVAL = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from llmflow.store import Store

    return Store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def base_dir(store) -> str:
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    return resolve_base_model(TrainConfig(), store)


@pytest.fixture(scope="module")
def trained_dir(base_dir, tmp_path_factory) -> str:
    from llmflow.bundled import bundled_path, read_examples
    from tests.tiny_training import train_tiny

    rows = read_examples(bundled_path())[:-N_EVAL]
    return train_tiny(base_dir, tmp_path_factory.mktemp("trained"), rows, steps=300)


@pytest.fixture(scope="module")
def eval_dataset(store) -> str:
    from llmflow.bundled import bundled_path, read_examples
    from tests.tiny_training import write_eval_split

    return write_eval_split(store, read_examples(bundled_path())[-N_EVAL:], "hf-gpu", "g")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(
        address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="WARNING"
    )
    yield ray
    ray.shutdown()


def test_hf_engine_scores_on_the_gpu(local_ray, base_dir, trained_dir, eval_dataset, store):
    from llmflow.evaluate.scoring import score_dataset

    cfg = EvalConfig(engine="hf", batch_size=32, concurrency=1, max_new_tokens=12)
    base = score_dataset(cfg, base_dir, eval_dataset, store.uri("runs", "gpu", "base"))
    trained = score_dataset(cfg, trained_dir, eval_dataset, store.uri("runs", "gpu", "trained"))

    assert base.engine == trained.engine == "hf" and trained.num_examples == N_EVAL
    # Untrained, only special tokens come out; trained, digits, many exactly right.
    assert base.metrics["exact_match"] == 0.0, base.metrics
    assert trained.metrics["exact_match"] >= 0.2, trained.metrics
    assert trained.metrics["empty_generations"] < N_EVAL / 4
    assert trained.metrics["eval_loss"] < base.metrics["eval_loss"] - 1.0
    rows = pq.read_table(trained.predictions_uri).to_pylist()
    assert len(rows) == N_EVAL and rows[0]["id"] == "g000"
    # The engine gives each actor a GPU when the cluster has one, so its torch saw cuda.
    assert base.device == trained.device == "cuda", trained.device
