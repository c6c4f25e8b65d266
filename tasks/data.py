"""The prepare stage: load instruction data, normalise it to one chat schema, clean, split.

Plain functions hold the logic (tested without Prefect or Ray); `prepare_dataset` in
tasks/prepare.py wraps them with caching, artifacts and the store.

Every input format becomes ``messages: [{role, content}, ...]`` ending with the assistant's
answer. A row that cannot be read or normalised never stops the run: it is quarantined
with its file, line number and reason, and the validation suite decides whether the share
of such rows is acceptable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmflow.errors import LlmflowError

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# How much of a bad row the quarantine file keeps: enough to find it, not a 10 MB copy.
RAW_SNIPPET = 300
# Below this many characters in all contents together a row carries no instruction.
MIN_CHARS = 2
# sharegpt-style speaker names.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system", "bot": "assistant", "model": "assistant"}  # fmt: skip


class DataError(LlmflowError):
    """The data source as a whole cannot be read (missing path, unreadable dataset)."""


class RowError(ValueError):
    """One row is bad; its message is the quarantine reason, ``raw`` what could be read."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.raw = raw


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


# -- reading ----------------------------------------------------------------------------------
def resolve_source(source: str) -> str:
    """'bundled' -> the committed JSONL of the synthetic task; anything else unchanged."""
    if source == "bundled":
        from llmflow.bundled import bundled_path

        return str(bundled_path())
    return source


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def source_files(source: str) -> list[Path]:
    """The data files a local source stands for; [] for a saved dataset or a hub id."""
    path = Path(resolve_source(source)).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(
                f"data.source: {path}: unsupported file type '{path.suffix}' "
                f"(expected one of {', '.join(FILE_SUFFIXES)})"
            )
        return [path]
    if path.is_dir():
        if _is_saved_dataset(path):
            return []
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(f"data.source: {path}: folder has no {'/'.join(FILE_SUFFIXES)} files")
        return files
    if _looks_like_hub_id(source):
        return []
    raise DataError(f"data.source: {path}: no such file or directory")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)) and not source.startswith(".")


def fingerprint_source(source: str, revision: str | None = None) -> str:
    """sha256 of the source's bytes (its files, in order): the key that decides a re-run is a
    cache hit without re-reading rows. A saved dataset hashes its files; a hub id hashes its
    name and the commit ``revision`` resolves to (a new commit on the hub is a cache miss)."""
    h = hashlib.sha256()
    path = Path(resolve_source(source)).expanduser()
    files = source_files(source)
    if not files and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        h.update(f"hub:{source}@{_hub_commit(source, revision)}".encode())
        return h.hexdigest()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


Record = tuple[str, int | None, Any]  # (source name, line number, dict or RowError)


def iter_records(source: str, revision: str | None = None) -> Iterator[Record]:
    """Every raw record of a source with where it came from; unreadable ones as RowError."""
    path = Path(resolve_source(source)).expanduser()
    files = source_files(source)
    if files:
        for f in files:
            yield from _iter_file(f)
    elif path.is_dir():
        yield from _iter_hf_dataset(_load_from_disk(path), str(path))
    else:
        yield from _iter_hf_dataset(_load_from_hub(source, revision), source)


def _iter_file(f: Path) -> Iterator[Record]:
    suffix = f.suffix.lower()
    name = str(f)
    if suffix == ".jsonl":
        yield from _iter_jsonl(f)
    elif suffix == ".json":
        yield from _iter_json(f)
    elif suffix == ".csv":
        yield from _iter_csv(f)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(f)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is one bad record
            yield name, None, RowError(f"unreadable Parquet file: {exc}")
            return
        for i, row in enumerate(table.to_pylist(), start=1):
            yield name, i, row


def _iter_jsonl(f: Path) -> Iterator[Record]:
    name = str(f)
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                snippet = raw[:RAW_SNIPPET].decode("utf-8", errors="replace")
                yield name, lineno, RowError(f"invalid UTF-8 at byte {exc.start}", snippet)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield name, lineno, RowError(
                    f"malformed JSON: {exc.msg} at column {exc.colno}", text[:RAW_SNIPPET]
                )
                continue
            yield name, lineno, obj


def _iter_json(f: Path) -> Iterator[Record]:
    name = str(f)
    try:
        data = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        yield name, None, RowError(f"invalid UTF-8 at byte {exc.start}")
        return
    except json.JSONDecodeError as exc:
        yield name, exc.lineno, RowError(f"malformed JSON: {exc.msg} at column {exc.colno}")
        return
    if isinstance(data, dict):
        for key in ("data", "rows", "examples", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        yield name, None, RowError(f"expected a list of rows, got {type(data).__name__}")
        return
    for i, row in enumerate(data, start=1):
        yield name, i, row


def _iter_csv(f: Path) -> Iterator[Record]:
    name = str(f)
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield name, None, RowError(f"invalid UTF-8 at byte {exc.start}")
        return
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        # Line of the row's end in the file (header is line 1).
        lineno = reader.line_num
        if None in row:
            yield name, lineno, RowError("more fields than the header names")
            continue
        if "messages" in row and isinstance(row["messages"], str):
            try:
                row = {**row, "messages": json.loads(row["messages"])}
            except json.JSONDecodeError as exc:
                yield name, lineno, RowError(f"messages column is not JSON: {exc.msg}")
                continue
        yield name, lineno, row


def _load_from_disk(path: Path):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"data.source: {path}: not a readable saved dataset ({exc})") from None
    if isinstance(ds, DatasetDict):
        from datasets import concatenate_datasets

        ds = concatenate_datasets([ds[k] for k in sorted(ds)])
    return ds


def _load_from_hub(source: str, revision: str | None = None):
    """A Hugging Face hub dataset at the commit ``revision`` resolves to: needs a network
    (HF_HUB_OFFLINE=0) or a warm HF cache."""
    from datasets import load_dataset

    commit = _hub_commit(source, revision)
    try:
        return load_dataset(source, split="train", revision=commit)
    except Exception as exc:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only datasets already in the HF cache load)" if offline else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"data.source: {source}: cannot load hub dataset{hint}: {first}") from None


def _hub_commit(source: str, revision: str | None) -> str:
    """The commit a hub dataset's revision resolves to; DataError (one line) when it cannot."""
    from llmflow.hub import HubError, resolve_revision

    try:
        return resolve_revision(source, revision, "dataset", "data.source")
    except HubError as exc:
        raise DataError(str(exc)) from exc


def _iter_hf_dataset(ds, name: str) -> Iterator[Record]:
    for i, row in enumerate(ds, start=1):
        yield name, i, row


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
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(record["output"], "output")}]  # fmt: skip
        if record.get("system") not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            missing = "prompt" if "prompt" not in record else "completion"
            raise RowError(f"missing field '{missing}' (prompt/completion format)")
        messages = [{"role": "user", "content": _text(record["prompt"], "prompt")},
                    {"role": "assistant", "content": _text(record["completion"], "completion")}]  # fmt: skip
    else:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise RowError(
            "unknown format: expected 'messages', 'instruction'/'output' or "
            f"'prompt'/'completion' (fields: {keys})"
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
        norm_role = SPEAKERS.get(norm_role, norm_role) if field_name == "conversations" else norm_role
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


def _snippet(record: Any) -> str:
    if isinstance(record, RowError):
        return record.raw
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text[:RAW_SNIPPET] + ("..." if len(text) > RAW_SNIPPET else "")


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
) -> Prepared:
    """Normalise, clean, de-duplicate, bound and split records (pure: no I/O of its own).

    Args:
        records: (source, line, record) triples from iter_records().
        count_tokens: token counts of a batch of chats rendered with the model's tokenizer;
            None skips the token bound (n_tokens is then 0).

    Returns:
        Prepared splits (rows: id, messages, n_chars, n_tokens) and the quarantined rows.
    """
    out = Prepared()
    seen: set[str] = set()
    pending: list[tuple[str, int | None, Any, dict[str, Any]]] = []
    kept = 0

    def flush() -> None:
        nonlocal kept
        counts = count_tokens([p[3]["messages"] for p in pending]) if count_tokens else None
        for i, (source, line, record, row) in enumerate(pending):
            if counts is not None:
                row["n_tokens"] = counts[i]
                if counts[i] > max_tokens:
                    reason = f"too long: {counts[i]} tokens > data.max_tokens={max_tokens}"
                    out.quarantined.append(Quarantined(source, line, reason, _snippet(record)))
                    continue
            if max_rows is not None and kept >= max_rows:
                out.num_truncated_by_max_rows += 1
                continue
            kept += 1
            (out.eval if split_of(row["id"], eval_fraction) == "eval" else out.train).append(row)
        pending.clear()

    for source, line, record in records:
        out.num_input += 1
        try:
            if isinstance(record, RowError):
                raise record
            messages = normalise(record)
            n_chars = sum(len(m["content"]) for m in messages)
            if n_chars > max_chars:
                raise RowError(f"too long: {n_chars} characters > data.max_chars={max_chars}")
            if n_chars < MIN_CHARS:
                raise RowError(f"near-empty: {n_chars} characters")
        except RowError as exc:
            out.quarantined.append(Quarantined(source, line, str(exc), _snippet(record)))
            continue
        eid = example_id(messages)
        if eid in seen:
            out.num_duplicates += 1
            continue
        seen.add(eid)
        row = {"id": eid, "messages": messages, "n_chars": n_chars, "n_tokens": 0}
        pending.append((source, line, record, row))
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
