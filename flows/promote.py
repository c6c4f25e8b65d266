"""The promote stage: roll a gated model version out on Ray Serve, smoke-test it, and move
the champion alias; on any failure, roll back and leave the alias as it was.

    llmflow run promote --set serve.app_name=llmflow   (promotes the latest version)
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.transactions import transaction

from llmflow import aliases, registry
from llmflow.config import PipelineConfig, default_config
from llmflow.preflight import check_flow
from llmflow.refs import GateDecision, ModelRef, Rollout
from llmflow.runs import model_slot
from llmflow.store import Store
from tasks.rollout import (
    RolloutError,
    check_served,
    check_serving,
    deploy_version,
    serve_url,
    served_version,
    summary,
)


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
    aliases.restore_champion(Store(), txn.get("model_name"), before.get("champion"),
                             before.get("previous"))  # fmt: skip


@task(name="record-gate")
def record_gate(candidate: ModelRef, decision: GateDecision) -> None:
    """The gate's decision, its rules and the approver (from the UI form) into the version's
    lineage manifest, before it is served: /v1/models shows them."""
    registry.annotate(Store(), candidate.name, candidate.version, gate={
        "passed": decision.passed, "approved_by": decision.approved_by,
        "comment": decision.comment,
        "rules": [r.model_dump(mode="json") for r in decision.rules]})  # fmt: skip


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
        url = f"{serve_url(config.cluster)}{config.serve.route_prefix.rstrip('/')}"
        current = aliases.read_aliases(store, candidate.name)
        champion = registry.get_version(store, candidate.name, current["champion"]) if current.get("champion") else None
        live = served_version(config.serve, serve_url(config.cluster))
        if decision is not None and not decision.passed:
            rollout = Rollout(served_version=live, previous_version=None, endpoint=url,
                              message="gate failed: " + "; ".join(r.reason for r in decision.rules if not r.passed))  # fmt: skip
        elif current.get("champion") == candidate.version and live == candidate.version:
            rollout = Rollout(served_version=live, previous_version=current.get("previous"), endpoint=url,
                              message=f"{candidate.name}:{candidate.version} is already champion and served: nothing changed")  # fmt: skip
        else:
            check_serving(config.serve, config.cluster)
            if decision is not None:
                record_gate(candidate, decision)
            try:
                with transaction() as txn:
                    txn.set("model_name", candidate.name)
                    deploy_version(config.serve, config.cluster, candidate, champion)
                    smoke = check_served(config.serve, config.cluster, candidate)
                    move_champion(candidate.name, candidate.version)
                rollout = Rollout(served_version=candidate.version,
                                  previous_version=champion.version if champion else None,
                                  endpoint=url, smoke_test=smoke,
                                  message=f"{candidate.name}:{candidate.version} is champion and served")  # fmt: skip
            except RolloutError as exc:
                rollout = Rollout(served_version=served_version(config.serve, serve_url(config.cluster)),
                                  previous_version=champion.version if champion else None,
                                  endpoint=url, rolled_back=True, message=f"rolled back: {exc}")  # fmt: skip
    create_markdown_artifact(key="rollout", markdown=summary(rollout))
    print(rollout.message)
    if rollout.rolled_back:
        raise RolloutError(rollout.message)
    return rollout
