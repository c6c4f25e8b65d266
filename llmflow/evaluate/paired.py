"""Candidate against champion on the same eval rows: wins, losses, ties and a confidence
interval for the difference of each metric.

Both models are scored on the same split, so each row is a pair: the interval comes from a
paired bootstrap over the rows (scipy.stats.bootstrap, BCa, a fixed seed so the same reports
always give the same decision), and for a 0/1 metric McNemar's exact test (a binomial test on
the rows where exactly one model is right) adds its p-value. The difference is the
*improvement*: positive when the candidate is better in the metric's declared direction.
eval_loss is the token-weighted mean the report holds, resampled by row.

Pure functions over rows (the stored predictions.parquet); the gate (llmflow/promote/gate.py)
reads the intervals, the evaluate stage's artifact and `llmflow models diff` show them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmflow.evaluate.metrics import LOWER
from llmflow.refs import Comparison, EvalReport, MetricComparison

# Resamples of the bootstrap; `batch` keeps one resampled block under ~4 M values, so an eval
# split of 100k rows needs ~32 MB at a time, not 8 GB.
N_RESAMPLES = 9999
_BLOCK_VALUES = 4_000_000
# Per-row columns that are not metrics of the report (counts, latencies, flags).
_NOT_METRICS = {"num_prompt_tokens", "num_generated_tokens", "latency_s", "eval_loss_tokens"}
LOSS, LOSS_TOKENS = "eval_loss", "eval_loss_tokens"


def as_rows(predictions: Any) -> list[dict[str, Any]]:
    """Rows (dicts) of an Arrow table, a pandas DataFrame or an iterable of mappings."""
    if hasattr(predictions, "to_pylist"):
        return predictions.to_pylist()
    if hasattr(predictions, "to_dict"):
        return predictions.to_dict("records")
    return [dict(r) for r in predictions]


def read_predictions(uri: str) -> list[dict[str, Any]]:
    """The rows of a stored predictions.parquet (a local path or any store URI, via fsspec)."""
    from llmflow.store import read_parquet

    return read_parquet(uri).to_pylist()


def benchmark_rows(report: EvalReport) -> list[dict[str, Any]]:
    """A report's benchmark documents (eval.benchmarks), one row each; none without."""
    return read_predictions(report.benchmarks_uri) if report.benchmarks_uri else []


def report_rows(report: EvalReport) -> list[dict[str, Any]]:
    """A report's per-row scores: its predictions, and its benchmark documents if any."""
    rows = read_predictions(report.predictions_uri) if report.predictions_uri else []
    return rows + benchmark_rows(report)


def compare_reports(
    candidate: EvalReport,
    champion: EvalReport,
    directions: Mapping[str, str],
    confidence: float = 0.95,
) -> Comparison | None:
    """``compare`` on the two reports' stored predictions; None when one has none."""
    if not (candidate.predictions_uri and champion.predictions_uri):
        return None
    return compare(
        report_rows(candidate),
        report_rows(champion),
        directions,
        confidence,
        candidate_version=candidate.model_version,
        champion_version=champion.model_version,
    )


def paired_rows(
    candidate: Iterable[Mapping[str, Any]], champion: Iterable[Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(candidate row, champion row) for every id both hold, in id order."""
    champ = {str(r["id"]): r for r in champion}
    pairs = [(r, champ[str(r["id"])]) for r in candidate if str(r["id"]) in champ]
    return sorted(pairs, key=lambda p: str(p[0]["id"]))


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and not math.isnan(float(v)):
        return float(v)
    return None


def comparable_metrics(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], directions: Mapping[str, str]
) -> list[str]:
    """The metrics with a direction that both sides score per row."""
    if not pairs:
        return []
    cand, champ = pairs[0]
    return sorted(
        name for name in directions if name in cand and name in champ and name not in _NOT_METRICS
    )


def compare(
    candidate: Any,
    champion: Any,
    directions: Mapping[str, str],
    confidence: float = 0.95,
    *,
    candidate_version: str = "",
    champion_version: str = "",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Compare two models' per-row scores on the rows (ids) both were scored on.

    Args:
        candidate, champion: predictions (rows, an Arrow table or a DataFrame) with an ``id``
            and one column per metric.
        directions: metric -> "higher" or "lower" (which way is better).
        confidence: the interval's confidence level (two-sided).

    Returns:
        A Comparison with one MetricComparison per metric both sides score per row.
    """
    pairs = paired_rows(as_rows(candidate), as_rows(champion))
    out = {}
    for name in comparable_metrics(pairs, directions):
        lower = directions[name] == LOWER
        out[name] = _compare_metric(pairs, name, lower, confidence, n_resamples, seed)
    return Comparison(
        candidate_version=candidate_version,
        champion_version=champion_version,
        confidence=confidence,
        num_pairs=len(pairs),
        metrics=out,
    )


def _compare_metric(
    pairs, name: str, lower: bool, confidence: float, n_resamples: int, seed: int
) -> MetricComparison:
    import numpy as np

    sign = -1.0 if lower else 1.0
    weighted = name == LOSS and all(LOSS_TOKENS in c and LOSS_TOKENS in p for c, p in pairs)
    kept = [
        (c, p)
        for c, p in pairs
        if _number(c.get(name)) is not None and _number(p.get(name)) is not None
    ]
    cand = np.array([_number(c[name]) for c, _ in kept], dtype=float)
    champ = np.array([_number(p[name]) for _, p in kept], dtype=float)
    per_row = sign * (cand - champ)
    wins, losses = int((per_row > 0).sum()), int((per_row < 0).sum())
    n = len(kept)
    if weighted:
        tc = np.array([float(c[LOSS_TOKENS]) for c, _ in kept])
        tp = np.array([float(p[LOSS_TOKENS]) for _, p in kept])
        data = (cand, champ, tc, tp)

        def statistic(c, p, wc, wp, axis=-1):
            mean_c = (c * wc).sum(axis=axis) / wc.sum(axis=axis)
            mean_p = (p * wp).sum(axis=axis) / wp.sum(axis=axis)
            return sign * (mean_c - mean_p)

        cand_mean = float((cand * tc).sum() / tc.sum()) if n else math.nan
        champ_mean = float((champ * tp).sum() / tp.sum()) if n else math.nan
    else:
        data = (per_row,)

        def statistic(d, axis=-1):
            return d.mean(axis=axis)

        cand_mean = float(cand.mean()) if n else math.nan
        champ_mean = float(champ.mean()) if n else math.nan
    improvement = sign * (cand_mean - champ_mean) + 0.0  # + 0.0: never "-0"
    low, high = _interval(data, statistic, n, confidence, n_resamples, seed, per_row)
    low, high = (None, None) if low is None else (low + 0.0, high + 0.0)
    binary = n > 0 and bool(np.isin(cand, (0.0, 1.0)).all() and np.isin(champ, (0.0, 1.0)).all())
    p_value = None
    if binary:
        from scipy.stats import binomtest

        p_value = float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    return MetricComparison(
        metric=name,
        lower_is_better=lower,
        num_pairs=n,
        candidate=cand_mean,
        champion=champ_mean,
        improvement=improvement,
        low=low,
        high=high,
        wins=wins,
        losses=losses,
        ties=n - wins - losses,
        mcnemar_p=p_value,
    )


def _interval(data, statistic, n, confidence, n_resamples, seed, per_row):
    """The bootstrap interval of the statistic; a point when every pair differs alike (a
    resample cannot vary), None for fewer than two pairs."""
    import numpy as np
    from scipy.stats import bootstrap

    if n < 2:
        return None, None
    if len(data) == 1 and np.all(per_row == per_row[0]):
        return float(per_row[0]), float(per_row[0])
    batch = max(1, _BLOCK_VALUES // max(n, 1))
    for method in ("BCa", "percentile"):  # BCa is undefined on some degenerate samples
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: handled below
            res = bootstrap(
                data,
                statistic,
                n_resamples=n_resamples,
                batch=batch,
                vectorized=True,
                paired=len(data) > 1,
                confidence_level=confidence,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high
    point = float(statistic(*data))
    return point, point


def changed_examples(
    candidate: Any, champion: Any, metric: str, lower_is_better: bool = False, k: int = 5
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``k`` rows the candidate won by most and the ``k`` it lost by most on ``metric``:
    each with the question, the reference, both generations and both scores."""
    sign = -1.0 if lower_is_better else 1.0
    rows = []
    for c, p in paired_rows(as_rows(candidate), as_rows(champion)):
        a, b = _number(c.get(metric)), _number(p.get(metric))
        if a is None or b is None or a == b:
            continue
        rows.append(
            {
                "id": str(c["id"]),
                "question": c.get("question", ""),
                "reference": c.get("reference", ""),
                "candidate": c.get("generation", ""),
                "champion": p.get("generation", ""),
                "candidate_score": a,
                "champion_score": b,
                "improvement": sign * (a - b),
            }
        )
    wins = sorted((r for r in rows if r["improvement"] > 0), key=lambda r: -r["improvement"])
    losses = sorted((r for r in rows if r["improvement"] < 0), key=lambda r: r["improvement"])
    return wins[:k], losses[:k]
