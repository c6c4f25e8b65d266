"""The flows' resource check against the alive nodes, before any task: each stage's ask
(training workers all at once, a scoring actor or vLLM replica, a Serve replica) must fit."""

from __future__ import annotations

import pytest

from llmflow.configfile import load_config
from llmflow.errors import ConfigError
from llmflow.preflight import check_placement, check_resources

CPU4 = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9}}
GPU1 = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
DEAD_GPU = {**GPU1, "Alive": False}


def cfg(*sets: str):
    return load_config("configs/tiny.yaml", list(sets))


def test_the_tiny_config_fits_a_four_cpu_node():
    for flow in ("pipeline", "finetune", "evaluate", "promote"):
        check_resources(cfg(), flow, [CPU4])


def test_more_training_workers_than_the_nodes_hold_names_the_key():
    with pytest.raises(
        ConfigError,
        match=r"^train.num_workers=5 x \(1 CPU\) needs 5 CPU, but "
        r"the Ray cluster has 4 CPU in total",
    ):
        check_resources(cfg("train.num_workers=5", "train.cpus_per_worker=1"), "finetune", [CPU4])
    # evaluate and promote train nothing: the same config passes there
    check_resources(cfg("train.num_workers=5", "train.cpus_per_worker=1"), "evaluate", [CPU4])


def test_a_vllm_replica_that_wants_a_gpu_fails_on_a_cpu_cluster():
    config = cfg("serve.engine=vllm", "serve.vllm_placement=[{GPU: 1}]")
    with pytest.raises(
        ConfigError,
        match=r"^serve.vllm_placement: a bundle of 1 GPU fits on no "
        r"node of the Ray cluster \(nodes: 0 GPU\)",
    ):
        check_resources(config, "promote", [CPU4])
    check_resources(config, "promote", [CPU4, GPU1])
    with pytest.raises(ConfigError, match="fits on no node"):  # a dead node holds nothing
        check_resources(config, "promote", [CPU4, DEAD_GPU])


def test_an_empty_vllm_placement_means_one_gpu():
    config = cfg("eval.engine=vllm", "eval.vllm_placement=null")
    with pytest.raises(ConfigError, match=r"^eval.vllm_placement: a bundle of 1 GPU"):
        check_resources(config, "evaluate", [CPU4])


def test_a_bundle_must_fit_on_one_node_not_across_nodes():
    config = cfg("eval.engine=vllm", "eval.vllm_placement=[{CPU: 6}]")
    with pytest.raises(
        ConfigError,
        match=r"eval.vllm_placement: a bundle of 6 CPU fits on no "
        r"node of the Ray cluster \(nodes: 4 CPU; 4 CPU\)",
    ):
        check_resources(config, "evaluate", [CPU4, CPU4])


def test_an_hf_scoring_actor_larger_than_any_node():
    with pytest.raises(ConfigError, match=r"^eval.cpus_per_actor: a bundle of 6 CPU"):
        check_resources(cfg("eval.engine=hf", "eval.cpus_per_actor=6"), "pipeline", [CPU4])


def test_an_autoscaling_cluster_is_not_checked_against_the_nodes_alive_now(monkeypatch):
    import ray

    # No Ray is started or asked: with autoscaling the check returns before it connects.
    monkeypatch.setattr(ray, "nodes", lambda: pytest.fail("ray.nodes() was called"))
    check_placement(cfg("cluster.autoscaling=true", "train.num_workers=500"), "finetune")
    monkeypatch.setenv("LLMFLOW_CLUSTER_AUTOSCALING", "1")
    check_placement(cfg("train.num_workers=500"), "finetune")


def test_a_gate_metric_without_a_declared_direction_fails_before_any_task():
    from llmflow.preflight import check_config

    check_config(cfg("gate.primary_metric=eval_loss"), "pipeline")
    with pytest.raises(
        ConfigError, match=r"^gate.thresholds.meteor: 'meteor' is not a metric with a"
    ):
        check_config(cfg("gate.thresholds={meteor: 0.3}"), "pipeline")


# -- what is held now (issue 29: no silent wait) ------------------------------------------------
HEAD = {"NodeID": "n1", "Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9}}
GPU_NODE = {"NodeID": "n2", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}


def test_training_that_cannot_be_placed_now_names_what_holds_the_room():
    held = {
        "n1": [
            ("Serve app llmflow", {"CPU": 1.0}),
            ("Serve app qwen", {"CPU": 1.0}),
            ("Serve app phi3", {"CPU": 1.0}),
        ]
    }
    config = cfg("train.num_workers=2", "train.cpus_per_worker=1")
    with pytest.raises(
        ConfigError,
        match=r"^train.num_workers: 2 x \(1 CPU\) cannot be placed now: 3 of 4 CPU held by "
        r"Serve app llmflow \(1 CPU\), Serve app qwen \(1 CPU\), Serve app phi3 \(1 CPU\) "
        r"\(`llmflow models unserve NAME` frees a served model's\)$",
    ):
        check_room_now_with(config, "finetune", [HEAD], held)
    # One worker fits in the CPU left; evaluate and promote train nothing.
    check_room_now_with(cfg("train.num_workers=1"), "finetune", [HEAD], held)
    check_room_now_with(config, "promote", [HEAD], held)


def test_a_gpu_held_by_a_vllm_replica_fails_the_second_run_at_once():
    """One GPU, the second run (issue 30): the champion's vLLM replica holds the GPU that the
    training worker and the hf scoring actor ask for."""
    held = {"n2": [("Serve app qwen", {"CPU": 1.0, "GPU": 1.0})]}
    config = cfg("train.use_gpu=true", "train.num_workers=1", "eval.engine=hf")
    with pytest.raises(
        ConfigError,
        match=r"^train.num_workers: 1 x \(1 CPU, 1 GPU\) cannot be "
        r"placed now: 1 of 12 CPU, 1 of 1 GPU held by Serve app qwen",
    ):
        check_room_now_with(config, "pipeline", [HEAD, GPU_NODE], held)
    with pytest.raises(ConfigError, match=r"^eval.cpus_per_actor: 1 x \(1 CPU, 1 GPU\) cannot"):
        check_room_now_with(config, "evaluate", [HEAD, GPU_NODE], held)
    check_room_now_with(config, "pipeline", [HEAD, GPU_NODE], {})


def test_only_what_is_held_on_alive_nodes_counts():
    other = {**HEAD, "NodeID": "n3"}
    dead = {**HEAD, "Alive": False}
    held = {"n1": [("Serve app gone", {"CPU": 4.0})], "n9": [("an actor", {"CPU": 4.0})]}
    check_room_now_with(cfg("train.num_workers=4"), "finetune", [dead, other], held)
    held["n3"] = [("Ray Train workers", {"CPU": 2.0})]
    with pytest.raises(ConfigError, match=r": 2 of 4 CPU held by Ray Train workers \(2 CPU\)$"):
        check_room_now_with(cfg("train.num_workers=3"), "finetune", [dead, other], held)


def check_room_now_with(config, flow, nodes, held):
    """check_room_now with the state API's answer given (held_on_nodes is Ray's state API)."""
    from llmflow import preflight

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preflight, "held_on_nodes", lambda: held)
        preflight.check_room_now(config, flow, nodes)
