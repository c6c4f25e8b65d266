"""Drill: a training worker killed with SIGKILL mid-run. Ray Train replaces it and the run
goes on from its last registered checkpoint to the end (FailureConfig.max_failures)."""

from __future__ import annotations

import pytest

from llmflow.refs import DatasetRef
from tests.integration.helpers import (
    alive_train_workers,
    kill_worker_after_first_checkpoint,
    run_in_thread,
)
from tests.integration.test_finetune import LONG, TINY, cfg, run_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def dataset(stack) -> DatasetRef:
    from flows.prepare import prepare

    return prepare(config=cfg(*TINY))  # cached across the session


def test_killed_worker_is_replaced_and_the_run_completes(stack, dataset):
    config = cfg(*LONG, "train.weight_decay=0.002", "train.max_failures=2")
    path = run_dir(config, dataset)
    t, done, out = run_in_thread(config, dataset)
    killed = kill_worker_after_first_checkpoint(path, done)
    t.join(timeout=300)
    state = out["state"]
    assert state.is_completed(), state.message
    m = state.result().train_metrics
    # the replacement worker started from a checkpoint, not from step 0
    assert 0 < m["start_step"] < 200 and m["steps"] == 200, m
    assert m["train_loss_last"] < m["train_loss_first"]
    assert killed not in {w.pid for w in alive_train_workers()}
