"""Promotion on the local stack: rolling update with no failed request, smoke test, alias
move, idempotence, and rollback of a version that cannot serve."""

from __future__ import annotations

import shutil

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import Load, unserve, user_env

pytestmark = pytest.mark.slow
NAME = "promote-test"


@pytest.fixture(scope="module")
def versions(stack, tmp_path_factory):
    """Two servable versions (same tiny weights, different version ids) and a broken one."""
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    base = resolve_base_model(TrainConfig())
    store = Store()
    good = [registry.register_version(store, NAME, base, base_model="tiny") for _ in range(2)]
    broken_dir = tmp_path_factory.mktemp("broken")
    shutil.copytree(base, broken_dir, dirs_exist_ok=True)
    (broken_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = registry.register_version(store, NAME, broken_dir, base_model="tiny")
    return good[0], good[1], broken


@pytest.fixture(scope="module")
def cfg(stack):
    yield load_config(
        None,
        [f"train.model_name={NAME}", "serve.app_name=promote-test", "serve.route_prefix=/promote"],
    )
    unserve(NAME, "promote-test")  # free its replica's CPU for the tests after this module


def test_promote_rolls_out_without_failed_requests_and_moves_the_alias(stack, versions, cfg):
    from flows.promote import promote

    v1, v2, _ = versions
    first = promote(config=cfg, candidate=v1)
    assert first.served_version == v1.version and first.smoke_test.passed
    assert aliases.read_aliases(Store(), NAME)["champion"] == v1.version

    with Load(f"{stack.serve_url}/promote/v1/chat/completions", NAME, 1, pause_s=0.05) as load:
        second = promote(config=cfg, candidate=v2)
    assert second.served_version == v2.version and second.previous_version == v1.version
    assert aliases.read_aliases(Store(), NAME) == {"champion": v2.version, "previous": v1.version}
    failed = load.failed
    assert len(load.results) > 20 and failed == [], f"{len(failed)} of {len(load.results)} failed"
    served = httpx.get(f"{stack.serve_url}/promote/v1/models", timeout=30).json()["data"][0]
    assert served["version"] == v2.version


def test_promoting_the_champion_again_changes_nothing(stack, versions, cfg):
    from flows.promote import promote

    _, v2, _ = versions
    before = aliases.read_aliases(Store(), NAME)
    again = promote(config=cfg, candidate=v2)
    assert "nothing changed" in again.message
    assert aliases.read_aliases(Store(), NAME) == before


def test_a_version_that_cannot_serve_is_rolled_back(stack, versions, cfg):
    from flows.promote import promote

    _, v2, broken = versions
    before = aliases.read_aliases(Store(), NAME)
    # One failed start fails the deployment (serve.start_attempts; Serve's default is three).
    once = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"start_attempts": 1})})
    state = promote(config=once, candidate=broken, return_state=True)
    assert state.is_failed()
    assert "rolled back" in state.message
    assert aliases.read_aliases(Store(), NAME) == before
    served = httpx.get(f"{stack.serve_url}/promote/health", timeout=30).json()
    assert served["version"] == v2.version


def test_a_candidate_that_fails_the_gate_is_not_served(stack, versions, cfg):
    from flows.promote import promote
    from llmflow.refs import GateDecision, GateRule

    v1, _, _ = versions
    before = aliases.read_aliases(Store(), NAME)
    served_before = httpx.get(f"{stack.serve_url}/promote/health", timeout=30)
    decision = GateDecision(
        passed=False,
        rules=[
            GateRule(
                name="primary:exact_match", passed=False, reason="exact_match 0.1 vs champion 0.9"
            )
        ],
    )
    rollout = promote(config=cfg, candidate=v1, decision=decision)
    assert rollout.message == "gate failed: exact_match 0.1 vs champion 0.9"
    assert aliases.read_aliases(Store(), NAME) == before
    # The refusal is in the version's lineage (`llmflow models list` shows it as failed).
    gate = registry.read_manifest(Store(), NAME, v1.version)["gate"]
    assert gate["passed"] is False
    assert gate["rules"][0]["reason"] == "exact_match 0.1 vs champion 0.9"
    after = httpx.get(f"{stack.serve_url}/promote/health", timeout=30)
    assert after.status_code == served_before.status_code
    if after.status_code == 200:
        assert after.json()["version"] == served_before.json()["version"]


def test_a_route_prefix_held_by_another_app_fails_before_any_work(stack, versions, cfg):
    """Serving a second model on the first one's prefix: one line before the pipeline trains,
    instead of Serve's refusal after it."""
    from llmflow.errors import ConfigError
    from llmflow.promote.apps import check_serving

    v1, _, _ = versions
    from flows.promote import promote

    promote(config=cfg, candidate=v1)  # promote-test serves at /promote
    other = load_config(None, ["serve.app_name=qwen", "serve.route_prefix=/promote"])
    with pytest.raises(
        ConfigError,
        match=r"^serve.route_prefix: '/promote' is served by the Serve "
        r"application 'promote-test'; give serve.app_name='qwen' its own prefix",
    ):
        check_serving(other.serve, other.cluster)
    check_serving(cfg.serve, cfg.cluster)  # its own app: fine
    check_serving(load_config(None, ["serve.app_name=qwen"]).serve, other.cluster)  # /qwen: free


def test_the_gate_decision_and_approver_are_in_the_lineage_and_on_v1_models(stack, versions, cfg):
    import subprocess
    import sys
    from pathlib import Path

    from flows.promote import promote
    from llmflow.refs import GateDecision, GateRule

    _, v2, _ = versions  # v1 serves after the test before: a real promotion
    registry.annotate(Store(), NAME, v2.version, eval={"metrics": {"exact_match": 0.875}})
    decision = GateDecision(
        passed=True,
        approved_by="alice",
        comment="looks right",
        rules=[
            GateRule(name="primary:exact_match", passed=True, reason="exact_match 0.875 vs 0.5")
        ],
    )
    rollout = promote(config=cfg, candidate=v2, decision=decision)
    assert rollout.served_version == v2.version
    gate = registry.read_manifest(Store(), NAME, v2.version)["gate"]
    assert gate["approved_by"] == "alice" and gate["passed"] and gate["comment"] == "looks right"
    assert gate["rules"][0]["reason"] == "exact_match 0.875 vs 0.5"
    served = httpx.get(f"{stack.serve_url}/promote/v1/models", timeout=30).json()["data"][0]
    assert served["lineage"]["gate"] == {
        "passed": True,
        "approved_by": "alice",
        "rules": ["exact_match 0.875 vs 0.5"],
    }
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), "models", "list", NAME],
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=120,
        check=False,
    )
    row = next(line for line in listed.stdout.splitlines() if f" {v2.version} " in line)
    assert "exact_match=0.875" in row and "passed (alice)" in row, listed.stdout
