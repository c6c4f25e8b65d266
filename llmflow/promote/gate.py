"""The gate: a metric policy that decides whether a candidate may replace the champion.

`decide` is pure (tested without Prefect); tasks/promote.py's `gate` wraps it with an
artifact, and `ask_for_approval` adds the human decision in the Prefect UI.
"""

from __future__ import annotations

from llmflow.config import GateConfig
from llmflow.refs import EvalReport, GateDecision, GateRule

# Metrics where smaller is better; every other metric is taken as larger-is-better.
LOWER_IS_BETTER = ("eval_loss", "perplexity", "loss", "latency", "empty_generations")


def lower_is_better(metric: str) -> bool:
    return any(
        metric == m or metric.endswith(f"_{m}") or metric.startswith(f"{m}_")
        for m in LOWER_IS_BETTER
    )


def _improvement(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is (positive = better), whatever the metric's direction."""
    return reference - candidate if lower_is_better(metric) else candidate - reference


def decide(gate: GateConfig, candidate: EvalReport, champion: EvalReport | None) -> GateDecision:
    """Apply the policy: absolute thresholds, a margin over the champion on the primary
    metric, and guardrail metrics that may not regress beyond their tolerance.

    Returns:
        A GateDecision with one rule and reason per check; passed only if every rule passed.
    """
    rules: list[GateRule] = []
    cm = candidate.metrics

    def missing(name: str, metric: str, who: str) -> GateRule:
        return GateRule(
            name=name, passed=False, reason=f"{metric} is missing from the {who} report"
        )

    for metric, bound in sorted(gate.thresholds.items()):
        name = f"threshold:{metric}"
        if metric not in cm:
            rules.append(missing(name, metric, "candidate"))
            continue
        ok = cm[metric] <= bound if lower_is_better(metric) else cm[metric] >= bound
        op = "<=" if lower_is_better(metric) else ">="
        rules.append(
            GateRule(
                name=name,
                passed=ok,
                reason=f"{metric} {cm[metric]:.4g} {'meets' if ok else 'misses'} {op} {bound:.4g}",
            )
        )

    primary = gate.primary_metric
    name = f"primary:{primary}"
    if primary not in cm:
        rules.append(missing(name, primary, "candidate"))
    elif champion is None:
        rules.append(
            GateRule(
                name=name,
                passed=True,
                reason=f"no champion yet: {primary} {cm[primary]:.4g} is the first",
            )
        )
    elif primary not in champion.metrics:
        rules.append(missing(name, primary, "champion"))
    else:
        gain = _improvement(primary, cm[primary], champion.metrics[primary])
        ok = gain >= gate.min_improvement if gate.min_improvement > 0 else gain >= 0
        rules.append(
            GateRule(
                name=name,
                passed=ok,
                reason=(
                    f"{primary} {cm[primary]:.4g} vs champion {champion.metrics[primary]:.4g}: "
                    f"{'+' if gain >= 0 else ''}{gain:.4g} {'>=' if ok else '<'} required margin "
                    f"{gate.min_improvement:.4g}"
                ),
            )
        )

    for metric, tolerance in sorted(gate.guardrails.items()):
        name = f"guardrail:{metric}"
        if champion is None:
            rules.append(
                GateRule(name=name, passed=True, reason=f"no champion: {metric} not compared")
            )
            continue
        if metric not in cm:
            rules.append(missing(name, metric, "candidate"))
            continue
        if metric not in champion.metrics:
            rules.append(missing(name, metric, "champion"))
            continue
        regression = -_improvement(metric, cm[metric], champion.metrics[metric])
        ok = regression <= tolerance
        rules.append(
            GateRule(
                name=name,
                passed=ok,
                reason=(
                    f"{metric} {cm[metric]:.4g} vs champion {champion.metrics[metric]:.4g}: regression "
                    f"{max(regression, 0):.4g} {'<=' if ok else '>'} tolerance {tolerance:.4g}"
                ),
            )
        )

    return GateDecision(passed=all(r.passed for r in rules), rules=rules)


def decision_markdown(decision: GateDecision) -> str:
    lines = [
        f"## Gate: {'PASSED' if decision.passed else 'FAILED'}",
        "",
        "| rule | result | reason |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {r.name} | {'pass' if r.passed else 'FAIL'} | {r.reason} |" for r in decision.rules
    ]
    if decision.approved_by is not None or decision.comment:
        lines += ["", f"Human review: {decision.approved_by or '-'}: {decision.comment or ''}"]
    return "\n".join(lines)
