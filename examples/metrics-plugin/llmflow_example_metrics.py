"""Example llmflow metrics, registered as `llmflow.metrics` entry points (pyproject.toml).

A metric takes one generation and its reference and returns a float; the report holds its
mean over the eval split. It is a score (higher is better) unless the function says
``higher_is_better = False``, which the gate reads for its direction.
"""

from __future__ import annotations


def shouting_match(prediction: str, reference: str) -> float:
    """Exact match, blind to case."""
    return float(prediction.upper() == reference.upper())


def edit_distance(prediction: str, reference: str) -> float:
    """Characters that differ position by position, plus the difference in length."""
    return float(
        sum(a != b for a, b in zip(prediction, reference, strict=False))
        + abs(len(prediction) - len(reference))
    )


edit_distance.higher_is_better = False
