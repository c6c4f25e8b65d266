"""The eval split as the scoring job reads it: checked, read, cut into blocks, each chat split
into its prompt and its reference answer.
"""

from __future__ import annotations

import json
from typing import Any

from llmflow.errors import LlmflowError

EVAL_FILE = "eval.parquet"


REQUIRED_COLUMNS = ("id", "messages")


class EvalDataError(LlmflowError):
    """The eval split is missing, empty or not in the prepared format."""


def eval_split_uri(dataset_uri: str) -> str:
    return dataset_uri.rstrip("/") + "/" + EVAL_FILE


def check_eval_split(dataset_uri: str) -> int:
    """Rows of the dataset's eval split; EvalDataError when it is missing, empty or malformed.

    Reads only the Parquet footer, so it is cheap enough to run before any cluster work.
    """
    import fsspec
    import pyarrow.parquet as pq

    uri = eval_split_uri(dataset_uri)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise EvalDataError(f"{uri}: eval split not found (is {dataset_uri} a prepared dataset?)")
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            num_rows = pf.metadata.num_rows
    except Exception as exc:
        raise EvalDataError(f"{uri}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise EvalDataError(f"{uri}: eval split lacks column(s) {', '.join(missing)}")
    if num_rows == 0:
        raise EvalDataError(f"{uri}: eval split is empty (0 rows); nothing to score")
    return num_rows


def read_eval_split(dataset_uri: str, max_examples: int | None = None):
    """The eval split's ``id`` and ``messages`` (the first ``max_examples`` rows) as Arrow.

    The driver reads it itself, through fsspec like every store access: an eval split is
    small, and every row of it comes back to the driver anyway. ``ray.data.read_parquet``
    costs more than scoring on 2 cores: Ray 2.60 lists the files on a pool of 32
    FooterReader actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS; ray PR #65273), measured at
    13.5 s for one 5,000-row file, against 0.4 s here.
    """
    from llmflow.store import read_parquet

    table = read_parquet(eval_split_uri(dataset_uri), list(REQUIRED_COLUMNS))
    return table.slice(0, max_examples) if max_examples else table


def as_blocks(table, rows_per_block: int):
    """A Ray Dataset of ``table`` cut into blocks of ``rows_per_block`` rows, in order.

    One block per generate batch spreads the rows over every actor of a pool (a single
    block goes whole to one actor: measured, the second actor sat idle), and the first
    batches are done while the last still wait. ``from_blocks`` computes the blocks'
    metadata here; ``from_arrow`` runs one Ray task per block for it (3 to 4 s of 79 tasks
    before the job started, measured).
    """
    import ray

    step = max(1, rows_per_block)
    return ray.data.from_blocks([table.slice(i, step) for i in range(0, table.num_rows, step)])


def chat_requests(table, keep_messages: bool = False):
    """``split_chats`` over an eval split table: the generation requests, as Arrow.

    ``keep_messages`` also keeps each full chat (``messages``), for an engine that computes
    the teacher-forced loss in the same pass.
    """
    import pyarrow as pa

    batch = split_chats(
        {c: table.column(c).to_numpy(zero_copy_only=False) for c in REQUIRED_COLUMNS}
    )
    if keep_messages:
        batch["messages"] = table.column("messages").to_pylist()
    return pa.table({name: list(values) for name, values in batch.items()})


def read_manifest(uri: str) -> dict[str, Any]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri.rstrip("/") + "/manifest.json")
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def split_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A prepared row as a generation request: the chat before the last assistant reply
    (``prompt_messages``), that reply (``reference``) and the last user turn (``question``).
    """
    from llmflow.engines.hf import to_messages

    messages = to_messages(row["messages"])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    prompt = messages[:last] if last is not None else messages
    reference = messages[last]["content"] if last is not None else ""
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return {
        "id": str(row["id"]),
        "prompt_messages": prompt,
        "reference": reference,
        "question": question,
    }


def split_chats(batch: dict[str, Any]) -> dict[str, Any]:
    """``split_chat`` over a numpy batch: one Ray Data call per batch, not per row."""
    import numpy as np

    rows = [split_chat({"id": i, "messages": m}) for i, m in zip(batch["id"], batch["messages"])]
    prompts = np.empty(len(rows), dtype=object)
    prompts[:] = [r["prompt_messages"] for r in rows]
    return {
        "id": np.array([r["id"] for r in rows], dtype=object),
        "prompt_messages": prompts,
        "reference": np.array([r["reference"] for r in rows], dtype=object),
        "question": np.array([r["question"] for r in rows], dtype=object),
    }
