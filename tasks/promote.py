"""The promote stage's tasks: the gate (metric policy, optional approval in the Prefect UI),
then the rollout as one Prefect transaction (all at once, or canary steps on live traffic:
serve.rollout).

`deploy_version` registers an on_rollback hook that puts the previous version back (or
removes the app when there was none), and `move_champion` one that restores the aliases, so
a failed smoke test or alias update undoes the deployment. Serve's in-place update is
rolling, and with serve.max_surge_percent (default 100) new replicas start before old ones
stop, so requests keep being answered during a rollout (bench/rollout.py). The logic lives
in llmflow/promote/.
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

from llmflow import aliases, registry
from llmflow.config import ClusterConfig, GateConfig, PipelineConfig, ServeConfig
from llmflow.evaluate.metrics import metric_directions
from llmflow.promote import canary_apps, serving
from llmflow.promote.apps import connect, serve_engine
from llmflow.promote.canary import CANDIDATE, steps_markdown
from llmflow.promote.canary_apps import version_cfg
from llmflow.promote.gate import decide, decision_markdown
from llmflow.promote.rollout import (
    RolloutError,
    deploy,
    endpoint,
    restore,
    served_version,
    smoke_test,
    summary,
)
from llmflow.refs import (
    CanaryStep,
    EvalReport,
    GateDecision,
    GateRule,
    ModelRef,
    Rollout,
    SmokeTest,
)
from llmflow.settings import serve_url
from llmflow.store import Store
from llmflow.terminal import stage


@task(name="gate")
def gate(
    config: GateConfig,
    candidate: EvalReport,
    champion: EvalReport | None,
    directions: dict[str, str] | None = None,
) -> GateDecision:
    """Decide on the candidate, each metric in the direction it declares (default: the
    built-in metrics'), the two models compared row by row on their stored predictions; the
    decision is shown as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from llmflow.evaluate.metrics import DIRECTIONS
    from llmflow.evaluate.paired import compare_reports

    directions = directions or DIRECTIONS
    comparison = (
        compare_reports(candidate, champion, directions, config.confidence) if champion else None
    )
    decision = decide(config, candidate, champion, directions, comparison)
    create_markdown_artifact(key="gate-decision", markdown=decision_markdown(decision))
    return decision


class Approval(RunInput):
    """The form the Prefect UI shows on a paused pipeline run."""

    decision: Literal["approve", "reject"] = Field(
        "reject",
        description="Approve to promote the candidate; reject to keep the champion (the run's "
        "eval-comparison and eval-changes artifacts show the intervals and the examples).",
    )
    comment: str = Field("", description="Why (kept with the decision).")
    reviewer: str = Field("", description="Who decided.")


def ask_for_approval(decision: GateDecision, timeout_s: int) -> GateDecision:
    """Pause the flow run until a human approves or rejects in the UI; a timeout rejects.

    Call it from a flow body (Prefect pauses flow runs, not tasks).
    """
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    if not decision.passed:
        return decision
    try:
        answer: Approval = pause_flow_run(wait_for_input=Approval, timeout=timeout_s)
    except FlowPauseTimeout:
        rule = GateRule(
            name="human-approval", passed=False, reason=f"no decision within {timeout_s}s: rejected"
        )
        return decision.model_copy(update={"passed": False, "rules": [*decision.rules, rule]})
    ok = answer.decision == "approve"
    rule = GateRule(
        name="human-approval",
        passed=ok,
        reason=f"{answer.decision}d by {answer.reviewer or 'a reviewer'}"
        + (f": {answer.comment}" if answer.comment else ""),
    )
    return decision.model_copy(
        update={
            "passed": ok,
            "rules": [*decision.rules, rule],
            "approved_by": answer.reviewer or None,
            "comment": answer.comment or None,
        }
    )


@task(name="deploy-version", cache_policy=NO_CACHE)
def deploy_version(
    serve_cfg: ServeConfig,
    cluster: ClusterConfig,
    model: ModelRef,
    previous: ModelRef | None,
    canary: bool = False,
) -> str:
    """Roll the version out in place, or (canary) serve it beside ``previous`` behind the
    canary router at 0%; the transaction remembers what to restore."""
    from prefect.transactions import get_transaction

    connect(cluster)
    txn = get_transaction()
    if txn is not None:
        txn.set("serve_cfg", serve_cfg)
        txn.set("cluster", cluster)
        txn.set("previous", previous)
        txn.set("canary_of", model if canary else None)
    try:
        if canary:
            canary_apps.start(serve_cfg, previous, model, cluster)
        else:
            deploy(serve_cfg, model, cluster)
    except RolloutError:
        # A failed task registers no rollback hook: undo its own half-done update here.
        # (Serve keeps the old replicas, but marks the app failed until the next deploy.)
        _undo(serve_cfg, previous, model if canary else None, cluster)
        raise
    how = "beside the champion, at 0% (canary)" if canary else "in place"
    get_run_logger().info(
        "Serving %s:%s on app '%s' %s", model.name, model.version, serve_cfg.app_name, how
    )
    return model.version


def _undo(
    serve_cfg: ServeConfig,
    previous: ModelRef | None,
    canary_of: ModelRef | None,
    cluster: ClusterConfig | None,
) -> None:
    if canary_of is not None and previous is not None:
        canary_apps.restore_champion(serve_cfg, previous, canary_of, cluster)
    else:
        restore(serve_cfg, previous, cluster)


@deploy_version.on_rollback
def _restore_previous(txn) -> None:
    _undo(
        txn.get("serve_cfg"),
        txn.get("previous"),
        txn.get("canary_of", None),
        txn.get("cluster", None),
    )


@task(name="canary-steps", cache_policy=NO_CACHE)
def canary_steps(
    serve_cfg: ServeConfig, cluster: ClusterConfig, champion: ModelRef, candidate: ModelRef
) -> tuple[bool, list[CanaryStep], str]:
    """serve.rollout.steps, each judged on the router's per-version figures against the
    policy; the per-step comparison is the 'canary' artifact, held or not."""
    from prefect.artifacts import create_markdown_artifact

    held, steps, reason = canary_apps.run_steps(serve_cfg, champion, candidate, cluster)
    outcome = "held: the candidate takes all the traffic" if held else "rolled back"
    create_markdown_artifact(
        key="canary", markdown=f"{steps_markdown(steps, outcome)}\n\n**{outcome}**: {reason}"
    )
    get_run_logger().info("canary %s: %s", outcome, reason)
    return held, steps, reason


@task(name="finish-canary", cache_policy=NO_CACHE)
def finish_canary(
    serve_cfg: ServeConfig, cluster: ClusterConfig, champion: ModelRef, candidate: ModelRef
) -> None:
    """The candidate held at 100%: it becomes the plain public app, the internal apps go."""
    canary_apps.finish(serve_cfg, champion, candidate, cluster)


@task(name="smoke-test", cache_policy=NO_CACHE)
def check_served(serve_cfg: ServeConfig, cluster: ClusterConfig, model: ModelRef) -> SmokeTest:
    from llmflow.apikey import resolve_api_key

    try:
        key = resolve_api_key(serve_cfg.api_key_env, serve_cfg.api_key_file)
    except ValueError as exc:
        raise RolloutError(f"smoke test of {model.name}:{model.version}: {exc}") from exc
    result = smoke_test(serve_cfg, model, serve_url(cluster), key)
    if not result.passed:
        failed = "; ".join(f"{c['check']}: {c['detail']}" for c in result.checks if not c["passed"])
        raise RolloutError(f"smoke test of {model.name}:{model.version} failed: {failed}")
    return result


@task(name="move-champion")
def move_champion(name: str, version: str) -> str | None:
    """Point the champion alias at the version; the transaction can put it back."""
    from prefect.transactions import get_transaction

    store = Store()
    before = aliases.read_aliases(store, name)
    txn = get_transaction()
    if txn is not None:
        txn.set("aliases_before", before)
    _, previous = aliases.set_champion(store, name, version)
    return previous


@move_champion.on_rollback
def _restore_aliases(txn) -> None:
    before = txn.get("aliases_before")
    aliases.restore_champion(
        Store(), txn.get("model_name"), before.get("champion"), before.get("previous")
    )


@task(name="record-serving", cache_policy=NO_CACHE)
def record_serving(serve_cfg: ServeConfig, cluster: ClusterConfig, model: ModelRef) -> str:
    """The promotion's last step: what is served and how (models/<name>/serving.json), so
    `llmflow up` can bring it back after a restart of the Ray head."""
    return serving.record(Store(), model, serve_cfg, cluster, serve_engine(serve_cfg, cluster))


@task(name="record-gate")
def record_gate(candidate: ModelRef, decision: GateDecision) -> None:
    """The gate's decision, its rules and the approver (from the UI form) into the version's
    lineage manifest, before it is served: /v1/models shows them."""
    registry.annotate(
        Store(),
        candidate.name,
        candidate.version,
        gate={
            "passed": decision.passed,
            "approved_by": decision.approved_by,
            "comment": decision.comment,
            "rules": [r.model_dump(mode="json") for r in decision.rules],
        },
    )


def roll_out(config: PipelineConfig, candidate: ModelRef, champion: ModelRef | None) -> Rollout:
    """deploy-version, smoke-test, [canary-steps, finish-canary,] move-champion,
    record-serving in one transaction: a failure in any of them, or a canary step that
    breaches serve.rollout, rolls all of them back, and the Rollout says so."""
    from prefect.transactions import transaction

    serve_cfg, cluster = config.serve, config.cluster
    url = endpoint(serve_cfg, cluster)
    previous = champion.version if champion else None
    canary = uses_canary(serve_cfg, candidate, champion)
    strategy = "canary" if canary else "all-at-once"
    steps: list[CanaryStep] = []
    try:
        with transaction() as txn:
            txn.set("model_name", candidate.name)
            deploy_version(serve_cfg, cluster, candidate, champion, canary)
            tried = version_cfg(serve_cfg, CANDIDATE, candidate.version) if canary else serve_cfg
            smoke = check_served(tried, cluster, candidate)
            if canary:
                held, steps, reason = canary_steps(serve_cfg, cluster, champion, candidate)
                if not held:
                    raise RolloutError(f"canary {reason}")
                finish_canary(serve_cfg, cluster, champion, candidate)
            move_champion(candidate.name, candidate.version)
            record_serving(serve_cfg, cluster, candidate)
    except RolloutError as exc:
        return Rollout(
            served_version=served_version(serve_cfg, serve_url(cluster)),
            previous_version=previous,
            endpoint=url,
            rolled_back=True,
            message=f"rolled back: {exc}",
            strategy=strategy,
            canary_steps=steps,
        )
    return Rollout(
        served_version=candidate.version,
        previous_version=previous,
        endpoint=url,
        smoke_test=smoke,
        message=f"{candidate.name}:{candidate.version} is champion and served"
        + (f" (canary: {' -> '.join(f'{s.weight}%' for s in steps)})" if canary else ""),
        strategy=strategy,
        canary_steps=steps,
    )


def uses_canary(serve_cfg: ServeConfig, candidate: ModelRef, champion: ModelRef | None) -> bool:
    """serve.rollout.strategy canary, and a champion other than the candidate to compare
    with (the first promotion of a model goes all at once, and says so)."""
    if serve_cfg.rollout.strategy != "canary":
        return False
    if champion is None or champion.version == candidate.version:
        stage("promote", "canary: no other champion to compare with, all at once")
        return False
    return True


def report_rollout(rollout: Rollout) -> Rollout:
    """The rollout artifact and its one line; a rolled-back rollout fails the flow run."""
    from prefect.artifacts import create_markdown_artifact

    from llmflow.terminal import stage

    create_markdown_artifact(key="rollout", markdown=summary(rollout))
    stage("promote", rollout.message)
    if rollout.rolled_back:
        raise RolloutError(rollout.message)
    return rollout


def gate_stage(
    config: PipelineConfig, candidate: ModelRef, reports: dict[str, EvalReport]
) -> GateDecision:
    """gate (the metric policy), then the approval in the UI when required. A version that is
    the champion already (a re-run after its promotion) is not gated again."""
    if reports["champion"].model_version == candidate.version:
        reason = f"{candidate.version} is the champion already: not gated again"
        return GateDecision(
            passed=True, rules=[GateRule(name="already-champion", passed=True, reason=reason)]
        )
    # the benchmarks' metrics declare theirs in the reports
    directions = metric_directions(config.eval.extra_metrics, reports.values())
    decision = gate(config.gate, reports["candidate"], reports["champion"], directions)
    if config.gate.require_approval:  # a flow run pauses (not a task): called from the flow
        stage("gate", "waiting for a decision in the Prefect UI (the run is paused)")
        decision = ask_for_approval(decision, config.gate.approval_timeout_s)
    stage("gate", f"{'passed' if decision.passed else 'failed'}: {'; '.join(decision.reasons)}")
    return decision
