"""The gate policy: thresholds, the primary metric under superiority or non-inferiority (the
means alone here; with per-row intervals in test_paired.py), guardrails, directions."""

from __future__ import annotations

import pytest

from llmflow.config import GateConfig
from llmflow.errors import ConfigError
from llmflow.evaluate.metrics import DIRECTIONS, metric_directions
from llmflow.promote.gate import decide, decision_markdown
from llmflow.refs import EvalReport


def report(**metrics: float) -> EvalReport:
    return EvalReport(
        model_uri="m",
        model_version="1",
        dataset_sha256="d",
        engine="hf",
        metrics=metrics,
        num_examples=10,
    )


def rules(decision):
    return {r.name: (r.passed, r.reason) for r in decision.rules}


def test_first_candidate_passes_without_champion():
    d = decide(GateConfig(), report(exact_match=0.3), None)
    assert d.passed
    assert rules(d)["primary:exact_match"] == (
        True,
        "no champion yet: exact_match 0.3 is the first",
    )


def test_candidate_must_beat_champion_by_the_margin():
    cfg = GateConfig(min_improvement=0.05)
    assert not decide(cfg, report(exact_match=0.52), report(exact_match=0.5)).passed
    d = decide(cfg, report(exact_match=0.56), report(exact_match=0.5))
    assert d.passed
    assert rules(d)["primary:exact_match"][1].startswith("exact_match 0.56 vs champion 0.5: +0.06")


def test_a_tie_does_not_pass_superiority_but_passes_non_inferiority():
    tie = report(exact_match=0.5), report(exact_match=0.5)
    d = decide(GateConfig(), *tie)
    assert not d.passed
    assert rules(d)["primary:exact_match"][1] == (
        "exact_match 0.5 vs champion 0.5: +0 (no per-row scores: no interval): does not "
        "exclude the required margin +0 (superiority)"
    )
    assert decide(GateConfig(policy="non-inferiority"), *tie).passed
    worse = report(exact_match=0.4), report(exact_match=0.5)
    d = decide(GateConfig(policy="non-inferiority", max_regression=0.05), *worse)
    assert (
        not d.passed and "below the allowed regression -0.05" in rules(d)["primary:exact_match"][1]
    )
    assert decide(GateConfig(policy="non-inferiority", max_regression=0.1), *worse).passed


def test_thresholds_respect_direction():
    cfg = GateConfig(thresholds={"exact_match": 0.5, "eval_loss": 1.0})
    d = decide(cfg, report(exact_match=0.6, eval_loss=1.2), None)
    assert not d.passed
    assert rules(d)["threshold:exact_match"] == (True, "exact_match 0.6 meets >= 0.5")
    assert rules(d)["threshold:eval_loss"] == (False, "eval_loss 1.2 misses <= 1")


def test_guardrail_regression_beyond_tolerance_fails():
    cfg = GateConfig(guardrails={"rouge_l": 0.02, "perplexity": 0.5})
    cand = report(exact_match=0.7, rouge_l=0.75, perplexity=3.2)
    champ = report(exact_match=0.6, rouge_l=0.80, perplexity=3.0)
    d = decide(cfg, cand, champ)
    assert not d.passed
    r = rules(d)
    assert (
        r["guardrail:rouge_l"][0] is False
        and "regression 0.05 > tolerance 0.02 (no per-row scores" in r["guardrail:rouge_l"][1]
    )
    assert r["guardrail:perplexity"][0] is True  # 0.2 worse, within 0.5


def test_missing_metric_fails_with_reason():
    d = decide(GateConfig(primary_metric="token_f1"), report(exact_match=1.0), None)
    assert not d.passed
    assert rules(d)["primary:token_f1"] == (False, "token_f1 is missing from the candidate report")


def test_each_metric_is_gated_in_the_direction_it_declares():
    # lower is better for eval_loss: a candidate whose loss rose fails, one whose loss fell passes
    cfg = GateConfig(primary_metric="eval_loss")
    assert not decide(cfg, report(eval_loss=2.0), report(eval_loss=1.0)).passed
    assert decide(cfg, report(eval_loss=1.0), report(eval_loss=2.0)).passed
    # a plugged-in metric that declares lower-is-better, by name in the directions it passes
    cfg = GateConfig(primary_metric="edit_distance")
    down = {**DIRECTIONS, "edit_distance": "lower"}
    assert decide(cfg, report(edit_distance=3.0), report(edit_distance=5.0), down).passed
    with pytest.raises(ConfigError, match=r"^gate.primary_metric: 'edit_distance' is not a metric"):
        decide(cfg, report(edit_distance=3.0), report(edit_distance=5.0))
    with pytest.raises(ConfigError, match=r"^gate.guardrails.latency: 'latency' is not a metric"):
        decide(GateConfig(guardrails={"latency": 0.1}), report(exact_match=1.0), None)


def test_extra_metrics_declare_their_direction_on_the_function():
    dirs = metric_directions(["edit_distance", "shouting_match"])  # examples/metrics-plugin
    assert dirs["edit_distance"] == "lower" and dirs["shouting_match"] == "higher"
    assert dirs["eval_loss"] == "lower" and dirs["exact_match"] == "higher"


def test_decision_markdown():
    md = decision_markdown(decide(GateConfig(), report(exact_match=0.1), report(exact_match=0.2)))
    assert "## Gate: FAILED" in md and "| primary:exact_match | FAIL |" in md
