"""Generation on the hf engine for the Serve app: one batched `generate` for requests that
share their sampling settings, with left padding and the model's end ids as stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from openai.types import CompletionUsage


@dataclass
class GenJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = ()


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def generate_batch(model, tokenizer, jobs: list[GenJob]) -> list[GenResult]:
    """One generate call for jobs that share sampling settings (left padding, KV cache). It
    stops on every id of the model's generation_config.eos_token_id (a turn's end token)."""
    import torch

    from llmflow.engines.hf import left_pad
    from llmflow.engines.stops import (
        cut_at_stop_ids,
        cut_at_stop_strings,
        finish_reason,
        stop_token_ids,
    )

    stop_ids = stop_token_ids(model.generation_config, tokenizer)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([j.prompt_ids for j in jobs], pad)
    width = ids.shape[1]
    first = jobs[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(j.max_tokens for j in jobs),
        "pad_token_id": pad,
        "eos_token_id": list(stop_ids),
    }
    if first.temperature > 0:
        if first.seed is not None:
            torch.manual_seed(first.seed)
        kwargs |= {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
    else:
        kwargs |= {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs
        )
    results = []
    for i, j in enumerate(jobs):
        new, stopped = cut_at_stop_ids(out[i, width:].tolist()[: j.max_tokens], stop_ids)
        new = [t for t in new if t != pad]
        text, hit = cut_at_stop_strings(tokenizer.decode(new, skip_special_tokens=True), j.stop)
        results.append(
            GenResult(
                text,
                len(j.prompt_ids),
                len(new),
                finish_reason(len(new), j.max_tokens, stopped or hit),
            )
        )
    return results


def usage(results: list[GenResult]) -> CompletionUsage:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


@dataclass
class StreamEnd:
    """The last item of ``stream_generate``: why the answer ended, or what failed."""

    finish: str | None = None
    error: BaseException | None = None


async def stream_generate(
    model, tokenizer, job: GenJob, executor
) -> AsyncIterator[str | StreamEnd]:
    """The answer to one job as decoded pieces, then a StreamEnd. ``generate`` runs on
    ``executor`` (the replica's one model thread); the event loop only awaits it."""
    import torch
    from transformers import TextIteratorStreamer

    from llmflow.engines.stops import StreamStops, cut_at_stop_ids, finish_reason, stop_token_ids

    stop_ids = stop_token_ids(model.generation_config, tokenizer)
    stops = StreamStops(job.stop)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([job.prompt_ids], device=model.device)
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": job.max_tokens,
        "streamer": streamer,
        "pad_token_id": pad,
        "do_sample": False,
        "eos_token_id": list(stop_ids),
    }
    if job.temperature > 0:
        kwargs |= {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
    end = StreamEnd()

    def run():
        try:
            with torch.inference_mode():
                if job.temperature > 0 and job.seed is not None:
                    torch.manual_seed(job.seed)
                out = model.generate(**kwargs)
            new, stopped = cut_at_stop_ids(out[0, ids.shape[1] :].tolist(), stop_ids)
            end.finish = finish_reason(len(new), job.max_tokens, stopped)
        except Exception as exc:  # noqa: BLE001 - reported in the stream, not lost in a thread
            end.error = exc
            streamer.end()  # else the loop below would wait on the streamer forever

    loop = asyncio.get_running_loop()
    generating = loop.run_in_executor(executor, run)
    while (piece := await loop.run_in_executor(None, lambda: next(streamer, None))) is not None:
        if text := stops.feed(piece):  # once a stop string showed, the rest is dropped
            yield text
    if rest := stops.flush():
        yield rest
    await generating
    if stops.stopped and end.finish is not None:
        end.finish = "stop"
    yield end
