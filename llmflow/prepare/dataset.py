"""A prepared dataset in the store: records read, normalised and validated, the splits written
as parquet with their manifest, the quarantined rows beside them. The cache key's inputs
(`prep_config`) and the content hash make a re-run of the same input reuse its dataset.
"""

from __future__ import annotations

import io
import json
from typing import Any

from llmflow.config import DataConfig
from llmflow.errors import LlmflowError
from llmflow.prepare.records import dataset_sha256, prepare_records
from llmflow.prepare.sources import fingerprint_source, iter_records
from llmflow.refs import DatasetRef
from llmflow.store import MANIFEST, Store

PREP_VERSION = 1  # bump when the transform changes, so old cache entries stop matching


class DataValidationError(LlmflowError):
    """The prepared data failed its validation suite or quarantined too many rows."""


def prep_config(data: DataConfig, base_model_uri: str) -> dict[str, Any]:
    """What, besides the rows, decides the prepared dataset: part of its content address."""
    cfg = {
        "version": PREP_VERSION,
        "eval_fraction": data.eval_fraction,
        "max_rows": data.max_rows,
        "max_chars": data.max_chars,
        "max_tokens": data.max_tokens,
        "tokenizer": base_model_uri,
    }
    # Which rows are read and how: only when set, so the datasets prepared before these
    # options keep their content address.
    options = {
        "subset": data.subset,
        "split": data.split,
        "eval_split": data.eval_split,
        "columns": data.columns,
        "truncation": data.truncation if data.truncation != "quarantine" else None,
    }
    return cfg | {k: v for k, v in options.items() if v}


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


def parquet_bytes(rows: list[dict]) -> bytes:
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
    from llmflow.prepare.validation import validate_dataset

    counter = chat_token_counter(load_tokenizer(base_model_uri))
    prepared = prepare_records(
        iter_records(data),
        eval_fraction=data.eval_fraction,
        max_chars=data.max_chars,
        max_tokens=data.max_tokens,
        max_rows=data.max_rows,
        count_tokens=counter,
        eval_records=iter_records(data, data.eval_split) if data.eval_split else None,
        columns=data.columns,
        truncate=data.truncation == "truncate",
    )
    report = validate_dataset(
        pd.DataFrame(prepared.train, columns=["id", "messages", "n_chars", "n_tokens"]),
        pd.DataFrame(prepared.eval, columns=["id", "messages", "n_chars", "n_tokens"]),
        cfg=data,
        num_input=prepared.num_input,
        num_quarantined=len(prepared.quarantined),
    ).model_copy(
        update={"num_duplicates": prepared.num_duplicates, "num_truncated": prepared.num_truncated}
    )
    quarantine = _jsonl([q.as_dict() for q in prepared.quarantined])
    validation = report.model_dump(mode="json") | {
        "num_truncated_by_max_rows": prepared.num_truncated_by_max_rows,
    }
    run_dir = ("runs", run_id, "prepare")
    store.write_bytes(quarantine, *run_dir, "quarantine.jsonl")
    store.write_json(validation, *run_dir, "validation.json")
    if not report.success:
        return None, report, store.uri(*run_dir)

    cfg = prep_config(data, base_model_uri)
    sha = dataset_sha256(prepared, cfg)
    parts = ("datasets", sha[:16])
    ref = DatasetRef(
        uri=store.uri(*parts),
        sha256=sha,
        num_train=len(prepared.train),
        num_eval=len(prepared.eval),
        num_quarantined=len(prepared.quarantined),
        num_duplicates=prepared.num_duplicates,
        num_truncated=prepared.num_truncated,
        validation_uri=store.uri(*parts, "validation.json"),
        source=data.source,
    )
    if not store.exists(*parts, MANIFEST):
        with store.atomic_dir(*parts) as tmp:
            (tmp / "train.parquet").write_bytes(parquet_bytes(prepared.train))
            (tmp / "eval.parquet").write_bytes(parquet_bytes(prepared.eval))
            (tmp / "validation.json").write_text(json.dumps(validation, indent=2))
            (tmp / "quarantine.jsonl").write_bytes(quarantine)
            manifest = {
                "ref": ref.model_dump(mode="json"),
                "prep_config": cfg,
                "num_input": prepared.num_input,
                "run_id": run_id,
                "source_fingerprint": fingerprint_source(data),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        ref = DatasetRef.model_validate(store.read_json(*parts, MANIFEST)["ref"])
    return ref, report, store.uri(*run_dir)
