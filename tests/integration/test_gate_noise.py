"""The gate tells a real gain from noise (issue 31's test): on the tiny config the first run
against the base model promotes; a second run whose only change is `train.weight_decay: 1e-9`
(its weights equal the champion's up to a negligible change) is not promoted under the default
policy: `llmflow run` exits 3 with the gate's interval, the run is Completed but named
NotPromoted, and `llmflow models list` shows the refusal. The second run also carries an LLM
judge (a deterministic endpoint of the test) and a benchmark task, through the pipeline's
own tasks. (~3 min here: two 150-step trainings, five scorings.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.errors import NOT_PROMOTED, NotPromoted
from llmflow.store import Store
from tests.integration.helpers import Judge, judge_endpoint, unserve, user_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
NAME = "gate-noise"
TASK = "llmflow/bundled/lm_eval/llmflow_reverse.yaml"
# The tiny config, shorter: 150 steps answer part of the rows exactly (the base answers none),
# scored on 128 rows; evaluation and checkpoints only at the end.
SETS = [
    f"train.model_name={NAME}",
    "train.max_steps=150",
    "train.eval_every=150",
    "train.checkpoint_every=150",
    "eval.max_examples=128",
    f"serve.app_name={NAME}",
    "serve.route_prefix=/gate-noise",
]


def _artifacts(flow_run_id) -> dict:
    """key -> artifact of the flow run (and its subflows' are not needed here)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


@pytest.fixture(scope="module")
def app(stack):
    yield NAME
    unserve(NAME, NAME)  # free its replica's CPU for the tests after this module


def test_a_negligible_change_is_not_promoted_while_the_first_run_against_the_base_is(stack, app):
    from flows.pipeline import pipeline

    first = pipeline(config=load_config("configs/tiny.yaml", SETS), return_state=True)
    assert first.is_completed() and first.name == "Completed", first.message
    result = first.result()
    v1 = result["model"]["version"]
    assert result["gate_passed"] and aliases.read_aliases(Store(), NAME)["champion"] == v1
    gate = registry.read_manifest(Store(), NAME, v1)["gate"]
    reason = gate["rules"][0]["reason"]
    assert re.search(r"\(95% interval \+0\.\d+\.\.\+\d\.\d+; \d+ won, 0 lost", reason), reason
    assert "lower bound above the required margin +0 (superiority)" in reason
    # What a reviewer reads in the UI: the examples won and lost, the table with intervals.
    artifacts = _artifacts(first.state_details.flow_run_id)
    changes = artifacts["eval-changes"].data
    assert "### 5 examples the candidate won on exact_match" in changes, changes
    assert "### 0 examples the candidate lost on exact_match" in changes, changes
    data = artifacts["eval-comparison"].data
    table = {r["name"]: r for r in (json.loads(data) if isinstance(data, str) else data)}
    assert re.search(r"won, 0 lost, \d+ tied\)$", table["exact_match"]["improvement, interval"])

    # The same run with weight decay 1e-9, from the command line as a user runs it; with an
    # LLM judge (the test's endpoint) and a benchmark task, whose metrics join the reports.
    Judge.seen.clear()
    with judge_endpoint() as url:
        judge = f"{{engine: http, url: '{url}', model: judge, api_key_env: LLMFLOW_JUDGE_KEY}}"
        extra = [
            "train.weight_decay=1e-9",
            f"eval.benchmarks={{tasks: [{TASK}], limit: 16}}",
            f"eval.judge={judge}",
        ]
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "llmflow"),
                "run",
                "pipeline",
                "--config",
                "configs/tiny.yaml",
                *(x for s in [*SETS, *extra] for x in ("--set", s)),
            ],
            capture_output=True,
            text=True,
            env=user_env(LLMFLOW_JUDGE_KEY="k-gate"),
            cwd=ROOT,
            timeout=900,
            check=False,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == NotPromoted.exit_code == 3, out[-3000:]
    v2 = registry.get_version(Store(), NAME).version
    assert v2 != v1 and aliases.read_aliases(Store(), NAME)["champion"] == v1
    line = " ".join(out.split())
    assert re.search(
        r"gate failed: exact_match (\S+) vs champion \S+: [+-]\S+ \(95% interval -?\S+\.\.\S+; "
        r"\d+ won, \d+ lost, \d+ tied\): does not exclude the required margin \+0 \(superiority\)",
        line,
    ), out[-3000:]
    assert f"flow 'pipeline' not promoted: the gate refused {NAME}:{v2}" in line, out[-3000:]
    refused = registry.read_manifest(Store(), NAME, v2)["gate"]
    assert refused["passed"] is False and "does not exclude" in refused["rules"][0]["reason"]
    # The judge saw every row twice (both orders) with the key; equal answers tie at 0.5.
    scored = registry.read_manifest(Store(), NAME, v2)["eval"]["metrics"]
    assert len(Judge.seen) == 2 * 128 and {j["auth"] for j in Judge.seen} == {"Bearer k-gate"}
    assert scored["judge"] == 0.5 and scored["judge_unparseable"] == 0
    assert 0 <= scored["llmflow_reverse/exact_match"] <= 1  # 16 documents of the bundled task

    from prefect.client.orchestration import get_client

    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", out)[1]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.is_completed() and state.name == NOT_PROMOTED, state

    listed = subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), "models", "list", NAME],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout
    row = {v: [ln for ln in listed.splitlines() if re.search(rf"\b{v}\b", ln)] for v in (v1, v2)}
    assert "failed" in row[v2][0] and "passed" in row[v1][0], listed
