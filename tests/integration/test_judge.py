"""The LLM judge's decisions through Ray Data's HTTP processor, against a deterministic
OpenAI-compatible judge in the test (a model that judges well cannot run on these CPUs): it
prefers the answer equal to the reference and, when both or neither are, always says "A" (a
position bias the swapped order must cancel). The gate on the judge metric then promotes the
better model and refuses the worse one. (~15 s on the session's Ray; the vLLM processor's
mechanics on the tiny model are in test_vllm.py.)"""

from __future__ import annotations

import math

import pytest

from llmflow.config import ClusterConfig, EvalConfig, GateConfig
from llmflow.config_eval import JudgeConfig
from llmflow.evaluate import judge
from llmflow.evaluate.metrics import DIRECTIONS
from llmflow.evaluate.paired import compare, read_predictions
from llmflow.promote.gate import decide
from llmflow.refs import EvalReport
from tests.integration.helpers import Judge, judge_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N = 40


@pytest.fixture(scope="module")
def endpoint():
    with judge_endpoint() as url:
        yield url


def predictions(tmp_path, name: str, right: set[int]) -> EvalReport:
    """A report whose stored predictions answer the rows in ``right`` correctly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": f"e{i:03d}",
            "question": f"reverse {i}" + (" garble" if i >= N - 4 else ""),
            "reference": f"{i}"[::-1],
            "generation": f"{i}"[::-1] if i in right else "wrong",
            "exact_match": float(i in right),
        }
        for i in range(N)
    ]
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return EvalReport(
        model_uri=name,
        model_version=name,
        dataset_sha256="d",
        engine="hf",
        metrics={"exact_match": len(right) / N},
        num_examples=N,
        predictions_uri=str(path),
    )


def test_the_judge_prefers_the_better_answers_and_the_gate_follows_it(
    ray_on_stack, endpoint, tmp_path
):
    better = predictions(tmp_path, "v2", set(range(30)))  # 30 right
    worse = predictions(tmp_path, "v1", set(range(20, 26)))  # 6 right, all of them also in v2
    cfg = JudgeConfig(
        model="judge", engine="http", url=endpoint, api_key_env="LLMFLOW_JUDGE_KEY", batch_size=8
    )
    reqs = judge.judge_requests(
        read_predictions(better.predictions_uri), read_predictions(worse.predictions_uri), cfg
    )
    Judge.seen.clear()
    verdicts = judge.ask_judge(reqs, cfg, EvalConfig(), ClusterConfig(), api_key="k-123")
    assert len(verdicts) == len(Judge.seen) == 2 * N  # every row, both orders
    assert {s["auth"] for s in Judge.seen} == {"Bearer k-123"}
    assert {s["body"]["model"] for s in Judge.seen} == {"judge"}
    unreadable = [v for v in verdicts if v["verdict"] is None]
    assert len(unreadable) == 8 and {v["text"] for v in unreadable} == {"I would rather not say."}

    cand, champ = judge.judged_reports(better, worse, verdicts, "pairwise", str(tmp_path / "j"))
    # 24 rows only v2 answers: won both orders; 12 rows alike: the bias cancels to 0.5 each;
    # 4 unreadable rows are not judged. 24 + 6 (12 x 0.5) of 36 judged rows.
    assert cand.metrics["judge"] == pytest.approx(30 / 36)
    assert champ.metrics["judge"] == pytest.approx(6 / 36)
    assert cand.metrics["judge_unparseable"] == champ.metrics["judge_unparseable"] == 8.0
    rows = {r["id"]: r for r in read_predictions(cand.predictions_uri)}
    assert rows["e000"]["judge"] == 1.0 and rows["e025"]["judge"] == 0.5
    assert math.isnan(rows[f"e{N - 1:03d}"]["judge"])
    saved = read_predictions(str(tmp_path / "j" / judge.VERDICTS_FILE))
    assert len(saved) == 2 * N and saved[0]["prompt"].startswith("You are judging two answers")
    # The score-model reports are left as they were (cached and shared).
    assert "judge" not in read_predictions(better.predictions_uri)[0]

    gate = GateConfig(primary_metric="judge")
    comparison = compare(
        read_predictions(cand.predictions_uri), read_predictions(champ.predictions_uri), DIRECTIONS
    )
    j = comparison.metrics["judge"]
    assert (j.num_pairs, j.wins, j.losses, j.ties) == (36, 24, 0, 12)
    decision = decide(gate, cand, champ, DIRECTIONS, comparison)
    assert decision.passed, decision.reasons
    assert "judge 0.8333 vs champion 0.1667: +0.667 (95% interval +0." in decision.reasons[0]

    # The other way round: the worse model as the candidate is refused.
    reqs = judge.judge_requests(
        read_predictions(worse.predictions_uri), read_predictions(better.predictions_uri), cfg
    )
    verdicts = judge.ask_judge(reqs, cfg, EvalConfig(), ClusterConfig(), api_key="k-123")
    cand, champ = judge.judged_reports(worse, better, verdicts, "pairwise", str(tmp_path / "k"))
    comparison = compare(
        read_predictions(cand.predictions_uri), read_predictions(champ.predictions_uri), DIRECTIONS
    )
    decision = decide(gate, cand, champ, DIRECTIONS, comparison)
    assert not decision.passed and "does not exclude the required margin" in decision.reasons[0]
