"""The bundled synthetic instruction task: reverse a string of digits, asked in varied words.

A user asks, in one of several phrasings, for a string of 3 to 8 digits backwards; the
assistant answers with the reversed digits and nothing else. The rule is short and exact,
so exact match is a fair metric; the digit strings are random, so an eval split drawn at
random from the rows measures generalisation, not memory (4000 rows of up to 8 digits
almost never repeat). The tiny model of configs/tiny.yaml scores ~0 before fine-tuning and
well above half after a couple hundred steps (bench/tiny_task.py).

Regenerate the committed file (deterministic, seed 0) with:
    python -m llmflow.bundled
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

N_ROWS = 4000
SEED = 0
MIN_DIGITS, MAX_DIGITS = 3, 8

# Several phrasings of one rule: the model has to find the digits wherever the prompt puts
# them, and a fixed template would not look like instruction data to the validation suite.
TEMPLATES = (
    "Reverse the digits: {}",
    "Write backwards: {}",
    "Reverse this number: {}",
    "Read from right to left: {}",
    "Spell in reverse order: {}",
    "What is this reversed? {}",
)


def answer(digits: str) -> str:
    """The task's rule: the digits in reverse order."""
    return digits[::-1]


def generate_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows of the task, the same for the same ``seed``.

    Returns:
        Rows ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(MIN_DIGITS, MAX_DIGITS)
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        prompt = rng.choice(TEMPLATES).format(digits)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer(digits)},
                ]
            }
        )
    return rows


def bundled_path() -> Path:
    """The committed JSONL: ``generate_examples(N_ROWS, SEED)``, one row per line."""
    return Path(__file__).with_name("tiny_task.jsonl")


def read_examples(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_examples(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL, one compact line each, so the file is byte-for-byte reproducible."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
