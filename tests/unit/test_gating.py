"""The gate policy: thresholds, margin over the champion, guardrails, directions."""

from __future__ import annotations

from llmflow.config import GateConfig
from llmflow.promote.gate import decide, decision_markdown, lower_is_better
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


def test_equal_is_enough_without_a_margin_but_worse_is_not():
    assert decide(GateConfig(), report(exact_match=0.5), report(exact_match=0.5)).passed
    d = decide(GateConfig(), report(exact_match=0.4), report(exact_match=0.5))
    assert not d.passed and "-0.1 < required margin 0" in rules(d)["primary:exact_match"][1]


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
        and "regression 0.05 > tolerance 0.02" in r["guardrail:rouge_l"][1]
    )
    assert r["guardrail:perplexity"][0] is True  # 0.2 worse, within 0.5


def test_missing_metric_fails_with_reason():
    d = decide(GateConfig(primary_metric="token_f1"), report(exact_match=1.0), None)
    assert not d.passed
    assert rules(d)["primary:token_f1"] == (False, "token_f1 is missing from the candidate report")


def test_direction_and_markdown():
    assert (
        lower_is_better("eval_loss")
        and lower_is_better("perplexity")
        and lower_is_better("latency_p95")
    )
    assert not lower_is_better("exact_match")
    md = decision_markdown(decide(GateConfig(), report(exact_match=0.1), report(exact_match=0.2)))
    assert "## Gate: FAILED" in md and "| primary:exact_match | FAIL |" in md
