"""Where a generation ends: stop token ids from the model's generation_config, OpenAI `stop`
strings, and the finish_reason that follows. Plain functions, shared by the hf engine's
scoring UDF and the hf Serve app (vLLM does the same itself).

A chat model's turn often ends with a token other than ``tokenizer.eos_token``: Phi-3 with
``<|end|>``, Llama-3 with ``<|eot_id|>``; their generation_config lists every such id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`


def stop_token_ids(generation_config, tokenizer) -> tuple[int, ...]:
    """Every id that ends a generation: generation_config.eos_token_id (an int or a list)
    and the tokenizer's eos token, in that order, without repeats."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    for value in [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def cut_at_stop_ids(new: Sequence[int], stop_ids: Iterable[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id (the stop id itself is not part of the answer),
    and whether one was found."""
    stops = set(stop_ids)
    for i, t in enumerate(new):
        if t in stops:
            return list(new[:i]), True
    return list(new), False


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred (OpenAI `stop`:
    the stop string itself is not returned)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def finish_reason(completion_tokens: int, max_tokens: int, stopped: bool) -> str:
    """'length' only when max_tokens was reached without a stop; 'stop' otherwise."""
    return "length" if not stopped and completion_tokens >= max_tokens else "stop"


class StreamStops:
    """Stop strings over a stream of text pieces: holds back what could still become a stop
    string, so nothing after (or of) one is ever sent."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending, self.stopped = "", False

    def feed(self, piece: str) -> str:
        """Text that is safe to send now ('' once stopped)."""
        if self.stopped:
            return ""
        self.pending += piece
        text, self.stopped = cut_at_stop_strings(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return text
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
