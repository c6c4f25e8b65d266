"""The vllm engine: batch generation through ``ray.data.llm`` (a vLLM processor) on GPUs.

``ray.data.llm`` builds the processor without vllm installed; running it needs vllm and a
GPU (tests/gpu). Its stages template the chat, tokenize, generate and detokenize; the pre-
and post-processing functions here map llmflow's columns to and from the processor's.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

    from llmflow.config import EvalConfig


def vllm_preprocess(
    row: dict[str, Any],
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None = None,
    truncate_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """A row's chat and sampling parameters, as the vLLM processor reads them."""
    from llmflow.engines.hf import to_messages

    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if temperature > 0 and seed is not None:
        params["seed"] = seed
    if truncate_prompt_tokens:
        # vLLM keeps the last k prompt tokens: a left truncation, like the hf engine's.
        params["truncate_prompt_tokens"] = truncate_prompt_tokens
    return {"messages": to_messages(row["prompt_messages"]), "sampling_params": params}


# The processor's working columns, dropped once their content is in llmflow's columns.
_PROCESSOR_COLUMNS = (
    "messages", "sampling_params", "prompt", "prompt_token_ids", "tokenized_prompt",
    "generated_tokens", "generated_text", "num_input_tokens", "num_generated_tokens",
    "metrics", "embeddings", "logprobs", "prompt_logprobs", "request_id", "batch_uuid",
    "time_taken_llm", "prompt_messages", "image", "params",
)  # fmt: skip


def vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """llmflow's engine columns (``OUTPUT_COLUMNS``) from a row the processor returned."""
    text = row.get("generated_text") or ""
    full = row.get("tokenized_prompt")
    seen = int(row.get("num_input_tokens") or 0)
    out = {k: v for k, v in row.items() if k not in _PROCESSOR_COLUMNS}
    out.update(
        generation=text,
        num_prompt_tokens=seen,
        num_generated_tokens=int(row.get("num_generated_tokens") or 0),
        prompt_truncated=bool(full is not None and len(full) > seen),
        empty_generation=not text.strip(),
        batch_id=str(row.get("batch_uuid") or ""),
        latency_s=float(row.get("time_taken_llm") or 0.0),
    )
    return out


def processor_config(eval_cfg: EvalConfig, model_path: str):
    """The ``vLLMEngineProcessorConfig`` of an eval config: batch size, actors, engine kwargs."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=dict(eval_cfg.vllm_engine_kwargs),
        batch_size=eval_cfg.batch_size,
        concurrency=eval_cfg.concurrency,
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )


def build_vllm_processor(eval_cfg: EvalConfig, model_path: str, seed: int = 0):
    """The vLLM processor for ``eval_cfg``: named pre/post-processing around the engine.

    Prompts longer than ``max_model_len`` less ``max_new_tokens`` (when the engine kwargs
    set max_model_len) are truncated from the left instead of failing the request.
    """
    from ray.data.llm import build_processor

    config = processor_config(eval_cfg, model_path)
    max_len = config.engine_kwargs.get("max_model_len")
    truncate = max(1, max_len - eval_cfg.max_new_tokens) if max_len else None
    preprocess = functools.partial(
        vllm_preprocess,
        max_tokens=eval_cfg.max_new_tokens,
        temperature=eval_cfg.temperature,
        seed=seed,
        truncate_prompt_tokens=truncate,
    )
    return build_processor(config, preprocess=preprocess, postprocess=vllm_postprocess)


class VLLMEngine:
    """The vllm engine: the processor of ``build_vllm_processor`` applied to a dataset."""

    name = "vllm"

    def __init__(self, eval_cfg: EvalConfig, model_path: str, seed: int = 0, **_: Any):
        self.cfg = eval_cfg
        self.model_path = model_path
        self.seed = seed

    def generate(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return build_vllm_processor(self.cfg, self.model_path, self.seed)(ds)
