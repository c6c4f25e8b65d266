"""The scoring job's driver-side inputs without a cluster: the eval split read from the store
and turned into generation requests, the same as split_chat gives row by row."""

from __future__ import annotations

import pytest

from llmflow.evaluate.eval_split import chat_requests, read_eval_split, split_chat
from llmflow.prepare.dataset import parquet_bytes

ROWS = [
    {
        "id": "a",
        "messages": [
            {"role": "user", "content": "Reverse: 12"},
            {"role": "assistant", "content": "21"},
        ],
    },
    {
        "id": "b",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Reverse: 345"},
            {"role": "assistant", "content": "543"},
        ],
    },
    {"id": "c", "messages": [{"role": "user", "content": "no reply yet"}]},
]


@pytest.fixture
def dataset_dir(tmp_path):
    rows = [{**r, "n_chars": 0, "n_tokens": 0} for r in ROWS]
    (tmp_path / "eval.parquet").write_bytes(parquet_bytes(rows))
    return str(tmp_path)


def test_read_eval_split_keeps_the_columns_and_order_and_max_examples(dataset_dir):
    table = read_eval_split(dataset_dir)
    assert table.column_names == ["id", "messages"] and table.column("id").to_pylist() == [
        "a",
        "b",
        "c",
    ]
    assert read_eval_split(dataset_dir, max_examples=2).column("id").to_pylist() == ["a", "b"]


def test_chat_requests_are_split_chat_of_each_row(dataset_dir):
    requests = chat_requests(read_eval_split(dataset_dir)).to_pylist()
    assert requests == [split_chat(r) for r in ROWS]
    assert requests[1]["prompt_messages"][0] == {"role": "system", "content": "Be brief."}
    assert requests[1]["reference"] == "543" and requests[1]["question"] == "Reverse: 345"
    assert requests[2]["reference"] == "" and requests[2]["question"] == "no reply yet"
