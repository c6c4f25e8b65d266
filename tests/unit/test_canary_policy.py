"""Canary promotion's logic without Ray: the serve.rollout section, the sticky choice, the
per-version figures, the verdict on a step and its table."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from llmflow.config_serve import RolloutPolicy, ServeConfig
from llmflow.configfile import default_config, load_config
from llmflow.promote.canary import (
    CANDIDATE,
    CHAMPION,
    PASS,
    ROLLBACK,
    WAIT,
    bucket,
    choose,
    judge,
    steps_markdown,
    summarize,
)
from llmflow.refs import CanaryStep


def test_all_at_once_is_the_default_and_the_tiny_config_keeps_it():
    assert ServeConfig().rollout.strategy == "all-at-once"
    assert default_config().serve.rollout == RolloutPolicy()


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([10, 50], "must end at 100"),
        ([], "must end at 100"),
        ([0, 100], "in 1..100"),
        ([50, 10, 100], "strictly increasing"),
        ([50, 50, 100], "strictly increasing"),
    ],
)
def test_steps_are_increasing_percents_ending_at_100(steps, message):
    with pytest.raises(ValidationError, match=message):
        RolloutPolicy(strategy="canary", steps=steps)


def test_the_policy_is_set_from_the_command_line_and_unknown_keys_are_errors():
    cfg = load_config(None, ["serve.rollout.strategy=canary", "serve.rollout.steps=[20, 100]"])
    assert cfg.serve.rollout.strategy == "canary" and cfg.serve.rollout.steps == [20, 100]
    with pytest.raises(ValidationError, match="extra"):
        RolloutPolicy(stepz=[100])


def test_a_user_keeps_its_version_as_the_weight_grows():
    users = [f"user-{i}" for i in range(2000)]
    assert all(0 <= bucket(u) < 100 for u in users)
    assert [bucket(u) for u in users] == [bucket(u) for u in users]  # stable
    at_10 = {u for u in users if choose(10, u) == CANDIDATE}
    at_50 = {u for u in users if choose(50, u) == CANDIDATE}
    assert at_10 < at_50  # on the candidate at 10%: still there at 50%
    assert 100 < len(at_10) < 300 and 850 < len(at_50) < 1150  # about the weight
    assert {choose(0, u) for u in users} == {CHAMPION}
    assert {choose(100, u) for u in users} == {CANDIDATE}


def test_requests_without_a_user_go_by_weight():
    rng = random.Random(0)
    picks = [choose(30, None, rng) for _ in range(10_000)]
    assert 2700 < picks.count(CANDIDATE) < 3300


def test_summarize_counts_and_percentiles():
    s = summarize(100, 5, [i / 1000 for i in range(1, 101)])
    assert s == {"requests": 100, "errors": 5, "error_rate": 0.05, "p50_ms": 50.5, "p99_ms": 99.01}
    assert summarize(0, 0, []) == {
        "requests": 0,
        "errors": 0,
        "error_rate": 0.0,
        "p50_ms": 0.0,
        "p99_ms": 0.0,
    }
    assert summarize(1, 1, [0.2])["p99_ms"] == 200.0


POLICY = RolloutPolicy(
    strategy="canary",
    steps=[10, 100],
    step_s=10,
    min_requests=20,
    max_wait_s=60,
    max_error_rate=0.01,
    max_p99_ratio=1.5,
)


def stats(requests, errors=0, p99=100.0):
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
    }


def test_a_step_waits_for_its_time_and_its_requests():
    assert judge(POLICY, stats(200), stats(5), 30).decision == WAIT  # too few requests
    assert judge(POLICY, stats(200), stats(30), 5).decision == WAIT  # too early
    v = judge(POLICY, stats(200), stats(30), 10)
    assert v.decision == PASS and "p99 ratio 1.00" in v.reason


def test_a_candidate_that_errs_is_rolled_back_before_its_step_is_over():
    v = judge(POLICY, stats(200), stats(20, errors=4), 2)
    assert v.decision == ROLLBACK
    assert (
        v.reason
        == "candidate error rate 20.0% over 20 requests vs champion 0.0% (allowed excess 1.0%)"
    )


def test_errors_are_compared_with_the_champions():
    # Both at 10% (an overloaded cluster, not a bad candidate): within the allowed excess.
    assert judge(POLICY, stats(200, errors=20), stats(20, errors=2), 10).decision == PASS
    assert judge(POLICY, stats(200, errors=2), stats(20, errors=2), 10).decision == ROLLBACK


def test_a_slow_candidate_is_rolled_back_and_100_percent_compares_with_the_step_before():
    v = judge(POLICY, stats(200, p99=100), stats(40, p99=200), 10)
    assert v.decision == ROLLBACK and "2.00x the champion's 100 ms (max 1.5x)" in v.reason
    at_100 = judge(POLICY, stats(0), stats(40, p99=140), 10, baseline_p99_ms=100)
    assert at_100.decision == PASS and "p99 ratio 1.40" in at_100.reason
    assert judge(POLICY, stats(0), stats(40, p99=160), 10, 100).decision == ROLLBACK
    alone = judge(POLICY, stats(0), stats(40), 10)
    assert alone.decision == PASS and "no champion latency" in alone.reason


def test_too_little_traffic_rolls_back_after_max_wait_s():
    v = judge(POLICY, stats(50), stats(3), 61)
    assert v.decision == ROLLBACK
    assert v.reason == "not enough traffic: 3 candidate requests in 61s (min_requests 20)"


def test_the_table_shows_each_version_of_each_step_and_the_decision():
    steps = [
        CanaryStep(
            weight=10,
            seconds=12.3,
            champion=stats(180),
            candidate=stats(20, errors=4),
            decision=ROLLBACK,
            reason="candidate error rate 20.0%",
        ),
    ]
    table = steps_markdown(steps, "rolled back")
    assert table.splitlines()[0] == "## Canary: rolled back"
    assert "| 1 | 10% | 12 | champion | 180 | 0.0% | 50.0 | 100.0 |  |" in table
    assert (
        "| 1 | 10% | 12 | candidate | 20 | 20.0% | 50.0 | 100.0 | **rollback**: candidate error rate 20.0% |"
        in table
    )


def test_each_version_gets_an_internal_app_and_the_router_takes_the_public_one():
    from llmflow.config import ClusterConfig
    from llmflow.promote.canary_apps import router_schema, version_cfg
    from llmflow.refs import ModelRef

    serve_cfg = ServeConfig(app_name="qa", engine="hf", chat=True)
    internal = version_cfg(serve_cfg, CANDIDATE, "v7")
    assert (internal.app_name, internal.route_prefix, internal.chat) == (
        "qa--candidate",
        "/_llmflow/qa/v7",
        False,
    )
    assert internal.engine == "hf" and internal.api_key_env == serve_cfg.api_key_env

    def ref(version):
        return ModelRef(uri=f"/m/{version}", name="m", version=version, base_model="tiny")

    cluster = ClusterConfig(serve_url="http://head:8000")
    app = router_schema(serve_cfg, ref("v6"), ref("v7"), cluster, 10, "1:10")
    assert (app["name"], app["route_prefix"]) == ("qa", "/qa")
    assert app["args"]["upstreams"] == {
        CHAMPION: "http://head:8000/_llmflow/qa/v6",
        CANDIDATE: "http://head:8000/_llmflow/qa/v7",
    }
    # The hf app's ingress deployment: switching to the router is a rolling update of it.
    assert app["args"]["name"] == "llm"
    assert app["deployments"] == [{"name": "llm", "user_config": {"weight": 10, "step": "1:10"}}]
