"""The promote stage: roll a gated model version out on Ray Serve, smoke-test it, and move
the champion alias; on any failure, roll back and leave the alias as it was.

    llmflow run promote --set serve.app_name=llmflow   (promotes the latest version)
"""

from __future__ import annotations

from prefect import flow

from llmflow import aliases, registry
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.evaluate.metrics import metric_directions
from llmflow.preflight import check_flow
from llmflow.promote.apps import check_serving
from llmflow.promote.rollout import nothing_to_do
from llmflow.refs import EvalReport, GateDecision, GateRule, ModelRef, Rollout
from llmflow.runs import model_slot
from llmflow.store import Store
from llmflow.terminal import stage
from tasks.promote import ask_for_approval, gate, record_gate, report_rollout, roll_out


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
    directions = metric_directions(config.eval.extra_metrics)
    decision = gate(config.gate, reports["candidate"], reports["champion"], directions)
    if config.gate.require_approval:  # a flow run pauses (not a task): called from the flow
        stage("gate", "waiting for a decision in the Prefect UI (the run is paused)")
        decision = ask_for_approval(decision, config.gate.approval_timeout_s)
    stage("gate", f"{'passed' if decision.passed else 'failed'}: {'; '.join(decision.reasons)}")
    return decision


@flow(name="promote", log_prints=True)
def promote(
    config: PipelineConfig = default_config(),
    candidate: ModelRef | None = None,
    decision: GateDecision | None = None,
) -> Rollout:
    """Promote ``candidate`` (default: the latest registered version) if the gate passed.

    Two promotions of one model wait for each other (a Prefect concurrency slot), so the
    served version and the champion alias always move together.

    Stages (one transaction; a failure rolls every stage back):
        1. deploy-version: rolling in-place update of the Serve app
        2. smoke-test: real HTTP requests, the new version must answer
        3. move-champion: the alias moves only after the smoke test passed
    """
    check_flow(config, "promote")  # a missing vLLM environment fails here, in one line
    store = Store()
    candidate = candidate or registry.get_version(store, config.train.model_name)
    with model_slot(candidate.name, kind="promote"):  # promotions of a model never interleave
        current = aliases.read_aliases(store, candidate.name)
        champion, previous = current.get("champion"), current.get("previous")
        rollout = nothing_to_do(
            config.serve, config.cluster, candidate, decision, champion, previous
        )
        if rollout is None:
            check_serving(config.serve, config.cluster)
            if decision is not None:
                record_gate(candidate, decision)
            champ = registry.get_version(store, candidate.name, champion) if champion else None
            rollout = roll_out(config, candidate, champ)
    return report_rollout(rollout)
