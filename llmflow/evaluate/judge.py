"""An LLM judge of the candidate's answers against the champion's, through Ray Data.

    both reports' predictions -> paired rows -> judge prompts (pairwise: each pair twice, the
    answers swapped) -> Ray Data: the vLLM processor of ray.data.llm (a judge model) or its
    HTTP processor (an OpenAI-compatible endpoint) -> verdicts parsed -> the ``judge`` column
    added to copies of both predictions, and the metric to both reports

Pairwise, a row's candidate score is its share of the two orders it won (1, 0.5 when the
orders disagree, which cancels a judge's position bias, 0) and the champion's is the rest, so
the paired comparison's improvement on ``judge`` is 2 x win rate - 1. Pointwise, each answer
gets its own grade (1..10 scaled to 0..1). Every raw verdict is saved (judge.parquet); an
unparseable one is counted (``judge_unparseable``) and its row judged on the other order
alone, or not judged when no order parsed: never silently scored.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmflow.config import ClusterConfig, EvalConfig
from llmflow.config_eval import JudgeConfig
from llmflow.evaluate.paired import paired_rows
from llmflow.refs import EvalReport

JUDGE, UNPARSEABLE = "judge", "judge_unparseable"
CANDIDATE_FIRST, CHAMPION_FIRST = "candidate-first", "champion-first"
CANDIDATE, CHAMPION = "candidate", "champion"
VERDICTS_FILE = "judge.parquet"


def judge_requests(
    candidate: Sequence[Mapping[str, Any]],
    champion: Sequence[Mapping[str, Any]],
    cfg: JudgeConfig,
) -> list[dict[str, Any]]:
    """The prompts to send: two per paired row (both orders, or both answers graded)."""
    template = cfg.prompt()
    pairs = paired_rows(candidate, champion)[: cfg.max_examples or None]
    out = []
    for c, p in pairs:
        common = {"question": str(c.get("question", "")), "reference": str(c.get("reference", ""))}
        cand, champ = str(c.get("generation", "")), str(p.get("generation", ""))
        if cfg.mode == "pairwise":
            asks = [(CANDIDATE_FIRST, {"answer_a": cand, "answer_b": champ})]
            asks.append((CHAMPION_FIRST, {"answer_a": champ, "answer_b": cand}))
        else:
            asks = [(CANDIDATE, {"answer": cand}), (CHAMPION, {"answer": champ})]
        for order, answers in asks:
            prompt = template.format(**common, **answers)
            out.append({"id": str(c["id"]), "order": order, "prompt": prompt})
    return out


_LETTER = re.compile(r"^\W*(?:answer\W*)?([AB])(?![A-Za-z])", re.IGNORECASE)
_GRADE = re.compile(r"^\W*(\d{1,2})(?:\s*/\s*10)?(?!\d)")


def parse_verdict(text: str, mode: str) -> float | None:
    """Pairwise: 1.0 for A, 0.0 for B; pointwise: the grade 1..10 as 0..1; None when the text
    does not start with one (after punctuation and an optional "Answer")."""
    if mode == "pairwise":
        m = _LETTER.match(text or "")
        return None if m is None else (1.0 if m[1].upper() == "A" else 0.0)
    m = _GRADE.match(text or "")
    if m is None or not 1 <= int(m[1]) <= 10:
        return None
    return (int(m[1]) - 1) / 9


def row_scores(verdicts: Sequence[Mapping[str, Any]], mode: str) -> dict[str, tuple[float, float]]:
    """id -> (candidate's judge score, champion's) from the parsed verdicts (``verdict``: the
    parse_verdict value or None); ids with no usable verdict are left out."""
    by_id: dict[str, dict[str, float | None]] = {}
    for v in verdicts:
        by_id.setdefault(str(v["id"]), {})[v["order"]] = v["verdict"]
    out = {}
    for row_id, got in by_id.items():
        if mode == "pairwise":
            # A in candidate-first and B in champion-first are the candidate's wins.
            wins = [got.get(CANDIDATE_FIRST), _flip(got.get(CHAMPION_FIRST))]
            wins = [w for w in wins if w is not None]
            if wins:
                share = sum(wins) / len(wins)
                out[row_id] = (share, 1.0 - share)
        elif got.get(CANDIDATE) is not None and got.get(CHAMPION) is not None:
            out[row_id] = (got[CANDIDATE], got[CHAMPION])
    return out


def _flip(v: float | None) -> float | None:
    return None if v is None else 1.0 - v


def judge_eval_config(cfg: JudgeConfig, eval_cfg: EvalConfig) -> EvalConfig:
    """The judge's vLLM settings as an eval config (the scoring engine's processor builder
    reads one): its own engine kwargs and placement, else the eval section's."""
    return eval_cfg.model_copy(
        update={
            "engine": "vllm",
            "batch_size": cfg.batch_size,
            "concurrency": cfg.concurrency,
            "max_new_tokens": cfg.max_tokens,
            "temperature": 0.0,
            "vllm_engine_kwargs": cfg.vllm_engine_kwargs or eval_cfg.vllm_engine_kwargs,
            "vllm_placement": cfg.vllm_placement or eval_cfg.vllm_placement,
            "judge": None,
        }
    )


def _chat(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["prompt"]}]


def _vllm_pre(row: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    return {
        "messages": _chat(row),
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0},
    }


def _vllm_post(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "order": row["order"], "text": row.get("generated_text") or ""}


def _http_pre(row: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    messages = _chat(row)
    return {
        "payload": {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
    }


def _http_post(row: dict[str, Any]) -> dict[str, Any]:
    try:
        text = row["http_response"]["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        text = ""  # an answer without a message: an unparseable verdict, counted
    return {"id": row["id"], "order": row["order"], "text": str(text)}


def build_judge_processor(
    cfg: JudgeConfig, eval_cfg: EvalConfig, cluster: ClusterConfig | None, api_key: str | None
):
    """The Ray Data processor that asks the judge: vLLM (ray.data.llm) or HTTP."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    if cfg.engine == "http":
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        config = HttpRequestProcessorConfig(
            url=f"{cfg.url.rstrip('/')}/chat/completions",
            headers=headers,
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
        )
        pre = functools.partial(_http_pre, model=cfg.model, max_tokens=cfg.max_tokens)
        return build_processor(config, preprocess=pre, postprocess=_http_post)
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.engines.vllm import processor_config

    model = resolve_base_model(TrainConfig(base_model=cfg.model))
    config = processor_config(judge_eval_config(cfg, eval_cfg), model, cluster)
    pre = functools.partial(_vllm_pre, max_tokens=cfg.max_tokens)
    return build_processor(config, preprocess=pre, postprocess=_vllm_post)


def ask_judge(
    requests: list[dict[str, Any]],
    cfg: JudgeConfig,
    eval_cfg: EvalConfig,
    cluster: ClusterConfig | None = None,
    api_key: str | None = None,
) -> list[dict[str, Any]]:
    """Every request through the judge on Ray Data, with its raw text and parsed verdict."""
    import ray

    if not requests:
        return []
    processor = build_judge_processor(cfg, eval_cfg, cluster, api_key)
    prompts = {(r["id"], r["order"]): r["prompt"] for r in requests}
    out = processor(ray.data.from_items(requests)).take_all()
    return sorted(
        (
            {
                "id": str(r["id"]),
                "order": r["order"],
                "prompt": prompts[(str(r["id"]), r["order"])],
                "text": r["text"],
                "verdict": parse_verdict(r["text"], cfg.mode),
            }
            for r in out
        ),
        key=lambda r: (r["id"], r["order"]),
    )


def judged_reports(
    candidate: EvalReport,
    champion: EvalReport,
    verdicts: list[dict[str, Any]],
    mode: str,
    out_uri: str,
) -> tuple[EvalReport, EvalReport]:
    """Both reports with the ``judge`` metric (the mean of the judged rows) and
    ``judge_unparseable``, their predictions copied with the ``judge`` column (NaN where a row
    was not judged) beside the raw verdicts under ``out_uri``. The score-model results stay as
    they were (they are cached and shared)."""
    import pyarrow as pa

    from llmflow.evaluate.paired import read_predictions
    from llmflow.store import Store

    scores = row_scores(verdicts, mode)
    unparseable = float(sum(v["verdict"] is None for v in verdicts))
    store = Store(out_uri)
    store.write_parquet(pa.Table.from_pylist(verdicts, schema=_verdict_schema()), VERDICTS_FILE)
    reports = []
    for side, report in enumerate((candidate, champion)):
        rows = read_predictions(report.predictions_uri)
        for r in rows:
            got = scores.get(str(r["id"]))
            r[JUDGE] = got[side] if got else math.nan
        judged = [r[JUDGE] for r in rows if not math.isnan(r[JUDGE])]
        name = f"{CANDIDATE if side == 0 else CHAMPION}.parquet"
        uri = store.write_parquet(rows, name)
        metrics = {
            **report.metrics,
            JUDGE: sum(judged) / len(judged) if judged else math.nan,
            UNPARSEABLE: unparseable,
        }
        reports.append(report.model_copy(update={"metrics": metrics, "predictions_uri": uri}))
    return reports[0], reports[1]


def _verdict_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("order", pa.string()),
            ("prompt", pa.string()),
            ("text", pa.string()),
            ("verdict", pa.float64()),
        ]
    )
