"""Reading instruction data: local files (jsonl, json, csv, parquet), a saved Hugging Face
dataset, a hub id, or the bundled task. Each record comes with its source name and line, so a
bad row can be quarantined where it was found.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmflow.config import DataConfig
from llmflow.errors import LlmflowError

ROLES = ("system", "user", "assistant")


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# How much of a bad row the quarantine file keeps: enough to find it, not a 10 MB copy.
RAW_SNIPPET = 300


class DataError(LlmflowError):
    """The data source as a whole cannot be read (missing path, unreadable dataset)."""


class RowError(ValueError):
    """One row is bad; its message is the quarantine reason, ``raw`` what could be read."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.raw = raw


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
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
        )
        if not files:
            raise DataError(f"data.source: {path}: folder has no {'/'.join(FILE_SUFFIXES)} files")
        return files
    if _looks_like_hub_id(source):
        return []
    raise DataError(f"data.source: {path}: no such file or directory")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)) and not source.startswith(".")


def split_files(files: list[Path], root: Path, split: str) -> list[Path]:
    """The files of a folder that hold ``split``, as the datasets library names them: under a
    folder of that name (train/...), or named after it (train.jsonl, train-00000.parquet)."""
    pattern = re.compile(rf"{re.escape(split)}([-_.].*)?", re.IGNORECASE)
    return [
        f
        for f in files
        if f.relative_to(root).parts[0].lower() == split.lower() or pattern.fullmatch(f.stem)
    ]


def saved_splits(path: Path) -> list[str] | None:
    """The splits a saved DatasetDict lists (its dataset_dict.json); None for one Dataset."""
    index = path / "dataset_dict.json"
    return list(json.loads(index.read_text())["splits"]) if index.is_file() else None


def check_source(data: DataConfig) -> list[Path]:
    """``source_files`` plus what can be checked of data.split, eval_split and subset before
    any cluster work: a local source's splits exist, and a subset is asked of a hub id only.

    Raises:
        DataError: one line naming the key, the source and what it holds.
    """
    files = source_files(data.source)
    path = Path(resolve_source(data.source)).expanduser()
    local = path.exists()
    if data.subset and local:
        raise DataError(f"data.subset: {path}: a local source has no subsets (a hub id has)")
    if data.eval_split and data.eval_split == (data.split or "train"):
        raise DataError(f"data.eval_split: {data.eval_split} is the training split too")
    trained = data.split
    if local and not files and data.split is None and saved_splits(path) is not None:
        trained = "train"  # a DatasetDict's default: it must have one
    for key, split in (("split", trained), ("eval_split", data.eval_split)):
        if split is None or not local:
            continue
        if files:
            if path.is_file():
                raise DataError(f"data.{key}: {path}: one file has no splits (a folder has)")
            if not split_files(files, path, split):
                raise DataError(f"data.{key}: {path}: no file of the split '{split}'")
            continue
        splits = saved_splits(path)
        if splits is None:
            raise DataError(f"data.{key}: {path}: a saved Dataset is one split, not a DatasetDict")
        if split not in splits:
            raise DataError(
                f"data.{key}: {path} has no split '{split}' (it has {', '.join(splits)})"
                + ("; name the one to train on with data.split" if split != data.split else "")
            )
    return files


def fingerprint_source(data: DataConfig) -> str:
    """sha256 of the source's bytes (its files, in order): the key that decides a re-run is a
    cache hit without re-reading rows. A saved dataset hashes its files; a hub id hashes its
    name, subset and the commit ``data.revision`` resolves to (a new commit on the hub is a
    cache miss). The split options are part of the prep config (records.dataset_sha256)."""
    source = data.source
    h = hashlib.sha256()
    path = Path(resolve_source(source)).expanduser()
    files = source_files(source)
    if not files and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        subset = f"/{data.subset}" if data.subset else ""
        h.update(f"hub:{source}{subset}@{_hub_commit(source, data.revision)}".encode())
        return h.hexdigest()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


Record = tuple[str, int | None, Any]  # (source name, line number, dict or RowError)


def iter_records(data: DataConfig, split: str | None = None) -> Iterator[Record]:
    """Every raw record of ``data.source``'s ``split`` (default: data.split) with where it came
    from; unreadable ones as RowError. A hub dataset or saved DatasetDict is read one split at
    a time (train unless said), never concatenated; a folder's files are all read unless a
    split picks some (split_files)."""
    training = split is None
    source, split = data.source, split or data.split
    path = Path(resolve_source(source)).expanduser()
    files = source_files(source)
    if files and path.is_dir() and split:
        files = split_files(files, path, split)
    elif files and path.is_dir() and training and data.eval_split:  # the rest of the folder
        held = set(split_files(files, path, data.eval_split))
        files = [f for f in files if f not in held]
    if files:
        for f in files:
            yield from _iter_file(f)
    elif path.is_dir():
        name = f"{path}[{split or 'train'}]" if saved_splits(path) is not None else str(path)
        yield from _iter_hf_dataset(_load_from_disk(path, split), name)
    else:
        ds = _load_from_hub(source, data.revision, data.subset, split)
        where = f"{source}{'/' + data.subset if data.subset else ''}[{split or 'train'}]"
        yield from _iter_hf_dataset(ds, where)


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
                yield (
                    name,
                    lineno,
                    RowError(
                        f"malformed JSON: {exc.msg} at column {exc.colno}", text[:RAW_SNIPPET]
                    ),
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


def _load_from_disk(path: Path, split: str | None = None):
    """A saved Dataset, or one split of a saved DatasetDict (train unless ``split`` says):
    its other splits are never read, so a test split cannot leak into training."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"data.source: {path}: not a readable saved dataset ({exc})") from exc
    if isinstance(ds, DatasetDict):
        want = split or "train"
        if want not in ds:
            key = "data.split" if split else "data.source"
            raise DataError(
                f"{key}: {path} has no split '{want}' (it has {', '.join(sorted(ds))}): "
                "name the one to train on with data.split"
            )
        return ds[want]
    if split:
        raise DataError(f"data.split: {path}: a saved Dataset is one split, not a DatasetDict")
    return ds


def _load_from_hub(
    source: str, revision: str | None = None, subset: str | None = None, split: str | None = None
):
    """One split (train unless said) of a Hugging Face hub dataset's ``subset`` at the commit
    ``revision`` resolves to: needs a network (HF_HUB_OFFLINE=0) or a warm HF cache."""
    from datasets import load_dataset

    commit = _hub_commit(source, revision)
    try:
        return load_dataset(source, name=subset, split=split or "train", revision=commit)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only datasets already in the HF cache load)" if offline else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"data.source: {source}: cannot load hub dataset{hint}: {first}") from exc


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


def snippet(record: Any) -> str:
    if isinstance(record, RowError):
        return record.raw
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text[:RAW_SNIPPET] + ("..." if len(text) > RAW_SNIPPET else "")
