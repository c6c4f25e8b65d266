"""Prefect tasks of the prepare stage: base model, then load -> clean -> validate -> store.

The logic lives in llmflow/prepare/; these wrappers add the cache, the artifacts and the
failure message.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.config import DataConfig, PipelineConfig, TrainConfig
from llmflow.prepare.dataset import DataValidationError, prep_config, prepare_to_store
from llmflow.prepare.sources import fingerprint_source
from llmflow.refs import DatasetRef
from llmflow.runs import flow_run_id
from llmflow.store import Store
from llmflow.terminal import stage


def _prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """Same source bytes + same prep config + same tokenizer + same store = same dataset."""
    data: DataConfig = parameters["data"]
    h = hashlib.sha256()
    h.update(fingerprint_source(data).encode())
    h.update(json.dumps(prep_config(data, parameters["base_model_uri"]), sort_keys=True).encode())
    h.update(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode())
    h.update(Store().root.encode())
    return f"prepare-{h.hexdigest()[:32]}"


@task(name="base-model", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def base_model(train: TrainConfig) -> str:
    """Resolve train.base_model (building the tiny model once); returns where to load it.

    Called, not submitted: it runs in the flow run's own process, where the preflight read
    the model's config, so it sees the same hub access, token and HF cache. A Ray worker may
    sit on a node with another cache or no network; what every node then loads is the copy
    this makes in the store (basemodels.materialise), never a path into one node's cache.
    """
    from llmflow.basemodels import resolve_base_model

    return resolve_base_model(train)


@task(name="prepare-dataset", cache_key_fn=_prepare_cache_key, persist_result=True)
def prepare_dataset(data: DataConfig, base_model_uri: str) -> DatasetRef:
    """Prepare and validate the data; a re-run on the same input is a cache hit."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from llmflow.prepare.validation_report import report_markdown, report_table

    logger = get_run_logger()
    ref, report, run_uri = prepare_to_store(data, base_model_uri, Store(), flow_run_id())
    create_table_artifact(
        key="dataset-validation",
        table=report_table(report),
        description=f"Validation of {data.source}: {'passed' if report.success else 'FAILED'}",
    )
    summary = (
        f"**source** `{data.source}` · rows read {report.num_input} · train {report.num_train}"
        f" · eval {report.num_eval} · quarantined {report.num_quarantined}"
        f" ({report.quarantine_fraction:.1%}) → `{run_uri}/quarantine.jsonl`"
        f" · duplicates dropped {report.num_duplicates}\n\n"
    )
    if ref is not None:
        summary += f"**dataset** `{ref.uri}` (sha256 `{ref.sha256[:16]}`)\n\n"
    create_markdown_artifact(
        key="dataset-validation-report", markdown=summary + report_markdown(report)
    )
    if ref is None:
        raise DataValidationError(
            f"{report.failure_message()}; quarantined rows: {run_uri}/quarantine.jsonl"
        )
    logger.info(
        "dataset %s: %d train, %d eval, %d quarantined",
        ref.uri,
        ref.num_train,
        ref.num_eval,
        ref.num_quarantined,
    )
    return ref


def prepare_stage(config: PipelineConfig) -> tuple[str, DatasetRef]:
    """base-model, then prepare-dataset: (the base model's uri, the prepared dataset)."""
    model_uri = base_model(config.train)  # in this process (see base_model)
    d = prepare_dataset.submit(config.data, model_uri).result()
    rows = f"{d.num_train} train / {d.num_eval} eval rows, {d.num_quarantined} quarantined"
    rows += f", {d.num_duplicates} duplicates dropped" if d.num_duplicates else ""
    rows += f", {d.num_truncated} truncated to data.max_tokens" if d.num_truncated else ""
    stage("prepare", f"dataset {d.short_sha}: {rows}")
    return model_uri, d
