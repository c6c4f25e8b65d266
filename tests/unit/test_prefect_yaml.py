"""prefect.yaml is code too: every deployment's entrypoint imports, is a flow, and its
parameters match the flow's signature; flows default to configs/tiny.yaml."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from llmflow.config import PipelineConfig
from llmflow.configfile import load_config

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
    from llmflow.cli_common import FLOWS

    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS}
    for name, target in FLOWS.items():
        module, func = target.split(":")
        assert f"{module.replace('.', '/')}.py:{func}" in entrypoints, name


# -- the Kubernetes work-pool variant --------------------------------------------------------
K8S = yaml.safe_load((ROOT / "infra/k8s/prefect.yaml").read_text())


def kubernetes_job_variables() -> set[str]:
    """The variables of the Kubernetes work pool's default base job template, as Prefect
    ships it (the server hands this template to `prefect work-pool create --type kubernetes`)."""
    import json

    import prefect

    views = Path(prefect.__file__).parent / "server/api/collections_data/views"
    meta = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return set(
        meta["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]["variables"][
            "properties"
        ]
    )


def test_kubernetes_variant_deploys_the_same_flows_with_the_same_parameters_and_schedules():
    def shape(d):
        return (d["entrypoint"], d.get("parameters"), d.get("schedules"))

    k8s = {d["name"]: shape(d) for d in K8S["deployments"]}
    assert k8s == {f"{d['name']}-k8s": shape(d) for d in DEPLOYMENTS}


def test_kubernetes_job_variables_live_in_one_place_and_exist_in_the_template():
    pool = K8S["definitions"]["work_pools"]["kubernetes"]
    assert all(d["work_pool"] == pool for d in K8S["deployments"])  # one anchor for all
    assert pool["name"] == "{{ $LLMFLOW_K8S_WORK_POOL }}"
    assert set(pool["job_variables"]) <= kubernetes_job_variables()
    env = pool["job_variables"]["env"]
    assert env["LLMFLOW_RAY_ADDRESS"].startswith("ray://") and "://" in env["LLMFLOW_STORE"]


def test_retrain_nightly_has_an_explicit_timezone_and_retrains_only_on_new_data():
    [nightly] = [d for d in DEPLOYMENTS if d["name"] == "retrain-nightly"]
    [schedule] = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "Europe/Berlin"
    assert nightly["parameters"] == {"retrain": "if-data-changed"}
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"


def test_a_paused_stack_registers_every_schedule_paused_and_nothing_else_changed(
    tmp_path, monkeypatch
):
    from llmflow import stack
    from llmflow.settings import StackSettings

    monkeypatch.setenv("LLMFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("LLMFLOW_PAUSE_SCHEDULES", "1")
    s = StackSettings.from_env()
    assert s.pause_schedules
    copy = yaml.safe_load(stack._paused_copy(s, ROOT / "prefect.yaml").read_text())
    scheduled = [d for d in copy["deployments"] if d.get("schedules")]
    assert scheduled and all(not x["active"] for d in scheduled for x in d["schedules"])
    # Put the switches back and the copy is prefect.yaml itself (anchors resolved).
    for d in scheduled:
        for x in d["schedules"]:
            x["active"] = True
    assert copy == SPEC


@pytest.mark.parametrize("raw, paused", [("", False), ("0", False), ("true", True), ("1", True)])
def test_pause_schedules_switch(raw, paused, monkeypatch):
    from llmflow.settings import StackSettings

    monkeypatch.setenv("LLMFLOW_PAUSE_SCHEDULES", raw)
    assert StackSettings.from_env().pause_schedules is paused


def test_a_malformed_pause_switch_is_one_clear_error(monkeypatch):
    from llmflow.errors import ConfigError
    from llmflow.settings import StackSettings

    monkeypatch.setenv("LLMFLOW_PAUSE_SCHEDULES", "maybe")
    with pytest.raises(ConfigError, match="LLMFLOW_PAUSE_SCHEDULES='maybe'"):
        StackSettings.from_env()
