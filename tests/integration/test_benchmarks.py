"""An lm-evaluation-harness task as a guardrail, scored through llmflow's engine on Ray Data:
the bundled llmflow_reverse task (local data, offline) on the session's trained tiny model and
on the untrained base. A candidate that lost the skill (the base, against the trained model as
champion) is refused by `gate.guardrails`; the trained one against the base passes. (~40 s:
two hf scoring jobs on the session's Ray and the harness's import.)"""

from __future__ import annotations

import pytest

from llmflow.config import ClusterConfig, GateConfig
from llmflow.config_eval import BenchmarksConfig
from llmflow.configfile import load_config
from llmflow.evaluate.benchmarks import run_benchmarks
from llmflow.evaluate.metrics import DIRECTIONS
from llmflow.evaluate.paired import compare
from llmflow.promote.gate import decide
from llmflow.refs import EvalReport

pytestmark = [pytest.mark.slow, pytest.mark.integration]

METRIC = "llmflow_reverse/exact_match"


def report(version: str, metrics: dict) -> EvalReport:
    return EvalReport(
        model_uri=version,
        model_version=version,
        dataset_sha256="d",
        engine="hf",
        metrics=metrics,
        num_examples=32,
    )


def test_a_candidate_that_lost_a_benchmark_skill_is_refused_by_its_guardrail(
    ray_on_stack, tiny_trained
):
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    eval_cfg = load_config("configs/tiny.yaml").eval.model_copy(update={"engine": "hf"})
    cfg = BenchmarksConfig(tasks=["llmflow/bundled/lm_eval/llmflow_reverse.yaml"])
    trained = run_benchmarks(cfg, eval_cfg, tiny_trained, ClusterConfig())
    base = run_benchmarks(cfg, eval_cfg, resolve_base_model(TrainConfig()), ClusterConfig())

    metrics, rows, directions = trained
    assert directions == {METRIC: "higher"} and len(rows) == 32
    assert [r["id"] for r in rows[:2]] == ["llmflow_reverse/0", "llmflow_reverse/1"]
    assert rows[0]["question"].startswith("Reverse this number: ")
    right = [r for r in rows if r[METRIC] == 1.0]
    assert right and all(r["generation"].strip() == r["reference"] for r in right)
    assert metrics[METRIC] == pytest.approx(len(right) / 32) and metrics[METRIC] > 0
    assert base[0][METRIC] < metrics[METRIC]  # the base model never learnt to reverse

    dirs = {**DIRECTIONS, **directions}
    gate = GateConfig(primary_metric=METRIC, policy="non-inferiority", guardrails={METRIC: 0.05})
    broken = compare(base[1], rows, dirs, candidate_version="base", champion_version="trained")
    refused = decide(gate, report("base", base[0]), report("trained", metrics), dirs, broken)
    assert not refused.passed
    rule = {r.name: r for r in refused.rules}[f"guardrail:{METRIC}"]
    assert not rule.passed and "tolerance 0.05" in rule.reason and "interval" in rule.reason

    better = compare(rows, base[1], dirs, candidate_version="trained", champion_version="base")
    passed = decide(gate, report("trained", metrics), report("base", base[0]), dirs, better)
    assert passed.passed, passed.reasons
