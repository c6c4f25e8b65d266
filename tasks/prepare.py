"""Prefect tasks of the prepare stage: base model, then load -> clean -> validate -> store.

The logic lives in tasks/data.py and tasks/validation.py; these wrappers add the store, the
cache, the artifacts and the failure message.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.config import DataConfig, TrainConfig
from llmflow.errors import LlmflowError
from llmflow.refs import DatasetRef
from llmflow.runs import flow_run_id
from llmflow.store import MANIFEST, Store
from tasks import data as D

PREP_VERSION = 1  # bump when the transform changes, so old cache entries stop matching


class DataValidationError(LlmflowError):
    """The prepared data failed its validation suite or quarantined too many rows."""


def prep_config(data: DataConfig, base_model_uri: str) -> dict[str, Any]:
    """What, besides the rows, decides the prepared dataset: part of its content address."""
    return {
        "version": PREP_VERSION,
        "eval_fraction": data.eval_fraction,
        "max_rows": data.max_rows,
        "max_chars": data.max_chars,
        "max_tokens": data.max_tokens,
        "tokenizer": base_model_uri,
    }


def _rows_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("n_chars", pa.int64()),
            ("n_tokens", pa.int64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_rows_table(rows), buf)
    return buf.getvalue()


def _jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode()


def prepare_to_store(
    data: DataConfig, base_model_uri: str, store: Store, run_id: str = "local"
) -> tuple[DatasetRef | None, Any, str]:
    """Load, normalise, clean, split and validate ``data.source``; publish it when it passes.

    Returns:
        (DatasetRef or None when validation failed, the ValidationReport, the run directory
        holding validation.json and quarantine.jsonl).
    """
    import pandas as pd

    from llmflow.basemodels import chat_token_counter, load_tokenizer
    from tasks.validation import validate_dataset

    counter = chat_token_counter(load_tokenizer(base_model_uri))
    prepared = D.prepare_records(
        D.iter_records(data.source, data.revision),
        eval_fraction=data.eval_fraction,
        max_chars=data.max_chars,
        max_tokens=data.max_tokens,
        max_rows=data.max_rows,
        count_tokens=counter,
    )
    report = validate_dataset(
        pd.DataFrame(prepared.train, columns=["id", "messages", "n_chars", "n_tokens"]),
        pd.DataFrame(prepared.eval, columns=["id", "messages", "n_chars", "n_tokens"]),
        cfg=data,
        num_input=prepared.num_input,
        num_quarantined=len(prepared.quarantined),
    )
    quarantine = _jsonl([q.as_dict() for q in prepared.quarantined])
    validation = report.model_dump(mode="json") | {
        "num_duplicates": prepared.num_duplicates,
        "num_truncated_by_max_rows": prepared.num_truncated_by_max_rows,
    }
    run_dir = ("runs", run_id, "prepare")
    store.write_bytes(quarantine, *run_dir, "quarantine.jsonl")
    store.write_json(validation, *run_dir, "validation.json")
    if not report.success:
        return None, report, store.uri(*run_dir)

    cfg = prep_config(data, base_model_uri)
    sha = D.dataset_sha256(prepared, cfg)
    parts = ("datasets", sha[:16])
    ref = DatasetRef(
        uri=store.uri(*parts),
        sha256=sha,
        num_train=len(prepared.train),
        num_eval=len(prepared.eval),
        num_quarantined=len(prepared.quarantined),
        validation_uri=store.uri(*parts, "validation.json"),
        source=data.source,
    )
    if not store.exists(*parts, MANIFEST):
        with store.atomic_dir(*parts) as tmp:
            (tmp / "train.parquet").write_bytes(_parquet_bytes(prepared.train))
            (tmp / "eval.parquet").write_bytes(_parquet_bytes(prepared.eval))
            (tmp / "validation.json").write_text(json.dumps(validation, indent=2))
            (tmp / "quarantine.jsonl").write_bytes(quarantine)
            manifest = {"ref": ref.model_dump(mode="json"), "prep_config": cfg,
                        "num_input": prepared.num_input, "run_id": run_id,
                        "source_fingerprint": D.fingerprint_source(data.source, data.revision)}  # fmt: skip
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        ref = DatasetRef.model_validate(store.read_json(*parts, MANIFEST)["ref"])
    return ref, report, store.uri(*run_dir)


def _prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """Same source bytes + same prep config + same tokenizer + same store = same dataset."""
    data: DataConfig = parameters["data"]
    h = hashlib.sha256()
    h.update(D.fingerprint_source(data.source, data.revision).encode())
    h.update(json.dumps(prep_config(data, parameters["base_model_uri"]), sort_keys=True).encode())
    h.update(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode())
    h.update(Store().root.encode())
    return f"prepare-{h.hexdigest()[:32]}"


@task(name="base-model", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def base_model(train: TrainConfig) -> str:
    """Resolve train.base_model (building the tiny model once); returns where to load it."""
    from llmflow.basemodels import resolve_base_model

    return resolve_base_model(train)


@task(name="prepare-dataset", cache_key_fn=_prepare_cache_key, persist_result=True)
def prepare_dataset(data: DataConfig, base_model_uri: str) -> DatasetRef:
    """Prepare and validate the data; a re-run on the same input is a cache hit."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.validation import report_markdown, report_table

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
        f" ({report.quarantine_fraction:.1%}) → `{run_uri}/quarantine.jsonl`\n\n"
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
        "dataset %s: %d train, %d eval, %d quarantined", ref.uri, ref.num_train, ref.num_eval,
        ref.num_quarantined,
    )  # fmt: skip
    return ref
