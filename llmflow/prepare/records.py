"""Normalising records to one chat schema, cleaning, de-duplicating and splitting them.

Every input format becomes ``messages: [{role, content}, ...]`` ending with the assistant's
answer. A row that cannot be read or normalised never stops the run: it is quarantined
with its file, line number and reason, and the validation suite decides whether the share
of such rows is acceptable.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmflow.prepare.sources import ROLES, Record, RowError, snippet

# Below this many characters in all contents together a row carries no instruction.
MIN_CHARS = 2


# sharegpt-style speaker names.
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}


@dataclass
class Quarantined:
    source: str
    line: int | None
    reason: str
    raw: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "raw": self.raw}


@dataclass
class Prepared:
    """The outcome of preparing a source: clean splits plus what was set aside."""

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    num_input: int = 0
    num_duplicates: int = 0
    num_truncated_by_max_rows: int = 0
    num_truncated: int = 0  # rows over max_tokens cut to fit (data.truncation: truncate)


# -- normalising ------------------------------------------------------------------------------
_SPACES = re.compile(r"[ \t\u00a0]+\n")


_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, unified newlines, no trailing spaces on lines, at most one blank line, trimmed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub("\n", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__}, expected a string")
    out = clean_text(value)
    if not out:
        raise RowError(f"{what} is empty")
    return out


def map_columns(record: Any, columns: dict[str, str]) -> Any:
    """A row with its own columns renamed to the fields llmflow reads (data.columns: field ->
    column; ``response`` is ``completion``); the columns no field names stay as they are.

    Raises:
        RowError: the row lacks a mapped column.
    """
    if not columns or not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for target, column in columns.items():
        if column not in record:
            raise RowError(f"missing column '{column}' (data.columns.{target})")
        out["completion" if target == "response" else target] = record[column]
    return out


def normalise(record: Any) -> list[dict[str, str]]:
    """One raw record -> a cleaned chat: chat messages, alpaca, prompt/completion, sharegpt.

    Raises:
        RowError: the reason the row is quarantined.
    """
    if not isinstance(record, dict):
        raise RowError(f"row is {type(record).__name__}, expected an object")
    if record.get("messages") is not None:
        messages = _from_messages(record["messages"], "messages")
    elif record.get("conversations") is not None:
        messages = _from_messages(record["conversations"], "conversations")
    elif "instruction" in record or "output" in record:
        if "instruction" not in record or "output" not in record:
            missing = "instruction" if "instruction" not in record else "output"
            raise RowError(f"missing field '{missing}' (alpaca format)")
        user = _text(record["instruction"], "instruction")
        extra = record.get("input")
        if extra not in (None, ""):
            user = f"{user}\n\n{_text(extra, 'input')}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record["output"], "output")},
        ]
        if record.get("system") not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            missing = "prompt" if "prompt" not in record else "completion"
            raise RowError(f"missing field '{missing}' (prompt/completion format)")
        messages = [
            {"role": "user", "content": _text(record["prompt"], "prompt")},
            {"role": "assistant", "content": _text(record["completion"], "completion")},
        ]
        if record.get("system") not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    else:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise RowError(
            "unknown format: expected 'messages', 'conversations', 'instruction'/'output' or "
            f"'prompt'/'completion' (fields: {keys}); name yours with data.columns, e.g. "
            "{prompt: question, completion: answer}"
        )
    if not any(m["role"] == "user" for m in messages):
        raise RowError("no user message")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"last message is from '{messages[-1]['role']}', expected 'assistant'")
    return messages


def _from_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # numpy arrays out of Parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field_name}' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"{field_name}[{i}] is {type(m).__name__}, expected an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None:
            raise RowError(f"{field_name}[{i}] has no role")
        if content is None:
            raise RowError(f"{field_name}[{i}] has no content")
        if not isinstance(role, str):
            raise RowError(f"{field_name}[{i}].role is {type(role).__name__}, expected a string")
        norm_role = role.strip().lower()
        norm_role = (
            SPEAKERS.get(norm_role, norm_role) if field_name == "conversations" else norm_role
        )
        if norm_role not in ROLES:
            raise RowError(f"{field_name}[{i}] has unknown role '{role}'")
        out.append({"role": norm_role, "content": _text(content, f"{field_name}[{i}].content")})
    return out


def example_id(messages: list[dict[str, str]]) -> str:
    """Content hash of a normalised example: 16 hex chars, stable across runs and machines."""
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def split_of(eid: str, eval_fraction: float) -> str:
    """'eval' or 'train' from the example's own hash: adding rows never moves another row."""
    return "eval" if int(eid[:8], 16) / 0x1_0000_0000 < eval_fraction else "train"


# -- truncation ------------------------------------------------------------------------------
Counter = Callable[[list[list[dict[str, str]]]], list[int]]


def _longest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in lo..hi with fits(n) (fits is monotone: true up to some n); None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def truncate_chat(
    messages: list[dict[str, str]], max_tokens: int, count: Counter
) -> list[dict[str, str]] | None:
    """The chat cut to ``max_tokens`` (as ``count`` renders it), or None when no reply fits.

    A prompt (every turn before the last reply) over half of max_tokens loses its start first:
    its earlier turns, the system prompt excepted, then the start of its last user turn, so
    the question's end is kept. The reply then keeps as much of its start as fits.
    """
    *prompt, reply = messages
    text = reply["content"]

    def tokens(turns: list[dict[str, str]], answer: str) -> int:
        return count([[*turns, {"role": "assistant", "content": answer}]])[0]

    half = max_tokens // 2
    if tokens(prompt, text[:1]) > half:
        system = [m for m in prompt[:1] if m["role"] == "system"]
        rest = prompt[len(system) :]
        while len(rest) > 1 and tokens([*system, *rest], text[:1]) > half:
            rest = rest[1:]  # the oldest turn goes first
        last = rest[-1]["content"]
        keep = _longest(
            1,
            len(last),
            lambda n: (
                tokens([*system, *rest[:-1], {**rest[-1], "content": last[-n:]}], text[:1]) <= half
            ),
        )
        if keep is None:
            return None
        prompt = [*system, *rest[:-1], {**rest[-1], "content": last[-keep:].lstrip()}]
    kept = _longest(1, len(text), lambda n: tokens(prompt, text[:n]) <= max_tokens)
    if kept is None or not text[:kept].strip():
        return None
    return [*prompt, {**reply, "content": text[:kept].rstrip()}]


# -- the whole transform ----------------------------------------------------------------------
TOKEN_BATCH = 1024


def prepare_records(
    records: Iterator[Record],
    *,
    eval_fraction: float,
    max_chars: int,
    max_tokens: int,
    max_rows: int | None = None,
    count_tokens: Callable[[list[list[dict[str, str]]]], list[int]] | None = None,
    eval_records: Iterator[Record] | None = None,
    columns: dict[str, str] | None = None,
    truncate: bool = False,
) -> Prepared:
    """Normalise, clean, de-duplicate, bound and split records (pure: no I/O of its own).

    Args:
        records: (source, line, record) triples from iter_records().
        count_tokens: token counts of a batch of chats rendered with the model's tokenizer;
            None skips the token bound (n_tokens is then 0).
        eval_records: the dataset's own eval split (data.eval_split): its rows are the eval
            split, read first, so a training row repeating one is dropped as a duplicate;
            eval_fraction then draws nothing, and max_rows bounds the training rows.
        columns: data.columns (map_columns).
        truncate: a row over max_tokens is cut to fit (truncate_chat), not quarantined.

    Returns:
        Prepared splits (rows: id, messages, n_chars, n_tokens) and the quarantined rows.
    """
    out = Prepared()
    seen: set[str] = set()
    pending: list[tuple[str, int | None, Any, dict[str, Any], bool]] = []
    kept = 0

    def flush() -> None:
        nonlocal kept
        counts = count_tokens([p[3]["messages"] for p in pending]) if count_tokens else None
        for i, (source, line, record, row, own_eval) in enumerate(pending):
            if counts is not None:
                row["n_tokens"] = counts[i]
                cut = None
                if counts[i] > max_tokens and truncate and count_tokens is not None:
                    cut = truncate_chat(row["messages"], max_tokens, count_tokens)
                if cut is not None:
                    out.num_truncated += 1
                    row["messages"], row["n_tokens"] = cut, count_tokens([cut])[0]
                    row["n_chars"] = sum(len(m["content"]) for m in cut)
                elif counts[i] > max_tokens:
                    reason = f"too long: {counts[i]} tokens > data.max_tokens={max_tokens}"
                    if truncate:
                        reason += " (no part of the reply fits after the prompt)"
                    out.quarantined.append(Quarantined(source, line, reason, snippet(record)))
                    continue
            if own_eval:
                out.eval.append(row)
                continue
            if max_rows is not None and kept >= max_rows:
                out.num_truncated_by_max_rows += 1
                continue
            kept += 1
            drawn = eval_records is None and split_of(row["id"], eval_fraction) == "eval"
            (out.eval if drawn else out.train).append(row)
        pending.clear()

    streams = [(eval_records, True)] if eval_records is not None else []
    for source, line, record, own_eval in (
        (*r, own) for stream, own in [*streams, (records, False)] for r in stream
    ):
        out.num_input += 1
        try:
            if isinstance(record, RowError):
                raise record
            messages = normalise(map_columns(record, columns or {}))
            n_chars = sum(len(m["content"]) for m in messages)
            if n_chars > max_chars:
                raise RowError(f"too long: {n_chars} characters > data.max_chars={max_chars}")
            if n_chars < MIN_CHARS:
                raise RowError(f"near-empty: {n_chars} characters")
        except RowError as exc:
            out.quarantined.append(Quarantined(source, line, str(exc), snippet(record)))
            continue
        eid = example_id(messages)
        if eid in seen:
            out.num_duplicates += 1
            continue
        seen.add(eid)
        row = {"id": eid, "messages": messages, "n_chars": n_chars, "n_tokens": 0}
        pending.append((source, line, record, row, own_eval))
        if len(pending) >= TOKEN_BATCH:
            flush()
    flush()
    return out


def dataset_sha256(prepared: Prepared, prep_config: dict[str, Any]) -> str:
    """Content address of a prepared dataset: its rows (by content id, in split order) and the
    config that produced them."""
    h = hashlib.sha256(json.dumps(prep_config, sort_keys=True, default=str).encode())
    for split, rows in (("train", prepared.train), ("eval", prepared.eval)):
        h.update(split.encode())
        for r in rows:
            h.update(r["id"].encode())
    return h.hexdigest()
