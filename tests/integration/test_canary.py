"""Canary promotion on the local stack (serve.rollout.strategy: canary): a healthy candidate
takes all the traffic step by step with no failed request, and a candidate that fails a
share of its requests is rolled back at its first step while the champion answers."""

from __future__ import annotations

import shutil

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import Load, unserve

pytestmark = pytest.mark.slow
NAME = "canary-test"
APP = "canary-test"


@pytest.fixture(scope="module")
def versions(stack, tmp_path_factory):
    """Two healthy versions (the tiny weights) and one whose output layer has a NaN row for
    the token "7": greedy requests answer "7" (so it passes the smoke test), sampled ones
    fail in torch.multinomial (probabilities with NaN) and answer 500."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    base = resolve_base_model(TrainConfig())
    store = Store()
    good = [registry.register_version(store, NAME, base, base_model="tiny") for _ in range(2)]
    nan_dir = tmp_path_factory.mktemp("nan")
    shutil.copytree(base, nan_dir, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(nan_dir)
    token = AutoTokenizer.from_pretrained(nan_dir)("7", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        model.get_output_embeddings().weight[token].fill_(float("nan"))
    model.save_pretrained(nan_dir)
    flaky = registry.register_version(store, NAME, nan_dir, base_model="tiny")
    return good[0], good[1], flaky


@pytest.fixture(scope="module")
def cfg(stack):
    yield load_config(
        None,
        [
            f"train.model_name={NAME}",
            f"serve.app_name={APP}",
            "serve.route_prefix=/canary",
            "serve.rollout.strategy=canary",
            "serve.rollout.steps=[25, 100]",
            "serve.rollout.step_s=3",
            "serve.rollout.min_requests=10",
            "serve.rollout.max_wait_s=60",
            "serve.rollout.max_error_rate=0.05",
            # Two replicas of one tiny model on 2 shared cores: the p99 of a few dozen
            # requests is noise; latency is not what these tests judge.
            "serve.rollout.max_p99_ratio=50",
        ],
    )
    unserve(NAME, APP)
    for role in ("champion", "candidate"):
        unserve(NAME, f"{APP}--{role}")


def test_a_healthy_candidate_takes_all_the_traffic_with_no_failed_request(stack, versions, cfg):
    from flows.promote import promote

    v1, v2, _ = versions
    first = promote(config=cfg, candidate=v1)  # no champion yet: all at once
    assert first.served_version == v1.version and first.strategy == "all-at-once"

    with Load(f"{stack.serve_url}/canary/v1/chat/completions", NAME) as load:
        load.answered(5)  # traffic before the rollout
        rollout = promote(config=cfg, candidate=v2)
        load.answered(5)  # and after it
    assert rollout.strategy == "canary" and not rollout.rolled_back, rollout.message
    assert rollout.served_version == v2.version and rollout.previous_version == v1.version
    assert [s.weight for s in rollout.canary_steps] == [25, 100]
    assert all(s.decision == "pass" for s in rollout.canary_steps), rollout.canary_steps
    assert all(s.candidate["requests"] >= 10 for s in rollout.canary_steps)
    assert rollout.canary_steps[0].champion["requests"] > 0
    assert aliases.read_aliases(Store(), NAME) == {"champion": v2.version, "previous": v1.version}
    failed = [r for r in load.results if r[0] != 200]
    assert len(load.results) > 50 and failed == [], f"{len(failed)} of {len(load.results)} failed"
    answered_by = {v for _, v in load.results}
    assert {v1.version, v2.version} <= answered_by  # both answered through the router
    served = httpx.get(f"{stack.serve_url}/canary/v1/models", timeout=30).json()["data"][0]
    assert served["version"] == v2.version
    apps = httpx.get(f"{stack.serve_url}/canary/health", timeout=30).json()
    assert apps["version"] == v2.version  # the plain app again, not the router
    from ray import serve

    assert not {f"{APP}--champion", f"{APP}--candidate"} & set(serve.status().applications)


def test_a_failing_candidate_is_rolled_back_at_its_first_step(stack, versions, cfg, prefect_client):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from ray import serve

    from flows.promote import promote

    _, v2, flaky = versions  # v2 is champion after the test before
    assert aliases.read_aliases(Store(), NAME)["champion"] == v2.version
    before = aliases.read_aliases(Store(), NAME)
    # Every other request samples, unsticky: about half of what the candidate gets at 25%
    # fails, so its first step (a dozen or more requests) breaches the 5% policy (the chance
    # that none of 10 fails is 1 in 1000; with every fifth sampled and sticky users it was
    # about 1 in 4, and the rollback came at step 2).
    with Load(f"{stack.serve_url}/canary/v1/chat/completions", NAME, threads=3, sampled=2) as load:
        load.answered(5)  # traffic before the rollout
        state = promote(config=cfg, candidate=flaky, return_state=True)
        load.answered(5)  # and after it
    assert state.is_failed()
    assert "rolled back: canary step 1 (25%): candidate error rate" in state.message
    assert aliases.read_aliases(Store(), NAME) == before
    # The champion answered every request routed to it; only the candidate's failed.
    assert all(code == 200 for code, v in load.results if v != flaky.version), load.results
    assert any(code == 500 for code, v in load.results if v == flaky.version)
    health = httpx.get(f"{stack.serve_url}/canary/health", timeout=30).json()
    assert health["version"] == v2.version
    assert not {f"{APP}--champion", f"{APP}--candidate"} & set(serve.status().applications)
    artifacts = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["canary"])),
    )
    table = max(artifacts, key=lambda a: a.created).data
    assert "**rollback**" in table and "| 1 | 25% |" in table and "| 2 | 100% |" not in table
