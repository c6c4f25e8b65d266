"""prefect.yaml is code too: every deployment's entrypoint imports, is a flow, and its
parameters match the flow's signature; flows default to configs/tiny.yaml."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from llmflow.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = SPEC["deployments"]


def load_entrypoint(entrypoint: str):
    path, func = entrypoint.split(":")
    module_name = path.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module_name), func)


def test_names_are_unique():
    names = [d["name"] for d in DEPLOYMENTS]
    assert len(names) == len(set(names)) and {"pipeline", "prepare", "check"} <= set(names)


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_is_a_flow_with_matching_parameters(dep):
    from prefect import Flow

    assert (ROOT / dep["entrypoint"].split(":")[0]).is_file()
    flow = load_entrypoint(dep["entrypoint"])
    assert isinstance(flow, Flow)
    sig = inspect.signature(flow.fn)
    assert set(dep.get("parameters") or {}) <= set(sig.parameters), dep["name"]
    assert "config" in sig.parameters
    assert sig.parameters["config"].annotation in (PipelineConfig, "PipelineConfig")
    # The UI form starts from the tiny CPU default.
    assert sig.parameters["config"].default == load_config(ROOT / "configs/tiny.yaml")
    assert dep["work_pool"]["name"] == "{{ $LLMFLOW_WORK_POOL }}"


def test_every_flow_in_the_cli_is_deployed():
    from llmflow.cli import FLOWS

    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS}
    for name, target in FLOWS.items():
        module, func = target.split(":")
        assert f"{module.replace('.', '/')}.py:{func}" in entrypoints, name
