"""Batch scoring end to end on the local Ray head: the tiny model, untrained and briefly
trained, scored through Ray Data; predictions file, metrics, throughput and bad inputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmflow.config import EvalConfig
from tests.integration.helpers import N_EVAL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(stack):
    from llmflow.store import Store

    return Store()


@pytest.fixture(scope="module")
def eval_dataset(eval_split) -> str:
    return eval_split  # the session's: the last N_EVAL bundled examples (conftest.py)


@pytest.fixture(scope="module")
def tiny_base(store) -> str:
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    return resolve_base_model(TrainConfig(), store)


CFG = EvalConfig(engine="hf", batch_size=16, concurrency=1, max_new_tokens=12)


def test_scoring_the_untrained_then_the_trained_tiny_model(
    ray_on_stack, eval_dataset, tiny_base, tiny_trained, store
):
    from llmflow.evaluate.compare import comparison_rows, worst_examples
    from llmflow.evaluate.scoring import score_dataset

    before = score_dataset(CFG, tiny_base, eval_dataset, store.uri("runs", "t", "base"))
    after = score_dataset(CFG, tiny_trained, eval_dataset, store.uri("runs", "t", "trained"))

    for report in (before, after):
        assert report.engine == "hf" and report.num_examples == N_EVAL
        assert report.device == "cpu"
        assert {
            "exact_match",
            "normalized_exact_match",
            "token_f1",
            "rouge_l",
            "bleu",
            "eval_loss",
            "perplexity",
            "truncated_prompts",
            "empty_generations",
        } <= set(report.metrics)
        assert report.throughput["examples_per_s"] > 0 and report.throughput["tokens_per_s"] > 0
        assert 0 < report.throughput["latency_p50_s"] <= report.throughput["latency_p95_s"]
        assert report.throughput["batches"] == N_EVAL / CFG.batch_size
        assert report.metrics["truncated_prompts"] == 0

    # Untrained: only special tokens come out, every generation is empty, EM is 0.
    assert before.metrics["exact_match"] == 0.0
    assert before.metrics["empty_generations"] == N_EVAL
    # 150 steps: digits come out, some exactly right; loss and perplexity fall a lot.
    assert after.metrics["empty_generations"] < N_EVAL / 4
    assert after.metrics["exact_match"] >= 0.05
    assert after.metrics["eval_loss"] < before.metrics["eval_loss"] - 1.0
    assert after.metrics["perplexity"] < before.metrics["perplexity"]
    # The hf actors computed the loss in the generation pass; the separate loss job agrees.
    from llmflow.evaluate.scoring import eval_loss

    separate, _ = eval_loss(CFG, tiny_trained, eval_dataset)
    assert after.metrics["eval_loss"] == pytest.approx(separate["eval_loss"], rel=1e-3)
    assert after.metrics["eval_loss_tokens"] == separate["eval_loss_tokens"]

    table = pq.read_table(after.predictions_uri)
    assert after.predictions_uri.endswith("runs/t/trained/predictions.parquet")
    assert table.num_rows == N_EVAL and table.column("id").to_pylist()[0] == "e000"
    rows = table.to_pylist()
    assert all(r["generation"] == r["generation"].strip() or r["generation"] for r in rows)
    assert sum(r["exact_match"] for r in rows) / N_EVAL == pytest.approx(
        after.metrics["exact_match"]
    )
    right = [r for r in rows if r["exact_match"] == 1.0]
    assert all(r["generation"].strip() == r["reference"] for r in right)
    assert all(r["question"] and r["reference"].isdigit() for r in rows)
    assert not any(p.name.startswith(".tmp-") for p in Path(after.predictions_uri).parent.iterdir())

    md = worst_examples(table, k=5)
    assert md.count("\n| e") == 5 and "worst of 64" in md
    cmp = {r["name"]: r for r in comparison_rows(after, before)}
    assert cmp["exact_match"]["better"] == "yes" and cmp["eval_loss"]["better"] == "yes"


def test_extra_metric_and_max_examples(ray_on_stack, eval_dataset, tiny_trained, store):
    from llmflow.evaluate.scoring import score_dataset

    cfg = CFG.model_copy(
        update={"max_examples": 20, "extra_metrics": ["llmflow.evaluate.metrics:rouge_l"]}
    )
    with pytest.raises(Exception, match="is a module path"):
        score_dataset(cfg, tiny_trained, eval_dataset, store.uri("runs", "t", "x"))
    # examples/metrics-plugin's, by its registered name, in the Ray Data workers too.
    cfg = CFG.model_copy(update={"max_examples": 20, "extra_metrics": ["shouting_match"]})
    report = score_dataset(
        cfg, tiny_trained, eval_dataset, store.uri("runs", "t", "x"), with_loss=False
    )
    assert report.num_examples == 20 and "shouting_match" in report.metrics
    assert "eval_loss" not in report.metrics


def test_bad_inputs_fail_with_one_clear_line(ray_on_stack, tiny_base, store, tmp_path):
    import shutil

    from llmflow.basemodels import ModelError
    from llmflow.evaluate.eval_split import EvalDataError
    from llmflow.evaluate.scoring import score_dataset
    from llmflow.prepare.dataset import parquet_bytes

    store.write_bytes(parquet_bytes([]), "datasets", "empty", "eval.parquet")
    with pytest.raises(EvalDataError, match=r"empty/eval.parquet: eval split is empty \(0 rows\)"):
        score_dataset(CFG, tiny_base, store.uri("datasets", "empty"), str(tmp_path / "o"))
    with pytest.raises(EvalDataError, match="eval split not found"):
        score_dataset(CFG, tiny_base, str(tmp_path / "nodata"), str(tmp_path / "o"))
    broken = tmp_path / "model"
    shutil.copytree(tiny_base, broken)
    (broken / "config.json").unlink()
    with pytest.raises(ModelError, match=r"model: model directory is missing config.json") as e:
        score_dataset(CFG, str(broken), store.uri("datasets", "empty"), str(tmp_path / "o"))
    assert "\n" not in str(e.value)
