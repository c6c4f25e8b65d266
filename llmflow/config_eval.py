"""The evaluate stage's optional sections: eval.judge, an LLM that judges the candidate's
answers against the champion's (llmflow/evaluate/judge.py), and eval.benchmarks,
lm-evaluation-harness tasks scored through llmflow's engines (llmflow/evaluate/benchmarks.py).
Their own module, so that llmflow/config.py stays one screen per stage."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from llmflow.sections import Bundles, Section

# The default prompts. Pairwise: which of two answers is better, A or B (asked twice, the
# answers swapped, so a judge that favours a position cancels out). Pointwise: a score of 1 to
# 10 for one answer. {question}, {reference}, {answer_a}, {answer_b}, {answer} are filled in.
PAIRWISE_TEMPLATE = """You are judging two answers to the same question.

Question:
{question}

Reference answer:
{reference}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is better: more correct against the reference, then more helpful? Reply with
one letter, A or B, and nothing else."""

POINTWISE_TEMPLATE = """You are grading an answer to a question.

Question:
{question}

Reference answer:
{reference}

Answer:
{answer}

Grade the answer from 1 (wrong or useless) to 10 (correct and complete) against the
reference. Reply with the number only."""


class JudgeConfig(Section):
    """An LLM judge, run through Ray Data: a model on the vLLM processor of ray.data.llm
    (``engine: vllm``), or an OpenAI-compatible endpoint through Ray Data's HTTP processor
    (``engine: http``). It adds the ``judge`` metric to both reports (higher is better): in
    pairwise mode the candidate's share of wins against the champion on each row (1, 0.5 when
    the two orders disagree, 0), in pointwise mode the grade scaled to 0..1."""

    engine: Literal["vllm", "http"] = "vllm"
    model: str = Field(
        description="vllm: a model directory, store URI, hub id or 'tiny'; http: the model "
        "name the endpoint serves."
    )
    url: str | None = Field(None, description="http: the endpoint's base URL (.../v1).")
    api_key_env: str | None = Field(
        None,
        description="http: the environment variable holding its key (never the key), named "
        "LLMFLOW_JUDGE_*: a run's form chooses the URL, so it may not send any other secret.",
    )
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    template: str | None = Field(
        None, description="The prompt (str.format fields as the default's); empty: built in."
    )
    max_tokens: int = Field(8, ge=1, description="The verdict's length: a letter or a number.")
    max_examples: int | None = Field(None, ge=1, description="Judge at most this many rows.")
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1, description="Engine replicas or concurrent requesters.")
    vllm_engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    vllm_placement: Bundles | None = None

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeConfig:
        if self.engine == "http" and not self.url:
            raise ValueError("engine http needs url: the endpoint's base URL (.../v1)")
        if self.engine == "vllm" and (self.url or self.api_key_env):
            raise ValueError("url and api_key_env are for engine http")
        if self.api_key_env and not re.fullmatch(r"LLMFLOW_JUDGE_[A-Z0-9_]+", self.api_key_env):
            raise ValueError(
                f"api_key_env: {self.api_key_env!r} is not named LLMFLOW_JUDGE_*; the judge's "
                "URL comes from the run, so its key comes from a variable kept for it"
            )
        return self

    @model_validator(mode="after")
    def _template(self) -> JudgeConfig:
        import string

        needed = {"answer_a", "answer_b"} if self.mode == "pairwise" else {"answer"}
        allowed = {"question", "reference", *needed}
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt()) if f is not None}
        except ValueError as exc:
            raise ValueError(f"template: {exc}") from exc
        if fields - allowed or needed - fields:
            raise ValueError(
                f"template: a {self.mode} prompt uses {{{'}, {'.join(sorted(needed))}}} and may "
                f"use {{question}}, {{reference}}; it has {sorted(fields) or 'no fields'}"
            )
        return self

    def prompt(self) -> str:
        if self.template:
            return self.template
        return PAIRWISE_TEMPLATE if self.mode == "pairwise" else POINTWISE_TEMPLATE


class BenchmarksConfig(Section):
    """lm-evaluation-harness tasks scored with the eval engine (Ray Data), for both models: each
    task's metrics join the reports as ``<task>/<metric>``, gateable (``gate.guardrails``:
    the candidate may lose at most so much on them, judged by the paired interval)."""

    tasks: list[str] = Field(
        min_length=1,
        description="Hub task names (gsm8k, ...; need the network) or task YAML files (local "
        "data, offline: llmflow/bundled/lm_eval/llmflow_reverse.yaml).",
    )
    limit: int | None = Field(None, ge=1, description="At most this many documents a task.")
