"""The validation report: each expectation's outcome, and the report as a table and as
markdown for the Prefect artifact.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

QUARANTINE_CHECK = "expect_quarantine_fraction_to_be_at_most"


DISJOINT_CHECK = "expect_eval_ids_to_be_disjoint_from_train"


class ExpectationOutcome(BaseModel):
    """One expectation's verdict on one table."""

    name: str = Field(description="Expectation type, e.g. expect_table_row_count_to_be_between.")
    table: str = Field(description="train, eval, messages, or input (the loader's counts).")
    column: str | None = None
    success: bool
    observed: Any = Field(
        None,
        description="The observed value (aggregate expectations), or for column-map ones "
        "{unexpected_count, element_count, sample, ids}; {error} when GX raised.",
    )
    expected: str = Field(description="The bound, in words: '>= 10', 'in {system, user}'.")

    def describe(self) -> str:
        """One clause for failure_message()."""
        if self.name == QUARANTINE_CHECK:
            bound = self.expected.removeprefix("<= ")
            return f"quarantined share {_fmt(self.observed)} > {bound}"
        where = f"{self.table}.{self.column}" if self.column else self.table
        observed = _fmt_observed(self.observed)
        return f"{self.name} on {where}: observed {observed} (expected {self.expected})"


class ValidationReport(BaseModel):
    """Every outcome of the suite plus the row counts it ran on."""

    success: bool
    outcomes: list[ExpectationOutcome]
    num_input: int = Field(ge=0, description="Rows the loader read.")
    num_train: int = Field(ge=0)
    num_eval: int = Field(ge=0)
    num_quarantined: int = Field(ge=0, description="Rows the loader or cleaner rejected.")
    num_duplicates: int = Field(0, ge=0, description="Rows dropped as repeats of a kept row.")
    num_truncated: int = Field(0, ge=0, description="Rows cut to data.max_tokens (truncate).")
    quarantine_fraction: float = Field(ge=0)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def failure_message(self) -> str:
        """One line naming each failed expectation with its observed value."""
        if self.success:
            return f"validation passed: {len(self.outcomes)} checks"
        return "validation failed: " + "; ".join(o.describe() for o in self.failures)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_observed(observed: Any) -> str:
    if isinstance(observed, dict) and "error" in observed:
        return f"error: {observed['error']}"
    if isinstance(observed, dict) and "missing" in observed:
        return f"missing {observed['missing']} in {observed['columns']}"
    if isinstance(observed, dict) and "unexpected_count" in observed:
        text = f"{observed['unexpected_count']} of {observed['element_count']} unexpected"
        if observed.get("sample"):
            text += f", e.g. {observed['sample']}"
        if observed.get("ids") and observed["ids"] != observed.get("sample"):
            text += f" (ids {observed['ids']})"
        return text
    return _fmt(observed)


def report_table(report: ValidationReport) -> list[dict]:
    """Rows for a Prefect table artifact: one per outcome, failures first."""
    ordered = sorted(report.outcomes, key=lambda o: o.success)
    return [
        {
            "status": "pass" if o.success else "FAIL",
            "expectation": o.name,
            "table": o.table,
            "column": o.column or "",
            "observed": _fmt_observed(o.observed),
            "expected": o.expected,
        }
        for o in ordered
    ]


def report_markdown(report: ValidationReport) -> str:
    """A Markdown summary for a Prefect markdown artifact."""
    verdict = "passed" if report.success else f"FAILED ({len(report.failures)} checks)"
    lines = [
        f"# Data validation {verdict}",
        "",
        f"- rows read: {report.num_input}",
        f"- train: {report.num_train}, eval: {report.num_eval}",
        f"- quarantined: {report.num_quarantined} ({report.quarantine_fraction:.2%})",
        f"- duplicates dropped: {report.num_duplicates}",
        f"- truncated to data.max_tokens: {report.num_truncated}",
        "",
    ]
    if not report.success:
        lines += [report.failure_message(), ""]
    lines += [
        "| status | expectation | table | column | observed | expected |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report_table(report):
        cells = [
            str(row[k]).replace("|", "\\|")
            for k in ("status", "expectation", "table", "column", "observed", "expected")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
