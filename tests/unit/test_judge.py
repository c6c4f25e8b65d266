"""The LLM judge's mechanics without a model: its prompts (both orders), the verdicts it can
read, the per-row scores (position bias cancelled), and the config's refusals. Through Ray
Data with an endpoint and with vLLM: tests/integration/test_judge.py and test_vllm.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmflow.config_eval import JudgeConfig
from llmflow.evaluate.judge import (
    CANDIDATE_FIRST,
    CHAMPION_FIRST,
    judge_requests,
    parse_verdict,
    row_scores,
)


def rows(answers: dict[str, str]) -> list[dict]:
    return [
        {"id": i, "question": f"reverse {i}", "reference": f"ref {i}", "generation": a}
        for i, a in answers.items()
    ]


def test_pairwise_asks_each_pair_twice_with_the_answers_swapped():
    cand, champ = rows({"a": "cand a", "b": "cand b"}), rows({"b": "champ b", "a": "champ a"})
    reqs = judge_requests(cand, champ, JudgeConfig(model="tiny"))
    assert [(r["id"], r["order"]) for r in reqs] == [
        ("a", CANDIDATE_FIRST),
        ("a", CHAMPION_FIRST),
        ("b", CANDIDATE_FIRST),
        ("b", CHAMPION_FIRST),
    ]
    first, swapped = reqs[0]["prompt"], reqs[1]["prompt"]
    assert "Question:\nreverse a" in first and "Reference answer:\nref a" in first
    assert "Answer A:\ncand a\n\nAnswer B:\nchamp a" in first
    assert "Answer A:\nchamp a\n\nAnswer B:\ncand a" in swapped
    # A user's template, pointwise, and at most one row.
    cfg = JudgeConfig(model="m", mode="pointwise", template="{answer}|{reference}", max_examples=1)
    assert [(r["order"], r["prompt"]) for r in judge_requests(cand, champ, cfg)] == [
        ("candidate", "cand a|ref a"),
        ("champion", "champ a|ref a"),
    ]


@pytest.mark.parametrize(
    ("text", "mode", "verdict"),
    [
        ("A", "pairwise", 1.0),
        (" b.", "pairwise", 0.0),
        ("**A**", "pairwise", 1.0),
        ("Answer B", "pairwise", 0.0),
        ("Answer: A is better", "pairwise", 1.0),
        ("Both are fine", "pairwise", None),
        ("AB", "pairwise", None),
        ("", "pairwise", None),
        ("7", "pointwise", 6 / 9),
        ("10/10", "pointwise", 1.0),
        ("1", "pointwise", 0.0),
        ("0", "pointwise", None),
        ("11", "pointwise", None),
        ("seven", "pointwise", None),
    ],
)
def test_parse_verdict(text, mode, verdict):
    assert parse_verdict(text, mode) == verdict


def test_row_scores_cancel_the_position_and_skip_what_did_not_parse():
    def v(i, order, verdict):
        return {"id": i, "order": order, "verdict": verdict}

    verdicts = [
        v("won", CANDIDATE_FIRST, 1.0),  # A: the candidate
        v("won", CHAMPION_FIRST, 0.0),  # B: the candidate again
        v("biased", CANDIDATE_FIRST, 1.0),  # A both times: the position won, not a model
        v("biased", CHAMPION_FIRST, 1.0),
        v("lost", CANDIDATE_FIRST, 0.0),
        v("lost", CHAMPION_FIRST, 1.0),
        v("half", CANDIDATE_FIRST, None),  # one order unreadable: the other decides
        v("half", CHAMPION_FIRST, 0.0),
        v("none", CANDIDATE_FIRST, None),
        v("none", CHAMPION_FIRST, None),
    ]
    assert row_scores(verdicts, "pairwise") == {
        "won": (1.0, 0.0),
        "biased": (0.5, 0.5),
        "lost": (0.0, 1.0),
        "half": (1.0, 0.0),
    }
    point = [v("x", "candidate", 0.8), v("x", "champion", 0.2), v("y", "candidate", None)]
    point.append(v("y", "champion", 0.5))
    assert row_scores(point, "pointwise") == {"x": (0.8, 0.2)}


def test_the_config_refuses_what_cannot_run_or_would_leak_a_secret():
    with pytest.raises(ValidationError, match="engine http needs url"):
        JudgeConfig(model="gpt", engine="http")
    with pytest.raises(ValidationError, match="url and api_key_env are for engine http"):
        JudgeConfig(model="tiny", url="http://x/v1")
    # The URL comes from the run's form: the key may only come from a variable kept for it.
    with pytest.raises(ValidationError, match=r"api_key_env: 'PREFECT_API_KEY' is not named"):
        JudgeConfig(model="gpt", engine="http", url="http://x/v1", api_key_env="PREFECT_API_KEY")
    JudgeConfig(model="gpt", engine="http", url="http://x/v1", api_key_env="LLMFLOW_JUDGE_KEY")
    with pytest.raises(ValidationError, match=r"template: a pairwise prompt uses \{answer_a\}"):
        JudgeConfig(model="tiny", template="Is {answer} right?")


def test_the_preflight_names_a_missing_key_variable(monkeypatch):
    from llmflow.configfile import load_config
    from llmflow.errors import ConfigError
    from llmflow.preflight import check_judge

    monkeypatch.delenv("LLMFLOW_JUDGE_KEY", raising=False)
    judge = (
        "{model: gpt, engine: http, url: 'http://127.0.0.1:9/v1', api_key_env: LLMFLOW_JUDGE_KEY}"
    )
    config = load_config("configs/tiny.yaml", [f"eval.judge={judge}"])
    with pytest.raises(ConfigError, match=r"^eval.judge.api_key_env: LLMFLOW_JUDGE_KEY is not set"):
        check_judge(config)
    monkeypatch.setenv("LLMFLOW_JUDGE_KEY", "k")
    check_judge(config)
