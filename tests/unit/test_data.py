"""Loading and normalising instruction data: every format, and every kind of bad input."""

from __future__ import annotations

import json
import unicodedata

import pytest

from llmflow.config import DataConfig
from llmflow.prepare import records as D
from llmflow.prepare import sources as S


def prep(source, **kw):
    args = {"eval_fraction": 0.2, "max_chars": 8000, "max_tokens": 512} | kw
    return D.prepare_records(S.iter_records(DataConfig(source=str(source))), **args)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = {
    "messages": [
        {"role": "user", "content": "Reverse: 123"},
        {"role": "assistant", "content": "321"},
    ]
}


def test_three_formats_normalise_to_one_schema(tmp_path):
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            CHAT,
            {"instruction": "Reverse", "input": "456", "output": "654"},
            {"prompt": "Reverse: 789", "completion": "987"},
            {
                "conversations": [
                    {"from": "human", "value": "Reverse: 12"},
                    {"from": "gpt", "value": "21"},
                ]
            },
        ],
    )
    out = prep(f)
    rows = sorted(out.train + out.eval, key=lambda r: r["messages"][0]["content"])
    assert out.quarantined == [] and out.num_input == 4
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": "Reverse\n\n456"}, {"role": "assistant", "content": "654"}],
        [{"role": "user", "content": "Reverse: 12"}, {"role": "assistant", "content": "21"}],
        [{"role": "user", "content": "Reverse: 123"}, {"role": "assistant", "content": "321"}],
        [{"role": "user", "content": "Reverse: 789"}, {"role": "assistant", "content": "987"}],
    ]
    assert all(len(r["id"]) == 16 and r["n_chars"] > 0 for r in rows)


def test_csv_json_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.csv").write_text('prompt,completion\n"Say hi","hi"\n"Say yo","yo"\n')
    (folder / "b.json").write_text(json.dumps([CHAT]))
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "Say ok", "output": "ok"}]), folder / "c.parquet"
    )
    (folder / "notes.txt").write_text("ignored")
    out = prep(folder)
    assert out.num_input == 4 and not out.quarantined
    assert len(out.train) + len(out.eval) == 4
    assert S.source_files(str(folder)) == sorted(
        folder / n for n in ("a.csv", "b.json", "c.parquet")
    )


def test_csv_messages_column_is_json(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text('messages\n"' + json.dumps(CHAT["messages"]).replace('"', '""') + '"\nnot json\n')
    out = prep(f)
    assert len(out.train) + len(out.eval) == 1
    assert [q.reason for q in out.quarantined] == ["messages column is not JSON: Expecting value"]
    assert out.quarantined[0].line == 3


def test_saved_to_disk_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {
            "train": Dataset.from_list([{"prompt": "a b", "completion": "b a"}]),
            "test": Dataset.from_list([{"prompt": "c d", "completion": "d c"}]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    out = prep(tmp_path / "saved")
    # Its train split only: a DatasetDict is read by split, never concatenated (issue 33).
    assert out.num_input == 1 and len(out.train) + len(out.eval) == 1
    assert S.source_files(str(tmp_path / "saved")) == []


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        S.DataError,
        match=r"^data.source: someone/no-such-dataset@main: cannot resolve "
        r"the revision offline \(HF_HUB_OFFLINE=1\)",
    ):
        list(S.iter_records(DataConfig(source="someone/no-such-dataset")))


def test_bad_rows_are_quarantined_with_line_and_reason(tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(CHAT).encode(),  # 1 good
        b'{"prompt": "x"',  # 2 malformed JSON
        json.dumps({"prompt": 5, "completion": "a"}).encode(),  # 3 wrong type
        json.dumps({"prompt": "only a prompt"}).encode(),  # 4 missing field
        json.dumps({"instruction": "   ", "output": "x"}).encode(),  # 5 empty string
        json.dumps(
            {
                "messages": [
                    {"role": "wizard", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ).encode(),  # 6 role
        b'{"prompt": "\xff\xfe", "completion": "x"}',  # 7 invalid UTF-8
        json.dumps({"prompt": "x" * 10_000_000, "completion": "y"}).encode(),  # 8 10 MB row
        json.dumps([1, 2]).encode(),  # 9 not an object
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),  # 10 no answer
        json.dumps({"text": "free text"}).encode(),  # 11 unknown format
        b"",  # 12 blank: skipped
        json.dumps({"messages": "hello"}).encode(),  # 13 not a list
        json.dumps(
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}
        ).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    out = prep(f, max_chars=1000)
    reasons = {q.line: q.reason for q in out.quarantined}
    assert reasons == {
        2: "malformed JSON: Expecting ',' delimiter at column 15",
        3: "prompt is int, expected a string",
        4: "missing field 'completion' (prompt/completion format)",
        5: "instruction is empty",
        6: "messages[0] has unknown role 'wizard'",
        7: "invalid UTF-8 at byte 12",
        8: "too long: 10000001 characters > data.max_chars=1000",
        9: "row is list, expected an object",
        10: "last message is from 'user', expected 'assistant'",
        11: "unknown format: expected 'messages', 'conversations', 'instruction'/'output' or "
        "'prompt'/'completion' (fields: text); name yours with data.columns, e.g. "
        "{prompt: question, completion: answer}",
        13: "'messages' must be a non-empty list",
        14: "messages[0] has no content",
    }
    assert out.num_input == 13 and len(out.train) + len(out.eval) == 1
    assert all(q.source == str(f) for q in out.quarantined)
    # The quarantine keeps a bounded snippet of each row, never the 10 MB row itself.
    assert max(len(q.raw) for q in out.quarantined) <= S.RAW_SNIPPET + 3
    assert next(q for q in out.quarantined if q.line == 2).raw == '{"prompt": "x"'


def test_empty_file_reads_zero_rows(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    out = prep(f)
    assert out.num_input == 0 and out.train == [] and out.eval == [] and out.quarantined == []


def test_malformed_json_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('[{"prompt": "a", "completion": "b"},\n  {oops}]')
    out = prep(f)
    assert [(q.line, q.reason) for q in out.quarantined] == [
        (2, "malformed JSON: Expecting property name enclosed in double quotes at column 4")
    ]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing-dir/"])
def test_missing_path_is_a_clear_error(tmp_path, name):
    with pytest.raises(S.DataError, match=r"data.source: .*: no such file or directory"):
        S.source_files(str(tmp_path / name))


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "data.xlsx"
    f.write_bytes(b"x")
    with pytest.raises(S.DataError, match="unsupported file type '.xlsx'"):
        S.source_files(str(f))


def test_cleaning_nfc_whitespace_and_duplicates(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café")
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": f"  Order a {decomposed}  \r\n\r\n\r\n\r\nplease ", "completion": "ok"},
            {"prompt": "Order a café\n\nplease", "completion": "ok"},  # the same after cleaning
            {"prompt": "a", "completion": ""},  # empty answer
        ],
    )
    out = prep(f)
    rows = out.train + out.eval
    assert len(rows) == 1 and out.num_duplicates == 1
    assert rows[0]["messages"][0]["content"] == "Order a café\n\nplease"
    assert [q.reason for q in out.quarantined] == ["completion is empty"]


def test_token_limit_uses_the_counter(tmp_path):
    f = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "a " * n, "completion": "b"} for n in (1, 5, 50)]
    )
    out = prep(
        f,
        max_tokens=20,
        count_tokens=lambda chats: [sum(len(x["content"].split()) for x in m) for m in chats],
    )
    assert sorted(r["n_tokens"] for r in out.train + out.eval) == [2, 6]
    assert [q.reason for q in out.quarantined] == ["too long: 51 tokens > data.max_tokens=20"]


def test_split_is_stable_when_rows_are_added(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(400)]
    first = prep(write_jsonl(tmp_path / "a.jsonl", rows))
    more = prep(
        write_jsonl(
            tmp_path / "b.jsonl",
            rows + [{"prompt": f"n{i}", "completion": "x"} for i in range(100)],
        )
    )
    first_eval = {r["id"] for r in first.eval}
    assert first_eval == {r["id"] for r in more.eval} & {r["id"] for r in first.train + first.eval}
    assert 0.1 < len(first.eval) / 400 < 0.3  # eval_fraction 0.2
    assert not first_eval & {r["id"] for r in first.train}


def test_max_rows(tmp_path):
    f = write_jsonl(
        tmp_path / "m.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(50)]
    )
    out = prep(f, max_rows=10)
    assert len(out.train) + len(out.eval) == 10 and out.num_truncated_by_max_rows == 40


def test_dataset_sha_depends_on_rows_and_config(tmp_path):
    f = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(20)]
    )
    a, b = prep(f), prep(f)
    assert D.dataset_sha256(a, {"x": 1}) == D.dataset_sha256(b, {"x": 1})
    assert D.dataset_sha256(a, {"x": 1}) != D.dataset_sha256(a, {"x": 2})
    c = prep(
        write_jsonl(
            tmp_path / "s2.jsonl", [{"prompt": f"q{i}", "completion": "b"} for i in range(20)]
        )
    )
    assert D.dataset_sha256(a, {"x": 1}) != D.dataset_sha256(c, {"x": 1})


def test_fingerprint_follows_bytes(tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", [CHAT])
    first = S.fingerprint_source(DataConfig(source=str(f)))
    assert first == S.fingerprint_source(DataConfig(source=str(f)))
    f.write_text(f.read_text() + json.dumps(CHAT) + "\n")
    assert S.fingerprint_source(DataConfig(source=str(f))) != first
    assert S.fingerprint_source(DataConfig(source="bundled")) == S.fingerprint_source(
        DataConfig(source=S.resolve_source("bundled"))
    )
