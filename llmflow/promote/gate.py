"""The gate: a metric policy that decides whether a candidate may replace the champion.

`decide` is pure (tested without Prefect); tasks/promote.py's `gate` wraps it with an
artifact, and `ask_for_approval` adds the human decision in the Prefect UI.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmflow.config import GateConfig
from llmflow.errors import ConfigError
from llmflow.evaluate.metrics import DIRECTIONS, LOWER
from llmflow.refs import Comparison, EvalReport, GateDecision, GateRule, MetricComparison


def gated_metrics(gate: GateConfig) -> list[tuple[str, str]]:
    """(config key, metric) of every metric the policy names."""
    return [
        ("gate.primary_metric", gate.primary_metric),
        *((f"gate.thresholds.{m}", m) for m in sorted(gate.thresholds)),
        *((f"gate.guardrails.{m}", m) for m in sorted(gate.guardrails)),
    ]


def check_directions(gate: GateConfig, directions: Mapping[str, str]) -> None:
    """Every metric the policy names declares its direction (a hub benchmark's metrics, known
    once it ran, stand as ``<task>/*``); else one line naming the key."""
    for key, metric in gated_metrics(gate):
        if metric not in directions and f"{metric.split('/', 1)[0]}/*" not in directions:
            known = ", ".join(sorted(directions))
            raise ConfigError(f"{key}: {metric!r} is not a metric with a direction ({known})")


def decide(
    gate: GateConfig,
    candidate: EvalReport,
    champion: EvalReport | None,
    directions: Mapping[str, str] = DIRECTIONS,
    comparison: Comparison | None = None,
) -> GateDecision:
    """Apply the policy: absolute thresholds, the primary metric against the champion
    (``gate.policy``), and guardrail metrics that may not regress beyond their tolerance. Each
    metric's direction (higher or lower is better) is the one it declares (``directions``).

    With a ``comparison`` (the two models' per-row scores on the same rows) the primary metric
    and the guardrails are judged by its interval of the improvement, so a tie or a gain within
    noise does not pass superiority; a metric it lacks is judged by the two means alone, and
    the reason says so.

    Returns:
        A GateDecision with one rule and reason per check; passed only if every rule passed.
    """
    check_directions(gate, directions)
    rules: list[GateRule] = []
    cm = candidate.metrics

    def lower_is_better(metric: str) -> bool:
        return directions[metric] == LOWER

    def _improvement(metric: str, cand: float, reference: float) -> float:
        """How much better the candidate is (positive = better), in the metric's direction."""
        return reference - cand if lower_is_better(metric) else cand - reference

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
        paired = comparison.metrics.get(primary) if comparison else None
        gain = _improvement(primary, cm[primary], champion.metrics[primary])
        rules.append(_primary_rule(gate, name, primary, cm[primary], champion, paired, gain))

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
        paired = comparison.metrics.get(metric) if comparison else None
        vs = f"{metric} {cm[metric]:.4g} vs champion {champion.metrics[metric]:.4g}"
        if paired is not None and paired.low is not None:
            worst = -paired.low  # the largest regression the interval allows
            ok = worst <= tolerance
            reason = (
                f"{vs}: {paired.interval(gate.confidence)}: worst regression {max(worst, 0):.4g} "
                f"{'<=' if ok else '>'} tolerance {tolerance:.4g}"
            )
        else:
            regression = -_improvement(metric, cm[metric], champion.metrics[metric])
            ok = regression <= tolerance
            reason = (
                f"{vs}: regression {max(regression, 0):.4g} {'<=' if ok else '>'} tolerance "
                f"{tolerance:.4g} (no per-row scores: no interval)"
            )
        rules.append(GateRule(name=name, passed=ok, reason=reason))

    return GateDecision(passed=all(r.passed for r in rules), rules=rules)


def _primary_rule(
    gate: GateConfig,
    name: str,
    metric: str,
    value: float,
    champion: EvalReport,
    paired: MetricComparison | None,
    gain: float,
) -> GateRule:
    """The primary metric under the policy: the interval's lower bound above min_improvement
    (superiority) or at or above -max_regression (non-inferiority); without per-row scores,
    ``gain`` (the means' difference in the metric's direction) stands for the bound."""
    superiority = gate.policy == "superiority"
    bound = gate.min_improvement if superiority else -gate.max_regression
    vs = f"{metric} {value:.4g} vs champion {champion.metrics[metric]:.4g}"
    if paired is not None and paired.low is not None:
        low, what = paired.low, paired.interval(gate.confidence)
    else:  # no per-row scores (or one row): the means alone decide
        low = gain
        what = f"{low:+.4g} (no per-row scores: no interval)"
    ok = low > bound if superiority else low >= bound
    if superiority:
        verdict = "lower bound above" if ok else "does not exclude"
        need = f"{verdict} the required margin {bound:+.3g}"
    else:
        need = f"lower bound {'at or above' if ok else 'below'} the allowed regression {bound:+.3g}"
    return GateRule(name=name, passed=ok, reason=f"{vs}: {what}: {need} ({gate.policy})")


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
