"""The data-quality suite on hand-built splits: a clean dataset passes, each rule fails alone."""

from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pytest

from llmflow.config import DataConfig
from llmflow.prepare.validation import example_table, message_table, validate_dataset
from llmflow.prepare.validation_report import (
    DISJOINT_CHECK,
    QUARANTINE_CHECK,
    ExpectationOutcome,
    ValidationReport,
    report_markdown,
    report_table,
)

CFG = DataConfig(min_rows=10, max_chars=200, max_tokens=64, max_quarantine_fraction=0.05)


def example(i: int, *, last_role: str = "assistant", n_tokens: int = 12) -> dict:
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": f"What is {i} plus zero?"},
        {"role": last_role, "content": str(i)},
    ]
    return {
        "id": hashlib.sha256(f"ex{i}".encode()).hexdigest()[:16],
        "messages": messages,
        "n_chars": sum(len(m["content"]) for m in messages),
        "n_tokens": n_tokens,
    }


def splits(num_train: int = 20, num_eval: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = pd.DataFrame([example(i) for i in range(num_train)])
    eval_ = pd.DataFrame([example(i) for i in range(1000, 1000 + num_eval)])
    return train, eval_


def validate(train, eval_, cfg=CFG, num_input=None, num_quarantined=0) -> ValidationReport:
    if num_input is None:
        num_input = len(train) + len(eval_) + num_quarantined
    return validate_dataset(
        train, eval_, cfg=cfg, num_input=num_input, num_quarantined=num_quarantined
    )


def only_failure(report: ValidationReport, name: str, table: str, column: str | None):
    """The single failed outcome, after checking that no other rule fired."""
    failed = [(o.name, o.table, o.column) for o in report.failures]
    assert failed == [(name, table, column)], report.failure_message()
    assert not report.success
    return report.failures[0]


def test_clean_dataset_passes():
    train, eval_ = splits()
    report = validate(train, eval_, num_input=26, num_quarantined=1)

    assert report.success, report.failure_message()
    assert (report.num_input, report.num_train, report.num_eval) == (26, 20, 5)
    assert report.quarantine_fraction == pytest.approx(1 / 26)
    names = {o.name for o in report.outcomes}
    assert {
        "expect_table_columns_to_match_set",
        "expect_column_values_to_be_in_set",
        "expect_column_proportion_of_unique_values_to_be_between",
        DISJOINT_CHECK,
        QUARANTINE_CHECK,
    } <= names
    assert {o.table for o in report.outcomes} == {"train", "eval", "messages", "input"}
    assert report.failure_message().startswith("validation passed")

    rows = report_table(report)
    assert len(rows) == len(report.outcomes)
    assert {r["status"] for r in rows} == {"pass"}
    assert set(rows[0]) == {"status", "expectation", "table", "column", "observed", "expected"}
    assert "# Data validation passed" in report_markdown(report)
    # The report is stored as validation.json: it must serialise without numpy leftovers.
    json.loads(report.model_dump_json())


def test_too_few_rows():
    train, eval_ = splits(num_train=3)
    report = validate(train, eval_)
    out = only_failure(report, "expect_table_row_count_to_be_between", "train", None)
    assert out.observed == 3
    assert (
        "expect_table_row_count_to_be_between on train: observed 3 (expected >= 10)"
        in report.failure_message()
    )


def test_empty_eval_split():
    train, eval_ = splits()
    report = validate(train, eval_.iloc[:0])
    out = only_failure(report, "expect_table_row_count_to_be_between", "eval", None)
    assert out.observed == 0
    assert "on eval: observed 0 (expected >= 1)" in report.failure_message()


def test_eval_id_also_in_train():
    train, eval_ = splits()
    eval_.iloc[0] = train.iloc[4]
    leaked = train.loc[4, "id"]
    report = validate(train, eval_)
    out = only_failure(report, DISJOINT_CHECK, "eval", "id")
    assert out.observed["unexpected_count"] == 1
    assert out.observed["ids"] == [leaked]
    assert f"{DISJOINT_CHECK} on eval.id: observed 1 of 5 unexpected, e.g. ['{leaked}']" in (
        report.failure_message()
    )


def test_invalid_role():
    train, eval_ = splits()
    train.at[7, "messages"] = [{"role": "tool", "content": "x"}] + train.at[7, "messages"]
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_be_in_set", "messages", "role")
    assert out.observed["unexpected_count"] == 1
    assert out.observed["sample"] == ["tool"]
    assert out.observed["ids"] == [train.loc[7, "id"]]
    assert "on messages.role: observed 1 of " in report.failure_message()
    assert "e.g. ['tool']" in report.failure_message()


def test_last_role_not_assistant():
    train, eval_ = splits()
    train.iloc[2] = pd.Series(example(2, last_role="user"))
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_be_in_set", "train", "last_role")
    assert out.observed["sample"] == ["user"]
    assert "on train.last_role: observed 1 of 20 unexpected, e.g. ['user']" in (
        report.failure_message()
    )


def test_n_tokens_above_bound():
    train, eval_ = splits()
    train.loc[5, "n_tokens"] = 65
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_be_between", "train", "n_tokens")
    assert out.observed["sample"] == [65]
    assert out.expected == "1..64"
    assert "on train.n_tokens: observed 1 of 20 unexpected, e.g. [65]" in report.failure_message()


def test_n_chars_above_bound():
    train, eval_ = splits()
    eval_.loc[1, "n_chars"] = 201
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_be_between", "eval", "n_chars")
    assert out.observed["sample"] == [201]
    assert out.observed["ids"] == [eval_.loc[1, "id"]]
    assert "(expected 1..200)" in report.failure_message()


def test_null_id():
    train, eval_ = splits()
    train.loc[0, "id"] = None
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_not_be_null", "train", "id")
    assert out.observed["unexpected_count"] == 1
    assert "expect_column_values_to_not_be_null on train.id: observed 1 of 20 unexpected" in (
        report.failure_message()
    )


def test_duplicate_ids_above_bound():
    train, eval_ = splits()
    cfg = CFG.model_copy(update={"max_duplicate_fraction": 0.1})
    one_dup = train.copy()
    one_dup.iloc[1] = one_dup.iloc[0]
    assert validate(one_dup, eval_, cfg=cfg).success  # 1 in 20 is within 0.1

    train.iloc[1:4] = train.iloc[[0, 0, 0]].to_numpy()
    report = validate(train, eval_, cfg=cfg)
    out = only_failure(
        report, "expect_column_proportion_of_unique_values_to_be_between", "train", "id"
    )
    assert out.observed == pytest.approx(17 / 20)
    assert "on train.id: observed 0.85 (expected unique share >= 0.9)" in report.failure_message()


def test_quarantine_share_above_bound():
    train, eval_ = splits()
    report = validate(train, eval_, num_input=100, num_quarantined=31)
    out = only_failure(report, QUARANTINE_CHECK, "input", None)
    assert out.observed == pytest.approx(0.31)
    assert report.failure_message() == "validation failed: quarantined share 0.31 > 0.05"
    assert report_table(report)[0]["status"] == "FAIL"
    assert "FAILED (1 checks)" in report_markdown(report)


def test_empty_content():
    train, eval_ = splits()
    train.at[3, "messages"] = [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "3"},
    ]
    report = validate(train, eval_)
    out = only_failure(report, "expect_column_values_to_be_between", "messages", "content_chars")
    assert out.observed["sample"] == [0]


def test_failure_message_joins_every_failure():
    outcomes = [
        ExpectationOutcome(
            name="expect_table_row_count_to_be_between",
            table="train",
            column=None,
            success=False,
            observed=3,
            expected=">= 100",
        ),
        ExpectationOutcome(
            name="expect_column_values_to_not_be_null",
            table="train",
            column="id",
            success=True,
            observed=None,
            expected="not null",
        ),
        ExpectationOutcome(
            name=QUARANTINE_CHECK,
            table="input",
            column=None,
            success=False,
            observed=0.31,
            expected="<= 0.05",
        ),
    ]
    report = ValidationReport(
        success=False,
        outcomes=outcomes,
        num_input=10,
        num_train=3,
        num_eval=1,
        num_quarantined=3,
        quarantine_fraction=0.31,
    )
    assert report.failure_message() == (
        "validation failed: expect_table_row_count_to_be_between on train: observed 3 "
        "(expected >= 100); quarantined share 0.31 > 0.05"
    )


def test_flat_tables_accept_parquet_round_trip():
    # Read back from parquet, messages are numpy arrays of dicts, not lists.
    train, eval_ = splits(num_train=2, num_eval=1)
    buf = io.BytesIO()
    train.to_parquet(buf)
    back = pd.read_parquet(io.BytesIO(buf.getvalue()))
    assert not isinstance(back.loc[0, "messages"], list)

    examples = example_table(back)
    assert examples["n_messages"].tolist() == [3, 3]
    assert examples["last_role"].tolist() == ["assistant", "assistant"]
    messages = message_table({"train": back, "eval": eval_})
    assert len(messages) == 9
    assert messages["role"].tolist()[:3] == ["system", "user", "assistant"]
    assert messages.loc[messages["split"] == "eval", "id"].tolist() == [eval_.loc[0, "id"]] * 3


def test_malformed_messages_fail_not_null():
    train, eval_ = splits()
    train.at[6, "messages"] = None
    report = validate(train, eval_)
    failed = {(o.name, o.column) for o in report.failures}
    assert failed == {
        ("expect_column_values_to_not_be_null", "n_messages"),
        ("expect_column_values_to_not_be_null", "last_role"),
    }


def test_missing_column_fails_schema_once():
    train, eval_ = splits()
    report = validate(train.drop(columns=["n_tokens"]), eval_)
    out = only_failure(report, "expect_table_columns_to_match_set", "train", None)
    assert out.observed["missing"] == ["n_tokens"]
    assert "on train: observed missing ['n_tokens'] in " in report.failure_message()
