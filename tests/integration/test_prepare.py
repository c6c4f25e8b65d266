"""The prepare flow on the local stack: a DatasetRef in the store, a validation artifact in
Prefect, a cache hit on a re-run, and a readable failure for bad data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
)

from llmflow.configfile import load_config
from llmflow.refs import DatasetRef
from llmflow.store import Store
from tests.integration.helpers import task_states, user_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def llmflow(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`llmflow ARGS` as a user runs it: a subprocess in a user's shell (user_env)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "llmflow"), *args],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def test_prepare_leaves_a_dataset_and_a_validation_artifact_then_hits_the_cache(
    stack, prefect_client
):
    from flows.prepare import prepare

    # A prep setting no other test uses (the same rows, another cache key): other modules
    # prepare the tiny default too, and their cache hit would leave this run no artifacts.
    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.max_chars=7999"])
    state = prepare(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    ref: DatasetRef = state.result()
    store = Store()
    manifest = store.read_json(store.rel(ref.uri), "manifest.json")
    assert manifest["ref"]["sha256"] == ref.sha256 and ref.uri.endswith(ref.sha256[:16])
    assert ref.num_train > 3000 and 300 < ref.num_eval < 500
    import pyarrow.parquet as pq

    train = pq.read_table(Path(ref.uri) / "train.parquet").to_pylist()
    assert len(train) == ref.num_train
    assert train[0]["messages"][-1]["role"] == "assistant" and train[0]["n_tokens"] > 0
    validation = json.loads((Path(ref.uri) / "validation.json").read_text())
    assert validation["success"] is True

    run_id = state.state_details.flow_run_id
    artifacts = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    )
    kinds = {a.key: a.type for a in artifacts}
    assert kinds == {"dataset-validation": "table", "dataset-validation-report": "markdown"}
    table = next(a for a in artifacts if a.type == "table")
    assert "expect_table_row_count_to_be_between" in str(table.data)

    again = prepare(config=cfg, return_state=True)
    assert again.is_completed()
    assert again.result() == ref
    # A task run's state reaches the server as an event, applied asynchronously.
    wait_for(
        lambda: (
            dict(task_states(prefect_client, again.state_details.flow_run_id)).get(
                "prepare-dataset"
            )
            not in (None, "None", "Pending", "Running")
        ),
        timeout=60,
        what="the second prepare-dataset run's final state",
    )
    names = dict(task_states(prefect_client, again.state_details.flow_run_id))
    assert names["prepare-dataset"] == "Cached"


def test_bad_rows_past_the_bound_fail_with_a_readable_reason(stack, tmp_path):
    rows = [
        json.dumps({"prompt": f"Reverse this number: {i}", "completion": str(i)[::-1]})
        for i in range(1000, 1200)
    ]
    bad = [
        '{"prompt": "x"',
        json.dumps({"prompt": 5, "completion": "a"}),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
    ] * 10
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(rows + bad) + "\n")
    proc = llmflow(
        "run",
        "prepare",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"data.source={f}",
        "--set",
        "data.min_rows=50",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # An expected failure: its one-line reason, no traceback (the log file and the UI keep it).
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), proc.stderr
    assert "validation failed: quarantined share 0.1304 > 0.05" in err[0]
    qpath = err[0].split("quarantined rows: ")[1].split(" ")[0]
    quarantined = [json.loads(x) for x in Path(qpath).read_text().splitlines()]
    assert len(quarantined) == 30
    assert {q["reason"] for q in quarantined} == {
        "malformed JSON: Expecting ',' delimiter at column 15",
        "prompt is int, expected a string",
        "messages[0] has unknown role 'wizard'",
    }
    assert quarantined[0]["line"] == 201


def test_within_the_bound_the_run_passes_and_keeps_the_quarantine(stack, tmp_path):
    from flows.prepare import prepare

    rows = [
        json.dumps({"prompt": f"Reverse this number: {i}", "completion": str(i)[::-1]})
        for i in range(1000, 1300)
    ]
    f = tmp_path / "few-bad.jsonl"
    f.write_text("\n".join(rows + ['{"prompt": 1, "completion": "x"}']) + "\n")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.source={f}", "data.min_rows=50"])
    state = prepare(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    ref = state.result()
    assert ref.num_quarantined == 1
    q = (Path(ref.uri) / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(q[0])["line"] == 301


def test_missing_source_fails_before_any_cluster_work(stack):
    proc = llmflow("run", "prepare", "--set", "data.source=/nonexistent/data.jsonl", timeout=300)
    assert proc.returncode == 1
    assert "data.source: /nonexistent/data.jsonl: no such file or directory" in proc.stderr


def test_a_users_datasetdict_is_prepared_by_its_own_splits_and_columns(stack, tmp_path):
    """Issue 33's user: a saved DatasetDict (train/validation/test) with its own columns,
    prepared from a plain shell with one config and no conversion: the eval split is its test
    split, the training rows that repeat a test row are dropped and said so."""
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    def qa(i: int) -> dict:
        return {"question": f"Reverse this number: {i}", "answer": str(i)[::-1], "uid": i}

    DatasetDict(
        {
            "train": Dataset.from_list([qa(i) for i in range(1000, 1150)] + [qa(5000)]),
            "validation": Dataset.from_list([qa(i) for i in range(3000, 3010)]),
            "test": Dataset.from_list([qa(i) for i in range(5000, 5020)]),
        }
    ).save_to_disk(str(tmp_path / "user"))
    proc = llmflow(
        "run",
        "prepare",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"data.source={tmp_path / 'user'}",
        "--set",
        "data.eval_split=test",
        "--set",
        "data.columns={prompt: question, response: answer}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = "150 train / 20 eval rows, 0 quarantined, 1 duplicates dropped"
    [sha] = [ln.split("dataset ")[1][:16] for ln in proc.stdout.splitlines() if line in ln]
    uri = Store().uri("datasets", sha)
    evals = pq.read_table(Path(uri) / "eval.parquet").to_pylist()
    assert sorted(r["messages"][0]["content"] for r in evals) == sorted(
        f"Reverse this number: {i}" for i in range(5000, 5020)
    )
    manifest = json.loads((Path(uri) / "manifest.json").read_text())
    assert manifest["prep_config"]["eval_split"] == "test"
    assert manifest["prep_config"]["columns"] == {"prompt": "question", "response": "answer"}
