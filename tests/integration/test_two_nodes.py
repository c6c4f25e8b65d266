"""Two Ray nodes on one machine, as `llmflow up --nodes 2` starts them: the session stack's
head plus a second node declaring one logical GPU (no CUDA behind it) and the resource
`gpu_node`, with an HF cache of its own (HF_HOME). The pipeline on a hub-shaped base model
that only this process's HF cache holds (a local mirror, offline), with its training placed
on the second node by `train.resources_per_worker`; finetune by `train.use_gpu`; the
placement read back from Ray's state API.

    .venv/bin/python -m pytest tests/integration/test_two_nodes.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from llmflow.configfile import load_config
from llmflow.refs import DatasetRef
from tests.integration.helpers import unserve, user_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
# Short runs: placement is the point, not what the model learns (the loss still has to fall).
TINY = [
    "train.max_steps=10",
    "train.checkpoint_every=10",
    "train.eval_every=10",
    "train.warmup_steps=5",
]


def cfg(*overrides: str):
    return load_config("configs/tiny.yaml", [*TINY, *overrides])


@pytest.fixture(scope="module")
def node2_hf_home(tmp_path_factory) -> Path:
    """The second node's own HF cache (HF_HOME), which no other process reads."""
    return tmp_path_factory.mktemp("node2-hf-home")


@pytest.fixture(scope="module")
def second_node(stack, node2_hf_home) -> str:
    """The session stack grown to two nodes with `up(nodes=2)` (what `llmflow up --nodes 2`
    calls), and shrunk back with `up(nodes=1)` after this module, so the other tests keep
    their one-node cluster. The second node starts with its own HF_HOME, as a machine of
    its own would. Yields the second node's Ray node id."""
    from llmflow import probes
    from llmflow import stack as stack_mod

    lines: list[str] = []
    try:
        with mock.patch.dict(os.environ, {"HF_HOME": str(node2_hf_home)}):
            stack_mod.up(stack, nodes=2, with_deploy=False, echo=lines.append)
        entry = stack_mod.read_state(stack)["ray-node-2"]
        assert any(ln.startswith("ray-node-2: joined") for ln in lines), lines
        yield entry["node_id"]
    finally:
        lines.clear()
        stack_mod.up(stack, nodes=1, with_deploy=False, echo=lines.append)
    assert any(ln.startswith("ray-node-2: stopped") for ln in lines), lines
    assert not stack_mod.process_alive(entry) and "ray-node-2" not in stack_mod.read_state(stack)
    gone = next(n for n in probes.ray_nodes(stack) if n["node_id"] == entry["node_id"])
    assert gone["state"] == "DEAD"


@pytest.fixture(scope="module")
def dataset(stack) -> DatasetRef:
    from flows.prepare import prepare

    return prepare(config=cfg())  # cached across the session


HUB_ID = "llmflow-test/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_mirror(stack, tmp_path, monkeypatch) -> Path:
    """An HF hub cache holding HUB_ID at COMMIT (refs/main and its snapshot: the tiny model's
    files), as `huggingface-cli download` leaves one, seen by this process only: the flow
    runs here, offline; no Ray worker's cache (the head's default, node 2's own) has it."""
    from huggingface_hub import constants

    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.store import MANIFEST

    cache = tmp_path / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    tiny = Path(resolve_base_model(TrainConfig()))
    shutil.copytree(tiny, repo / "snapshots" / COMMIT, ignore=shutil.ignore_patterns(MANIFEST))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def ray_address() -> str:
    return os.environ["LLMFLOW_RAY_ADDRESS"]  # the session stack's head (client_env)


def train_workers(node_id: str | None = None) -> list:
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_address(),
        detail=True,
        limit=1000,
        filters=[("class_name", "=", "RayTrainWorker")],
    )
    return [a for a in actors if node_id is None or a.node_id == node_id]


def test_the_second_node_declares_a_gpu_and_gpu_node_and_status_shows_it(stack, second_node):
    from ray.util.state import list_nodes

    nodes = {
        n.node_id: n for n in list_nodes(address=ray_address(), detail=True) if n.state == "ALIVE"
    }
    node = nodes[second_node]
    assert not node.is_head_node
    assert (node.resources_total["GPU"], node.resources_total["gpu_node"]) == (1.0, 1.0)
    heads = [n for n in nodes.values() if n.is_head_node]
    assert len(heads) == 1 and "gpu_node" not in heads[0].resources_total

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), "status", "--json"],
        capture_output=True,
        text=True,
        env=user_env(),  # a user's shell: none of the stack's client variables
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [p for p in json.loads(proc.stdout) if p["name"] == "ray-node-2"]
    assert row["healthy"] and row["pid"] and row["detail"].startswith(f"node {second_node[:12]}: ")


def test_the_pipeline_trains_on_the_node_that_declares_gpu_node(
    stack, dataset, second_node, node2_hf_home, hub_mirror
):
    """The whole pipeline on a hub base model that one machine's HF cache holds (issue 30:
    a node-local cache path must not travel), training placed by a custom resource without
    use_gpu (torch never looks for CUDA): prepare, train on node 2, register, score, gate,
    promote. The base model is resolved in the flow's process and copied into the store;
    node 2 and the head's workers load that copy."""
    from flows.pipeline import pipeline
    from llmflow.store import Store

    # 60 steps: enough for the model to answer with digits, so the promotion's smoke test
    # passes (at 10 it answers nothing and the rollout is rolled back, as it should be).
    config = cfg(
        f"train.base_model={HUB_ID}",
        "train.resources_per_worker={gpu_node: 1}",
        "train.model_name=two-nodes",
        "train.max_steps=60",
        "train.checkpoint_every=60",
        "train.eval_every=60",
        # At 60 steps exact match is 0 for both it and the base: the loss it lowered, row by
        # row, is what the gate can tell apart (a tie does not promote).
        "gate.primary_metric=eval_loss",
        "serve.app_name=two-nodes",
        "serve.route_prefix=/two-nodes",
    )
    try:
        state = pipeline(config=config, return_state=True)
    finally:
        unserve(
            "two-nodes", "two-nodes"
        )  # its replica may sit on node 2, which stops after the module
    assert state.is_completed(), state.message
    result = state.result()
    # The same rows as the tiny base's (its tokenizer, mirrored); the hash names the base too.
    assert (result["dataset"]["num_train"], result["dataset"]["num_eval"]) == (
        dataset.num_train,
        dataset.num_eval,
    )
    # Every stage loaded the store's copy of the hub model at its commit, not a cache path.
    base = Store().uri("models", "_base", f"{HUB_ID.replace('/', '--')}@{COMMIT}")
    assert result["model"]["base_model"] == base
    assert json.loads((Path(base) / "manifest.json").read_text())["commit"] == COMMIT
    assert not list(node2_hf_home.rglob("models--*"))  # node 2 never fetched it itself
    assert {"exact_match", "eval_loss"} <= set(result["candidate"])
    assert result["gate_passed"] and not result["rollout"]["rolled_back"]
    assert result["rollout"]["served_version"] == result["model"]["version"]
    manifest = json.loads((Path(result["model"]["uri"]) / "manifest.json").read_text())
    run = json.loads((Path(manifest["train_run"]) / "llmflow_result.json").read_text())
    assert run["node_id"] == second_node  # rank 0 reported where it ran
    assert (manifest["device"], manifest["precision"]) == ("cpu", "fp32")
    assert run["metrics"]["train_loss_last"] < run["metrics"]["train_loss_first"]

    # From Ray's state API: the run's worker held gpu_node (and no GPU) on the second node,
    # and no worker holding gpu_node ran anywhere else.
    placed = [
        a for a in train_workers() if any(k.startswith("gpu_node") for k in a.required_resources)
    ]
    assert placed and {a.node_id for a in placed} == {second_node}, [
        (a.node_id, a.required_resources) for a in placed
    ]
    assert not any(k.startswith("GPU") for a in placed for k in a.required_resources)


def test_use_gpu_workers_are_placed_on_the_gpu_node_and_fall_back_to_cpu(
    stack, dataset, second_node
):
    from ray.util.state import list_tasks

    from flows.finetune import finetune

    config = cfg("train.use_gpu=true", "train.model_name=ft-gpu")
    state = finetune(config=config, dataset=dataset, return_state=True)
    assert state.is_completed(), state.message
    manifest = json.loads((Path(state.result().uri) / "manifest.json").read_text())
    assert manifest["device"] == "cpu"  # CUDA is absent: trained on the GPU node's CPU

    # From Ray's state API: the training worker ran on the GPU node, holding its GPU ...
    workers = train_workers(second_node)
    assert any(k.startswith("GPU") for w in workers for k in w.required_resources), workers
    # ... and the Prefect task that launched the trainer reserved no GPU (nor CPU).
    launchers = [
        t
        for t in list_tasks(address=ray_address(), detail=True, limit=10000)
        if "_run_prefect_task" in (t.func_or_class_name or "")
    ]
    assert launchers
    assert not any(k.startswith("GPU") for t in launchers for k in (t.required_resources or {}))


def test_training_that_asks_for_an_undeclared_resource_fails_before_it_starts(
    stack, dataset, second_node
):
    from flows.finetune import finetune
    from llmflow.errors import ConfigError

    # Another seed: with the first test's inputs, the finished run would be reused as it is
    # (where a run is placed is not part of its key), and nothing would be placed at all.
    config = cfg(
        "train.resources_per_worker={tpu_node: 1}", "train.seed=7", "train.model_name=two-nodes-x"
    )
    with pytest.raises(
        ConfigError,
        match=r"needs 1 CPU, 1 tpu_node, but the Ray "
        r"cluster has \d+ CPU, 0 tpu_node in total",
    ):
        finetune(config=config, dataset=dataset)
