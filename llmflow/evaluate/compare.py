"""Reading two eval reports side by side: the comparison table (with the paired intervals),
the examples that changed between them, and the worst examples."""

from __future__ import annotations

import math
from typing import Any

from llmflow.evaluate.paired import as_rows, changed_examples
from llmflow.refs import Comparison, EvalReport


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _cell(text: Any, width: int = 80) -> str:
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= width else s[: width - 1] + "…"


def worst_examples(predictions, k: int = 10, metric: str = "token_f1") -> str:
    """Markdown table of the ``k`` lowest-scoring predictions (ties: longest loss first).

    Args:
        predictions: rows (dicts), a pandas DataFrame or an Arrow table of predictions.
        metric: the per-row score to rank by (falls back to exact_match when absent).
    """
    rows = as_rows(predictions)
    if not rows:
        return "_No predictions._"
    if metric not in rows[0]:
        metric = "exact_match"

    def key(r):
        loss = r.get("eval_loss")
        return (
            float(r[metric]),
            -(loss if isinstance(loss, float) and not math.isnan(loss) else 0.0),
        )

    worst = sorted(rows, key=key)[:k]
    lines = [
        f"### {len(worst)} worst of {len(rows)} examples by {metric}",
        "",
        f"| id | question | reference | generation | {metric} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in worst:
        gen = r["generation"] if str(r["generation"]).strip() else "_(empty)_"
        lines.append(
            f"| {_cell(r['id'], 12)} | {_cell(r.get('question', ''))} | {_cell(r['reference'])} "
            f"| {_cell(gen)} | {float(r[metric]):.3f} |"
        )
    return "\n".join(lines)


def comparison_rows(
    candidate: EvalReport, champion: EvalReport | None, comparison: Comparison | None = None
) -> list[dict[str, Any]]:
    """Side-by-side metrics of a candidate and the champion: rows for a Prefect table artifact.

    One row per metric (and throughput figure) in either report, with the difference and
    whether it is better for the candidate, in the direction the metric declares
    (metrics.DIRECTIONS; blank for a figure without one), and for a metric scored per row the
    paired interval of the improvement with the rows won, lost and tied (``comparison``).
    """
    from llmflow.evaluate.metrics import DIRECTIONS, LOWER

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.4g}"

    rows = []
    sections = (("metric", "metrics"), ("throughput", "throughput"))
    for kind, attr in sections:
        cand = getattr(candidate, attr)
        champ = getattr(champion, attr) if champion else {}
        for name in sorted(set(cand) | set(champ)):
            c, p = cand.get(name), champ.get(name)
            delta = c - p if c is not None and p is not None else None
            lower = DIRECTIONS.get(name) == LOWER
            known = name in DIRECTIONS
            better = None if delta is None or delta == 0 or not known else (delta < 0) == lower
            paired = comparison.metrics.get(name) if comparison and kind == "metric" else None
            rows.append(
                {
                    "kind": kind,
                    "name": name,
                    "candidate": fmt(c),
                    "champion": fmt(p),
                    "delta": "" if delta is None else f"{delta:+.4g}",
                    "better": "" if better is None else ("yes" if better else "no"),
                    "improvement, interval": paired.interval(comparison.confidence)
                    if paired
                    else "",
                    "p (McNemar)": f"{paired.mcnemar_p:.3g}"
                    if paired and paired.mcnemar_p is not None
                    else "",
                }
            )
    return rows


def changes_markdown(
    candidate: Any, champion: Any, metric: str, lower_is_better: bool = False, k: int = 5
) -> str:
    """Markdown of the ``k`` examples the candidate won by most and the ``k`` it lost by most
    on ``metric`` against the champion: what a reviewer reads before approving."""
    wins, losses = changed_examples(candidate, champion, metric, lower_is_better, k)
    out = []
    for title, rows in (("won", wins), ("lost", losses)):
        out += [f"### {len(rows)} examples the candidate {title} on {metric}", ""]
        if not rows:
            out += ["_None._", ""]
            continue
        out += [
            f"| id | question | reference | candidate | champion | {metric} |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            out.append(
                f"| {_cell(r['id'], 12)} | {_cell(r['question'])} | {_cell(r['reference'])} "
                f"| {_cell(r['candidate'] or '(empty)')} | {_cell(r['champion'] or '(empty)')} "
                f"| {r['candidate_score']:.3g} vs {r['champion_score']:.3g} |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def diff_markdown(
    comparison: Comparison, candidate: Any, champion: Any, metric: str, lower: bool, k: int = 5
) -> str:
    """`llmflow models diff`: every per-row metric of two versions on the same rows with its
    interval, then the examples the first won and lost against the second on ``metric``."""
    a, b = comparison.candidate_version, comparison.champion_version
    title = (
        f"## {a} vs {b} on {comparison.num_pairs} paired rows "
        f"({comparison.confidence:.0%} intervals of the improvement of {a})"
    )
    lines = [
        title,
        "",
        f"| metric | {a} | {b} | improvement (interval; rows won, lost, tied) | p (McNemar) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in sorted(comparison.metrics.items()):
        p = "" if m.mcnemar_p is None else f"{m.mcnemar_p:.3g}"
        lines.append(
            f"| {name} | {m.candidate:.4g} | {m.champion:.4g} | "
            f"{m.interval(comparison.confidence)} | {p} |"
        )
    changes = changes_markdown(candidate, champion, metric, lower, k)
    return "\n".join([*lines, "", changes.replace("the candidate", a)])
