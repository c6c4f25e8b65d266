"""Canary promotion's logic: which version a request goes to, each version's request
statistics, the verdict on a step, and the per-step table. Plain functions, no Ray: the
router (deployments/canary_router.py) and the promote tasks share them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

from llmflow.config_serve import RolloutPolicy
from llmflow.refs import CanaryStep

CHAMPION, CANDIDATE = "champion", "candidate"


def internal_app(app_name: str, role: str) -> str:
    """The Serve app name of one side of a canary: the public app's name and the role."""
    return f"{app_name}--{role}"


PASS, WAIT, ROLLBACK = "pass", "wait", "rollback"


def bucket(user: str) -> int:
    """A stable 0..99 for an OpenAI ``user`` (sha256, not hash(): stable across processes and
    restarts), so a user below the candidate's weight at 10% stays on it at 50%."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % 100


def choose(weight: int, user: str | None, rng: random.Random | None = None) -> str:
    """CANDIDATE or CHAMPION for one request at the candidate's ``weight`` percent: sticky by
    ``user`` when the request names one, else random by weight."""
    if weight <= 0:
        return CHAMPION
    if weight >= 100:
        return CANDIDATE
    draw = bucket(user) if user else (rng or random).randrange(100)
    return CANDIDATE if draw < weight else CHAMPION


def summarize(requests: int, errors: int, latencies_s: Iterable[float]) -> dict[str, float]:
    """requests, errors, error_rate, p50_ms and p99_ms of one version in one step (p50/p99 0
    when there were no requests)."""
    from llmflow.evaluate.scoring import percentile

    lat = list(latencies_s)
    p50, p99 = (percentile(lat, 50), percentile(lat, 99)) if lat else (0.0, 0.0)
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 4) if requests else 0.0,
        "p50_ms": round(p50 * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
    }


@dataclass(frozen=True)
class Verdict:
    decision: str  # PASS, WAIT or ROLLBACK
    reason: str


def judge(
    policy: RolloutPolicy,
    champion: dict[str, float],
    candidate: dict[str, float],
    elapsed_s: float,
    baseline_p99_ms: float | None = None,
) -> Verdict:
    """The verdict on a step so far.

    Args:
        policy: serve.rollout.
        champion, candidate: ``summarize`` of each version's requests in this step.
        elapsed_s: seconds since the step's weight was live.
        baseline_p99_ms: the champion's p99 of an earlier step, for a step where the
            champion had no requests (100%).

    Returns:
        ROLLBACK as soon as the candidate has min_requests and errs more than the champion
        plus max_error_rate (a failing candidate is not left to fail for the whole step), or
        when min_requests did not come within max_wait_s; WAIT until step_s has passed and
        min_requests came; then ROLLBACK on a p99 ratio over max_p99_ratio, else PASS.
    """
    n = int(candidate.get("requests", 0))
    excess = candidate.get("error_rate", 0.0) - champion.get("error_rate", 0.0)
    if n >= policy.min_requests and excess > policy.max_error_rate:
        return Verdict(
            ROLLBACK,
            f"candidate error rate {candidate['error_rate']:.1%} over {n} requests vs "
            f"champion {champion.get('error_rate', 0.0):.1%} "
            f"(allowed excess {policy.max_error_rate:.1%})",
        )
    if n < policy.min_requests:
        if elapsed_s >= max(policy.max_wait_s, policy.step_s):
            return Verdict(
                ROLLBACK,
                f"not enough traffic: {n} candidate requests in {elapsed_s:.0f}s "
                f"(min_requests {policy.min_requests})",
            )
        return Verdict(WAIT, f"{n} of {policy.min_requests} candidate requests")
    if elapsed_s < policy.step_s:
        return Verdict(WAIT, f"{elapsed_s:.0f}s of {policy.step_s:.0f}s")
    base = champion.get("p99_ms") if champion.get("requests") else baseline_p99_ms
    if base:
        ratio = candidate.get("p99_ms", 0.0) / base
        if ratio > policy.max_p99_ratio:
            return Verdict(
                ROLLBACK,
                f"candidate p99 {candidate['p99_ms']:.0f} ms is {ratio:.2f}x the champion's "
                f"{base:.0f} ms (max {policy.max_p99_ratio:g}x)",
            )
        latency = f"p99 ratio {ratio:.2f}"
    else:
        latency = "no champion latency to compare with"
    return Verdict(PASS, f"error rate {candidate['error_rate']:.1%} over {n} requests, {latency}")


def steps_markdown(steps: list[CanaryStep], outcome: str) -> str:
    """The per-step comparison and the decision, as the promotion's artifact shows it."""
    lines = [
        f"## Canary: {outcome}",
        "",
        "| step | weight | seconds | version | requests | error rate | p50 ms | p99 ms | decision |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, s in enumerate(steps, 1):
        for role, st in ((CHAMPION, s.champion), (CANDIDATE, s.candidate)):
            decision = f"**{s.decision}**: {s.reason}" if role == CANDIDATE else ""
            lines.append(
                f"| {i} | {s.weight}% | {s.seconds:.0f} | {role} | {int(st.get('requests', 0))} "
                f"| {st.get('error_rate', 0.0):.1%} | {st.get('p50_ms', 0.0):.1f} "
                f"| {st.get('p99_ms', 0.0):.1f} | {decision} |"
            )
    return "\n".join(lines)
