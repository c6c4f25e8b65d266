"""Data-quality gate of the prepare stage: a Great Expectations suite over the prepared splits.

The prepared splits hold one nested ``messages`` list per example, and GX works on flat
columns, so the suite runs over three derived tables:

- ``train`` and ``eval``: one row per example (id, n_chars, n_tokens, n_messages, last_role);
- ``messages``: one row per message of either split (split, id, role, content_chars).

Two checks are not GX expectations and are reported the same way: the eval ids must be
disjoint from the train ids (a set lookup: as a GX set expectation the 100k train ids
would be copied into the expectation's kwargs and into every serialised report), and the
share of input rows the loader quarantined must stay under ``max_quarantine_fraction``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmflow.config import DataConfig

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_validation_result import (
        ExpectationValidationResult,
    )
from llmflow.prepare.validation_report import (
    DISJOINT_CHECK,
    QUARANTINE_CHECK,
    ExpectationOutcome,
    ValidationReport,
)

VALID_ROLES = ("system", "user", "assistant")


ID_REGEX = r"^[0-9a-f]{16}$"


EXAMPLE_COLUMNS = ("id", "n_chars", "n_tokens", "n_messages", "last_role")


TABLES = ("train", "eval", "messages")


# Column-map failures keep this many offending values and ids: enough to find the rows,
# small enough for a one-line failure message.
SAMPLE_SIZE = 5


def validate_dataset(
    train: pd.DataFrame,
    eval: pd.DataFrame,
    *,
    cfg: DataConfig,
    num_input: int,
    num_quarantined: int,
) -> ValidationReport:
    """Run the data-quality suite over the prepared splits. Pure: no Prefect, no files.

    Args:
        train, eval: the splits, columns id, messages, n_chars, n_tokens (llmflow/prepare/records.py).
        cfg: bounds: min_rows (train split), max_chars, max_tokens, max_duplicate_fraction
            (per split), max_quarantine_fraction.
        num_input, num_quarantined: rows the loader read and rows it rejected.

    Returns:
        A report whose ``success`` is False when any check failed; it never raises on bad
        data, so the caller decides whether to fail the run (``failure_message()``).
    """
    splits = {"train": train, "eval": eval}
    lists = {name: _message_lists(split) for name, split in splits.items()}
    examples = {name: example_table(split, lists[name]) for name, split in splits.items()}
    messages = message_table(splits, lists)

    outcomes: list[ExpectationOutcome] = []
    with _GX_LOCK:
        gx = _gx()
        for split, table in examples.items():
            suite = _example_suite(split, cfg, table)
            outcomes += _run(gx.batch_definitions[split], table, suite, index=["id"])
        suite = _message_suite(messages)
        outcomes += _run(gx.batch_definitions["messages"], messages, suite, index=["id"])

    outcomes.append(_disjoint_outcome(train, eval))
    fraction = num_quarantined / num_input if num_input else 0.0
    outcomes.append(
        ExpectationOutcome(
            name=QUARANTINE_CHECK,
            table="input",
            column=None,
            success=fraction <= cfg.max_quarantine_fraction,
            observed=round(fraction, 6),
            expected=f"<= {cfg.max_quarantine_fraction:g}",
        )
    )
    return ValidationReport(
        success=all(o.success for o in outcomes),
        outcomes=outcomes,
        num_input=num_input,
        num_train=len(train),
        num_eval=len(eval),
        num_quarantined=num_quarantined,
        quarantine_fraction=fraction,
    )


def _message_lists(split: pd.DataFrame) -> list[list | None]:
    """Each example's messages as a list, None where the cell is not a sequence."""
    if "messages" not in split.columns:
        return [None] * len(split)
    # Read back from parquet, a list<struct> cell is a numpy array of dicts, not a list.
    return [
        list(m) if isinstance(m, (list, tuple, np.ndarray)) else None for m in split["messages"]
    ]


def _role(message: Any) -> str | None:
    role = message.get("role") if isinstance(message, dict) else None
    return role if isinstance(role, str) else None


def example_table(split: pd.DataFrame, lists: list[list | None] | None = None) -> pd.DataFrame:
    """One row per example: the split's scalar columns plus n_messages and last_role.

    A missing input column stays missing, so the schema expectation reports it.
    """
    table = pd.DataFrame(index=split.index)
    for column in ("id", "n_chars", "n_tokens"):
        if column in split.columns:
            table[column] = split[column]
    if "messages" in split.columns:
        lists = _message_lists(split) if lists is None else lists
        # NaN (float) where messages is malformed, so not-null catches it; and no nullable
        # Int64: GX compares a numpy int/float column vectorised, anything else per value.
        table["n_messages"] = pd.Series(
            [len(m) if m is not None else None for m in lists], index=split.index, dtype=float
        )
        table["last_role"] = [_role(m[-1]) if m else None for m in lists]
    return table.reset_index(drop=True)


def message_table(
    splits: dict[str, pd.DataFrame], lists: dict[str, list[list | None]] | None = None
) -> pd.DataFrame:
    """One row per message of every split: split, id, role, content_chars (NaN unless str)."""
    parts = []
    for name, split in splits.items():
        split_lists = _message_lists(split) if lists is None else lists[name]
        counts = [len(m) if m is not None else 0 for m in split_lists]
        flat = [msg for m in split_lists if m is not None for msg in m]
        ids = split["id"].to_numpy() if "id" in split.columns else np.full(len(split), None)
        contents = [msg.get("content") if isinstance(msg, dict) else None for msg in flat]
        parts.append(
            pd.DataFrame(
                {
                    "split": name,
                    "id": np.repeat(ids, counts),
                    "role": [_role(msg) for msg in flat],
                    "content_chars": pd.Series(
                        [len(c) if isinstance(c, str) else None for c in contents], dtype=float
                    ),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _example_suite(split: str, cfg: DataConfig, table: pd.DataFrame) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    # The train split carries min_rows; eval only has to be non-empty.
    min_rows = cfg.min_rows if split == "train" else 1
    entries = [
        (
            gxe.ExpectTableColumnsToMatchSet(column_set=list(EXAMPLE_COLUMNS), exact_match=False),
            "columns include " + ", ".join(EXAMPLE_COLUMNS) + " (the last two from messages)",
        ),
        (gxe.ExpectTableRowCountToBeBetween(min_value=min_rows), f">= {min_rows}"),
        *[(gxe.ExpectColumnValuesToNotBeNull(column=c), "not null") for c in EXAMPLE_COLUMNS],
        (gxe.ExpectColumnValuesToMatchRegex(column="id", regex=ID_REGEX), "16 lowercase hex chars"),
        *[
            (gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=_INT_TYPES), "integer")
            for c in ("n_chars", "n_tokens")
        ],
        (
            gxe.ExpectColumnValuesToBeBetween(
                column="n_chars", min_value=1, max_value=cfg.max_chars
            ),
            f"1..{cfg.max_chars}",
        ),
        (
            gxe.ExpectColumnValuesToBeBetween(
                column="n_tokens", min_value=1, max_value=cfg.max_tokens
            ),
            f"1..{cfg.max_tokens}",
        ),
        # A prompt and a reply at least: an assistant turn alone teaches nothing conditional.
        (gxe.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2), ">= 2"),
        (gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]), "assistant"),
    ]
    if len(table):
        # An empty column's unique share is 0, not 1: leave that to the row-count check.
        min_unique = 1.0 - cfg.max_duplicate_fraction
        entries.append(
            (
                gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
                    column="id", min_value=min_unique
                ),
                f"unique share >= {min_unique:g}",
            )
        )
    return _suite(gx, f"llmflow-{split}", split, entries, table.columns)


def _message_suite(table: pd.DataFrame) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    entries = [
        (gxe.ExpectColumnValuesToNotBeNull(column="role"), "not null"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="role", value_set=list(VALID_ROLES)),
            "in {" + ", ".join(VALID_ROLES) + "}",
        ),
        (gxe.ExpectColumnValuesToNotBeNull(column="content_chars"), "not null (content is a str)"),
        (gxe.ExpectColumnValuesToBeBetween(column="content_chars", min_value=1), ">= 1"),
    ]
    return _suite(gx, "llmflow-messages", "messages", entries, table.columns)


# dtype names GX accepts as integer columns; Int64 etc. are pandas' nullable integers.
_INT_TYPES = ["int", "int64", "int32", "int16", "int8", "Int64", "Int32", "uint64", "uint32"]


def _suite(
    gx: Any, name: str, table: str, entries: Sequence[tuple[Any, str]], columns: pd.Index
) -> Any:
    suite = gx.ExpectationSuite(name=name)
    for order, (expectation, expected) in enumerate(entries):
        column = getattr(expectation, "column", None)
        if column is not None and column not in columns:
            # The schema expectation reports the missing column once; GX would add one
            # "column does not exist" error per expectation on it.
            continue
        # GX returns results grouped by domain, not in suite order, and an unsaved suite's
        # expectations have no id: the meta is how each result finds its entry again.
        expectation.meta = {"table": table, "expected": expected, "order": order}
        suite.add_expectation(expectation)
    return suite


class _Gx:
    """An ephemeral context with one whole-dataframe batch definition per table."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        # tqdm bars on stderr would flood the Prefect task logs, one per validation.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("llmflow")
        self.batch_definitions: dict[str, BatchDefinition] = {
            table: source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole")
            for table in TABLES
        }


_GX: _Gx | None = None


# One context per process, reused: Prefect may run validations in threads at once, and a
# GX context is not documented to be thread-safe.
_GX_LOCK = threading.Lock()


def _gx() -> _Gx:
    global _GX
    if _GX is None:
        # GX sends usage statistics when allowed; offline, that only slows it down. Only
        # this switch: the other offline defaults are the entry points' to set.
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        _GX = _Gx()
    return _GX


def _run(
    batch_definition: BatchDefinition, table: pd.DataFrame, suite: Any, *, index: list[str]
) -> list[ExpectationOutcome]:
    result_format: dict[str, Any] = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": SAMPLE_SIZE,
        # Name offending rows by example id rather than by row number of a derived table.
        "unexpected_index_column_names": [c for c in index if c in table.columns],
    }
    batch = batch_definition.get_batch(batch_parameters={"dataframe": table})
    results = batch.validate(suite, result_format=result_format).results
    results = sorted(results, key=lambda r: r.expectation_config.meta["order"])
    return [_outcome(r) for r in results]


def _outcome(result: ExpectationValidationResult) -> ExpectationOutcome:
    config = result.expectation_config
    meta = config.meta
    return ExpectationOutcome(
        name=config.type,
        table=meta["table"],
        column=config.kwargs.get("column"),
        success=bool(result.success),
        observed=_observed(result),
        expected=meta["expected"],
    )


def _observed(result: ExpectationValidationResult) -> Any:
    error = _exception_message(result.exception_info)
    if error:
        return {"error": error}
    res = dict(result.result or {})
    missing = (res.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        return _plain({"missing": missing, "columns": res.get("observed_value")})
    if "observed_value" in res:
        return _plain(res["observed_value"])
    if "unexpected_count" in res:
        index_cols = res.get("unexpected_index_column_names") or []
        ids = [
            row.get("id")
            for row in res.get("partial_unexpected_index_list") or []
            if isinstance(row, dict) and "id" in index_cols
        ]
        return _plain(
            {
                "unexpected_count": res["unexpected_count"],
                "element_count": res.get("element_count"),
                "sample": res.get("partial_unexpected_list", [])[:SAMPLE_SIZE],
                "ids": ids[:SAMPLE_SIZE],
            }
        )
    return _plain(res) or None


def _exception_message(info: Any) -> str | None:
    # A single expectation's error is flat {raised_exception, exception_message}; a failed
    # metric is a dict of those keyed by metric id.
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


def _plain(value: Any) -> Any:
    """numpy scalars and NaN to JSON-ready Python, so the report serialises."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _disjoint_outcome(train: pd.DataFrame, eval: pd.DataFrame) -> ExpectationOutcome:
    # A split without an id column has nothing to leak; the schema expectation reports it.
    no_ids = pd.Series([], dtype=object)
    # Through object arrays: pandas 3's arrow-backed str Series.isin builds one pyarrow
    # scalar per value of the set (1 s for 100k train ids), iterating one is as slow.
    train_ids = set(train.get("id", no_ids).dropna().to_numpy(dtype=object))
    eval_ids = eval.get("id", no_ids).dropna().to_numpy(dtype=object)
    leaked = list(dict.fromkeys(i for i in eval_ids if i in train_ids))
    return ExpectationOutcome(
        name=DISJOINT_CHECK,
        table="eval",
        column="id",
        success=not leaked,
        observed={
            "unexpected_count": len(leaked),
            "element_count": len(eval_ids),
            "sample": _plain(leaked[:SAMPLE_SIZE]),
            "ids": _plain(leaked[:SAMPLE_SIZE]),
        },
        expected="no id also in train",
    )
