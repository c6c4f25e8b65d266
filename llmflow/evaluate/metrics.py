"""Evaluation metrics: per-example text scores, corpus aggregation, teacher-forced loss.

Text metrics are pure functions ``(prediction, reference) -> float`` in [0, 1]. Task-specific
ones, with the same signature, are plug-ins: a package installed on the nodes registers them
as ``llmflow.metrics`` entry points, and ``eval.extra_metrics`` names them. A config (or the
Prefect UI's form) names a registered metric, never a module: whoever can start a run cannot
make the cluster import code of their choosing (examples/metrics-plugin/ is one such package).
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from llmflow.engines.hf import loss_mask  # noqa: F401  (model-side, used here)
from llmflow.engines.losses import example_losses
from llmflow.errors import ConfigError

Metric = Callable[[str, str], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction equals the reference once surrounding whitespace is stripped."""
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    """Exact match after ``normalize_answer`` on both sides."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of the normalised tokens (a bag, counts matter)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _both_empty_or_none(prediction: str, reference: str) -> float | None:
    """1.0 when both are blank, 0.0 when one is: the libraries score two blanks 0."""
    pred, ref = prediction.strip(), reference.strip()
    if pred and ref:
        return None
    return float(pred == ref)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of rouge-score (Google's implementation, as `evaluate` uses it):
    lowercased alphanumeric tokens, Porter stemming."""
    blank = _both_empty_or_none(prediction, reference)
    if blank is not None:
        return blank
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU of sacrebleu (13a tokenisation, exponential smoothing), in [0, 1]."""
    blank = _both_empty_or_none(prediction, reference)
    if blank is not None:
        return blank
    import sacrebleu

    return min(1.0, sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0)


BUILTIN_METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "bleu": bleu,
}


# The direction in which each metric of an EvalReport is better. A plugged-in metric
# (eval.extra_metrics) is a score, higher is better, unless its function says
# `higher_is_better = False`. The gate and the comparison read directions from here only.
HIGHER, LOWER = "higher", "lower"
DIRECTIONS: dict[str, str] = {
    "exact_match": HIGHER,
    "normalized_exact_match": HIGHER,
    "token_f1": HIGHER,
    "rouge_l": HIGHER,
    "bleu": HIGHER,
    # eval.judge (llmflow/evaluate/judge.py): the judge's score, and its unreadable verdicts
    "judge": HIGHER,
    "judge_unparseable": LOWER,
    "eval_loss": LOWER,
    "perplexity": LOWER,
    "truncated_prompts": LOWER,
    "empty_generations": LOWER,
    # throughput figures of the report
    "examples_per_s": HIGHER,
    "tokens_per_s": HIGHER,
    "wall_s": LOWER,
    "latency_p50_s": LOWER,
    "latency_p95_s": LOWER,
}


ENTRY_POINTS = "llmflow.metrics"


def metric_directions(extra: Iterable[str] = (), reports: Iterable[Any] = ()) -> dict[str, str]:
    """Every gateable metric's direction: the built-in ones, the ``extra`` metrics', and those
    the ``reports`` (EvalReports) declare for their own metrics (the benchmarks')."""
    out = dict(DIRECTIONS)
    for name in extra:
        fn = load_metric(name)
        out[name] = HIGHER if getattr(fn, "higher_is_better", True) else LOWER
    for report in reports:
        out.update(report.directions)
    return out


def registered_metrics() -> dict[str, EntryPoint]:
    """The plug-in metrics of the installed packages (``llmflow.metrics`` entry points)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def load_metric(name: str) -> Metric:
    """The plug-in metric registered as ``name``.

    Raises ConfigError (one line naming the metric and the registered ones) for a module path,
    an unknown name, or an entry point that does not load a function.
    """
    registered = registered_metrics()
    known = ", ".join(sorted(registered)) or "none installed"
    if any(c in name for c in ":./"):
        raise ConfigError(
            f"eval.extra_metrics: {name!r} is a module path; name a metric registered as an "
            f"'{ENTRY_POINTS}' entry point (registered: {known})"
        )
    if name not in registered:
        raise ConfigError(
            f"eval.extra_metrics: {name!r} is not a registered metric (registered: {known}; "
            f"a package registers one as an '{ENTRY_POINTS}' entry point)"
        )
    try:
        fn = registered[name].load()
    except Exception as exc:  # a broken plug-in, in one line
        raise ConfigError(
            f"eval.extra_metrics: {name!r}: {registered[name].value} does not load "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not callable(fn):
        raise ConfigError(
            f"eval.extra_metrics: {name!r}: {registered[name].value} is not a function"
        )
    return fn


def load_metrics(extra: Iterable[str] = ()) -> dict[str, Metric]:
    """The built-in metrics plus the registered extra ones, keyed by name (an extra metric's
    column and report key is its registered name)."""
    metrics = dict(BUILTIN_METRICS)
    for name in extra:
        if name in metrics:
            raise ConfigError(
                f"eval.extra_metrics: {name!r}: a built-in metric of that name exists"
            )
        metrics[name] = load_metric(name)
    return metrics


def score_example(
    prediction: str, reference: str, metrics: Mapping[str, Metric]
) -> dict[str, float]:
    """Every metric of one example."""
    return {name: float(fn(prediction, reference)) for name, fn in metrics.items()}


def aggregate(rows: Iterable[Mapping[str, Any]], names: Iterable[str]) -> dict[str, float]:
    """Corpus scores: the mean of each named per-example metric over the rows (0 for none)."""
    names = list(names)
    sums = dict.fromkeys(names, 0.0)
    n = 0
    for row in rows:
        n += 1
        for name in names:
            sums[name] += float(row[name])
    return {name: (s / n if n else 0.0) for name, s in sums.items()}


# -- teacher-forced loss ---------------------------------------------------------------------


def teacher_forced_loss(
    model, tokenizer, chats: Iterable[Sequence[Mapping[str, str]]], batch_size: int = 32
) -> dict[str, float]:
    """Mean loss per reply token over the chats, and its perplexity (no generation).

    Returns:
        ``{"eval_loss": ..., "perplexity": ..., "eval_loss_tokens": ...}``; loss is the
        token-weighted mean, so long answers weigh as many tokens as they have.
    """
    chats = list(chats)
    total, tokens = 0.0, 0
    for start in range(0, len(chats), batch_size):
        for s, n in example_losses(model, tokenizer, chats[start : start + batch_size]):
            total += s
            tokens += n
    return loss_summary(total, tokens)


def loss_summary(total: float, tokens: int) -> dict[str, float]:
    """eval_loss, perplexity and the token count from a summed loss."""
    loss = total / tokens if tokens else float("nan")
    ppl = math.exp(min(loss, 700.0)) if tokens else float("nan")
    return {"eval_loss": loss, "perplexity": ppl, "eval_loss_tokens": float(tokens)}
