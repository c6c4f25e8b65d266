"""The promote stage: roll a gated model version out on Ray Serve, smoke-test it, and move
the champion alias; on any failure, roll back and leave the alias as it was.

    llmflow run promote --set serve.app_name=llmflow   (promotes the latest version)
"""

from __future__ import annotations

from prefect import flow

from llmflow import aliases, registry
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.preflight import check_flow
from llmflow.promote.apps import check_serving
from llmflow.promote.rollout import nothing_to_do
from llmflow.refs import GateDecision, ModelRef, Rollout
from llmflow.runs import model_slot
from llmflow.store import Store
from tasks.promote import record_gate, report_rollout, roll_out


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
        if decision is not None and (rollout is None or not decision.passed):
            record_gate(candidate, decision)  # a refusal too: `llmflow models list` shows it
        if rollout is None:
            check_serving(config.serve, config.cluster)
            champ = registry.get_version(store, candidate.name, champion) if champion else None
            rollout = roll_out(config, candidate, champ)
    return report_rollout(rollout)
