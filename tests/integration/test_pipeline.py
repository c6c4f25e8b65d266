"""`retrain=if-data-changed`: the pipeline prepares the data and stops when the latest
version was trained on the same dataset (content hash). The full pipeline, run through the
API on the worker and killed and re-run, is the drill in tests/drills/."""

from __future__ import annotations

import pytest

from llmflow import registry
from llmflow.configfile import load_config
from llmflow.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "retrain-test"


def test_retrain_if_data_changed_skips_when_the_latest_version_saw_this_data(stack):
    from flows.pipeline import pipeline
    from flows.prepare import prepare
    from llmflow.basemodels import resolve_base_model

    config = load_config("configs/tiny.yaml", [f"train.model_name={NAME}"])
    dataset = prepare(config=config)  # cached across the session
    # A version trained on this very dataset (its weights do not matter to the decision).
    v1 = registry.register_version(
        Store(),
        NAME,
        resolve_base_model(config.train),
        base_model="tiny",
        dataset_sha256=dataset.sha256,
    )
    state = pipeline(config=config, retrain="if-data-changed", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["skipped"].startswith(f"data unchanged: {NAME}:{v1.version} was trained on")
    assert (
        result["model"]["version"] == v1.version and result["dataset"]["sha256"] == dataset.sha256
    )
    assert registry.list_versions(Store(), NAME) == [v1]  # nothing trained or registered
