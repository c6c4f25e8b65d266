"""The bundled synthetic task: deterministic, correct by its rule, and the committed file."""

from __future__ import annotations

import re

from llmflow.bundled import (
    MAX_DIGITS,
    MIN_DIGITS,
    N_ROWS,
    SEED,
    TEMPLATES,
    bundled_path,
    generate_examples,
    read_examples,
    write_examples,
)


def test_generator_is_deterministic():
    assert generate_examples(50, seed=3) == generate_examples(50, seed=3)
    assert generate_examples(50, seed=3) != generate_examples(50, seed=4)
    # A shorter run is a prefix of a longer one: n does not change the stream.
    assert generate_examples(20, seed=3) == generate_examples(50, seed=3)[:20]


def test_rows_are_chat_rows_whose_answer_is_the_reversed_digits():
    prompts = {t.format("") for t in TEMPLATES}
    for row in generate_examples(500, seed=0):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        match = re.fullmatch(r"(.*?)(\d+)", user["content"])
        assert match and match.group(1) in prompts
        digits = match.group(2)
        assert MIN_DIGITS <= len(digits) <= MAX_DIGITS
        assert assistant["content"] == digits[::-1]


def test_every_phrasing_is_used_and_prompts_rarely_repeat():
    rows = generate_examples(N_ROWS, seed=SEED)
    users = [r["messages"][0]["content"] for r in rows]
    assert {re.sub(r"\d+$", "{}", u) for u in users} == set(TEMPLATES)
    # A random eval split can only test generalisation if eval prompts are not in train.
    assert len(set(users)) > 0.98 * len(users)


def test_committed_jsonl_is_the_generator_output(tmp_path):
    path = bundled_path()
    assert path.name == "tiny_task.jsonl" and path.is_file()
    assert read_examples(path) == generate_examples(N_ROWS, seed=SEED)
    # Byte for byte: `python -m llmflow.bundled` must leave a clean checkout clean.
    fresh = tmp_path / "fresh.jsonl"
    write_examples(generate_examples(N_ROWS, seed=SEED), fresh)
    assert fresh.read_bytes() == path.read_bytes()
