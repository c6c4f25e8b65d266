"""Candidate against champion row by row (llmflow/evaluate/paired.py) and the gate that reads
its intervals: a tie or a gain within noise is refused, a clear gain passes."""

from __future__ import annotations

import math
import random

import pytest

from llmflow.config import GateConfig
from llmflow.evaluate.compare import changes_markdown, comparison_rows
from llmflow.evaluate.metrics import DIRECTIONS
from llmflow.evaluate.paired import changed_examples, compare
from llmflow.promote.gate import decide
from llmflow.refs import EvalReport

N = 391  # the tiny config's eval split


def champion_rows(seed: int = 0, n: int = N) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"e{i:04d}",
            "question": f"q{i}",
            "reference": f"r{i}",
            "generation": f"r{i}" if i % 10 else "wrong",
            "exact_match": 0.0 if i % 10 == 0 else 1.0,  # 0.898 right
            "token_f1": rng.random(),
            "eval_loss": 1.0 + rng.random(),
            "eval_loss_tokens": rng.randint(3, 12),
        }
        for i in range(n)
    ]


def with_changes(rows: list[dict], right: int = 0, wrong: int = 0) -> list[dict]:
    """A copy that gets ``right`` of the champion's misses right and ``wrong`` of its hits
    wrong (the first ones, in id order)."""
    out = [dict(r) for r in rows]
    misses = [r for r in out if r["exact_match"] == 0.0][:right]
    hits = [r for r in out if r["exact_match"] == 1.0][:wrong]
    for r in misses:
        r.update(exact_match=1.0, generation=r["reference"])
    for r in hits:
        r.update(exact_match=0.0, generation="wrong")
    return out


def report(rows: list[dict], version: str) -> EvalReport:
    mean = sum(r["exact_match"] for r in rows) / len(rows)
    return EvalReport(
        model_uri="m",
        model_version=version,
        dataset_sha256="d",
        engine="hf",
        metrics={"exact_match": mean},
        num_examples=len(rows),
    )


def test_identical_predictions_tie_on_every_row_with_a_point_interval():
    champ = champion_rows()
    c = compare([dict(r) for r in champ], champ, DIRECTIONS)
    assert c.num_pairs == N and set(c.metrics) == {"eval_loss", "exact_match", "token_f1"}
    em = c.metrics["exact_match"]
    assert (em.wins, em.losses, em.ties) == (0, 0, N)
    assert (em.improvement, em.low, em.high, em.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    assert em.interval(0.95) == "+0 (95% interval +0..+0; 0 won, 0 lost, 391 tied)"


def test_a_few_more_right_answers_are_within_noise_and_the_gate_refuses_them():
    champ = champion_rows()
    cand = with_changes(champ, right=2, wrong=1)  # +1 row of 391: +0.0026
    c = compare(cand, champ, DIRECTIONS)
    em = c.metrics["exact_match"]
    assert (em.wins, em.losses, em.ties) == (2, 1, N - 3)
    assert em.improvement == pytest.approx(1 / N)
    assert em.low < 0 < em.improvement < em.high
    assert em.mcnemar_p == pytest.approx(1.0)  # binomial test of 2 against 1
    d = decide(GateConfig(), report(cand, "v2"), report(champ, "v1"), DIRECTIONS, c)
    assert not d.passed
    reason = d.rules[0].reason
    assert reason.startswith("exact_match 0.9003 vs champion 0.8977: +0.00256 (95% interval -")
    assert reason.endswith(
        "; 2 won, 1 lost, 388 tied): does not exclude the required margin +0 (superiority)"
    )
    # Not worse, though: the non-inferiority policy with a 2-point allowance passes it.
    ni = GateConfig(policy="non-inferiority", max_regression=0.02)
    assert decide(ni, report(cand, "v2"), report(champ, "v1"), DIRECTIONS, c).passed


def test_a_clear_gain_passes_and_its_interval_matches_the_normal_approximation():
    champ = champion_rows()
    cand = with_changes(champ, right=30)  # +30 rows of 391, none lost
    c = compare(cand, champ, DIRECTIONS)
    em = c.metrics["exact_match"]
    assert (em.wins, em.losses) == (30, 0)
    assert em.mcnemar_p == pytest.approx(2 * 0.5**30)
    d = decide(GateConfig(), report(cand, "v2"), report(champ, "v1"), DIRECTIONS, c)
    assert d.passed and "lower bound above the required margin +0" in d.rules[0].reason
    # The per-row difference is 1 on 30 rows, 0 elsewhere: mean p, sd sqrt(p(1-p)/n).
    p = 30 / N
    half = 1.96 * math.sqrt(p * (1 - p) / N)
    assert em.low == pytest.approx(p - half, abs=0.01) and em.high == pytest.approx(
        p + half, abs=0.01
    )
    # A margin of 6 points is more than the interval shows (its lower bound is about 5): refused.
    assert not decide(
        GateConfig(min_improvement=0.06), report(cand, "v2"), report(champ, "v1"), DIRECTIONS, c
    ).passed


def test_eval_loss_is_compared_as_the_token_weighted_mean_in_its_direction():
    champ = champion_rows()
    cand = [dict(r, eval_loss=r["eval_loss"] - 0.05 * (i % 3)) for i, r in enumerate(champ)]
    c = compare(cand, champ, DIRECTIONS)
    loss = c.metrics["eval_loss"]
    weighted = sum(r["eval_loss"] * r["eval_loss_tokens"] for r in champ) / sum(
        r["eval_loss_tokens"] for r in champ
    )
    assert loss.lower_is_better and loss.champion == pytest.approx(weighted)
    assert loss.improvement > 0 and loss.low > 0  # lower loss: an improvement
    assert (loss.wins, loss.losses) == (sum(1 for i in range(N) if i % 3), 0)


def test_only_the_rows_both_models_scored_are_paired():
    champ = champion_rows(n=50)
    cand = champion_rows(n=60)[10:]  # ids e0010..e0059
    c = compare(cand, champ, DIRECTIONS)
    assert c.num_pairs == 40 and c.metrics["exact_match"].num_pairs == 40
    assert compare(cand[:1], champ[10:11], DIRECTIONS).metrics["exact_match"].low is None


def test_the_comparison_table_and_the_changed_examples_show_what_a_reviewer_reads():
    champ = champion_rows()
    cand = with_changes(champ, right=3, wrong=2)
    c = compare(cand, champ, DIRECTIONS)
    rows = {r["name"]: r for r in comparison_rows(report(cand, "v2"), report(champ, "v1"), c)}
    assert rows["exact_match"]["improvement, interval"].endswith("; 3 won, 2 lost, 386 tied)")
    assert rows["exact_match"]["p (McNemar)"] == "1"
    wins, losses = changed_examples(cand, champ, "exact_match", k=5)
    assert [w["id"] for w in wins] == ["e0000", "e0010", "e0020"]
    assert [x["id"] for x in losses] == ["e0001", "e0002"]
    assert wins[0]["candidate"] == "r0" and wins[0]["champion"] == "wrong"
    md = changes_markdown(cand, champ, "exact_match")
    assert "### 3 examples the candidate won on exact_match" in md
    assert "| e0001 | q1 | r1 | wrong | r1 | 0 vs 1 |" in md


def test_models_diff_pairs_two_versions_stored_predictions_from_the_command_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmflow import registry
    from llmflow.store import Store
    from tests.unit.test_cli import run_cli

    store = Store(tmp_path / "store")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    champ = champion_rows()
    tables = {"v1": champ, "v2": with_changes(champ, right=30, wrong=1)}
    for version, rows in tables.items():
        ref = registry.register_version(store, "m", model, base_model="tiny")
        assert ref.version == version
        path = tmp_path / f"{version}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        registry.annotate(
            store, "m", version, eval={"dataset_sha256": "d" * 64, "predictions_uri": str(path)}
        )
    env = {"LLMFLOW_STORE": str(tmp_path / "store")}
    proc = run_cli("models", "diff", "m", "v2", "v1", "--examples", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "## v2 vs v1 on 391 paired rows (95% intervals of the improvement of v2)" in out
    em = next(ln for ln in out.splitlines() if ln.startswith("| exact_match |"))
    assert em.startswith("| exact_match | 0.9719 | 0.8977 | +0.0742 (95% interval +0.0")
    exact_p = 2 * (1 + 31) / 2**31  # two-sided binomial of 1 lost against 30 won
    assert em.endswith(f"; 30 won, 1 lost, 360 tied) | {exact_p:.3g} |"), em
    assert "### 2 examples v2 won on exact_match" in out
    assert (
        "### 1 examples v2 lost on exact_match" in out and "| e0001 | q1 | r1 | wrong | r1 |" in out
    )

    # Versions scored on different data do not pair: one line, non-zero.
    registry.annotate(store, "m", "v1", eval={"dataset_sha256": "e" * 64, "predictions_uri": "x"})
    proc = run_cli("models", "diff", "m", "v2", "v1", env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().endswith(
        f"m:v2 and m:v1 were scored on different datasets ({'d' * 16} and {'e' * 16}): their rows "
        "do not pair"
    ), proc.stderr
    registry.annotate(store, "m", "v1", eval={"dataset_sha256": "d" * 64, "predictions_uri": "x"})
    proc = run_cli("models", "diff", "m", "v2", "v1", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("m:v1's predictions x: not found")
