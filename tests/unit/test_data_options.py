"""The data options a user's own dataset needs (issue 33): data.split, data.subset,
data.eval_split and data.columns, on a saved DatasetDict, a folder of split files and a
hub-shaped dataset with subsets; no eval row is ever trained on, and duplicates are counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow.config import DataConfig
from llmflow.prepare import records as D
from llmflow.prepare import sources as S
from llmflow.prepare.sources import DataError, check_source


def _qa(i: int, topic: str = "math") -> dict:
    return {"question": f"What is {i} plus {i}?", "answer": f"{2 * i}", "topic": topic, "uid": i}


@pytest.fixture
def user_dict(tmp_path) -> Path:
    """The user's dataset of the issue: a saved DatasetDict (train/validation/test) with its
    own columns (question, answer, topic, uid); train repeats two test rows (a leak)."""
    from datasets import Dataset, DatasetDict

    train = [_qa(i) for i in range(60)] + [_qa(100), _qa(101)]
    DatasetDict(
        {
            "train": Dataset.from_list(train),
            "validation": Dataset.from_list([_qa(i) for i in range(200, 210)]),
            "test": Dataset.from_list([_qa(i) for i in range(100, 115)]),
        }
    ).save_to_disk(str(tmp_path / "user"))
    return tmp_path / "user"


def prepare(data: DataConfig) -> D.Prepared:
    return D.prepare_records(
        S.iter_records(data),
        eval_fraction=data.eval_fraction,
        max_chars=data.max_chars,
        max_tokens=data.max_tokens,
        eval_records=S.iter_records(data, data.eval_split) if data.eval_split else None,
        columns=data.columns,
    )


def _ids(rows) -> set[str]:
    return {r["id"] for r in rows}


def _prompts(rows) -> set[str]:
    return {r["messages"][0]["content"] for r in rows}


def test_a_saved_datasetdict_trains_on_its_train_split_and_evaluates_on_its_test_split(
    user_dict,
):
    data = DataConfig(
        source=str(user_dict),
        eval_split="test",
        columns={"prompt": "question", "response": "answer"},
    )
    check_source(data)
    out = prepare(data)
    assert not out.quarantined
    # The eval split is the test split, whole; training holds its train rows less the two
    # that repeat a test row; the validation split is never read.
    assert _prompts(out.eval) == {f"What is {i} plus {i}?" for i in range(100, 115)}
    assert _prompts(out.train) == {f"What is {i} plus {i}?" for i in range(60)}
    assert not _ids(out.train) & _ids(out.eval)
    assert out.num_duplicates == 2 and out.num_input == 15 + 62
    assert out.train[0]["messages"] == [
        {"role": "user", "content": "What is 0 plus 0?"},
        {"role": "assistant", "content": "0"},
    ]


def test_without_eval_split_the_eval_rows_are_drawn_from_the_train_split_only(user_dict):
    data = DataConfig(source=str(user_dict), columns={"prompt": "question", "completion": "answer"})
    out = prepare(data)
    rows = out.train + out.eval
    assert _prompts(rows) == {f"What is {i} plus {i}?" for i in [*range(60), 100, 101]}
    assert out.eval and out.num_input == 62  # the test and validation splits are not read


def test_another_split_and_a_system_column(user_dict):
    cols = {"prompt": "question", "completion": "answer", "system": "topic"}
    out = prepare(DataConfig(source=str(user_dict), split="validation", columns=cols))
    rows = out.train + out.eval
    assert len(rows) == 10 and rows[0]["messages"][0] == {"role": "system", "content": "math"}


def test_a_row_without_a_mapped_column_is_quarantined_naming_the_key(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(_qa(1)) + "\n" + json.dumps({"question": "only"}) + "\n")
    out = prepare(DataConfig(source=str(f), columns={"prompt": "question", "response": "answer"}))
    assert len(out.train + out.eval) == 1
    [q] = out.quarantined
    assert (q.line, q.reason) == (2, "missing column 'answer' (data.columns.response)")


def test_unmapped_columns_are_quarantined_with_the_hint_to_map_them(user_dict):
    out = prepare(DataConfig(source=str(user_dict)))
    assert out.quarantined and not out.train
    assert out.quarantined[0].source == f"{user_dict}[train]"
    assert "(fields: answer, question, topic, uid); name yours with data.columns" in (
        out.quarantined[0].reason
    )


def test_a_folder_of_split_files_reads_each_split_from_its_own_files(tmp_path):
    folder = tmp_path / "folder"
    (folder / "test").mkdir(parents=True)

    def rows(r: range) -> str:
        return "".join(json.dumps(_qa(i)) + "\n" for i in r)

    (folder / "train.jsonl").write_text(rows(range(30)))
    (folder / "test" / "part-0.jsonl").write_text(rows(range(100, 105)))
    (folder / "validation.jsonl").write_text(rows(range(200, 203)))
    cols = {"prompt": "question", "completion": "answer"}
    data = DataConfig(source=str(folder), split="train", eval_split="test", columns=cols)
    check_source(data)
    out = prepare(data)
    assert _prompts(out.eval) == {f"What is {i} plus {i}?" for i in range(100, 105)}
    assert len(out.train) == 30 and out.num_input == 35


def test_without_split_a_folder_trains_on_every_file_but_the_eval_splits(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, r in (("part-a", range(10)), ("part-b", range(10, 20)), ("test", range(50, 55))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(_qa(i)) + "\n" for i in r))
    cols = {"prompt": "question", "completion": "answer"}
    out = prepare(DataConfig(source=str(folder), eval_split="test", columns=cols))
    assert len(out.train) == 20 and len(out.eval) == 5
    assert out.num_duplicates == 0  # the test file is not read as training rows at all


def test_a_datasetdict_without_a_train_split_asks_for_data_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_sft": Dataset.from_list([_qa(1)])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(
        DataError,
        match=r"data.split: .*d has no split 'train' \(it has train_sft\); name the one to "
        r"train on with data.split",
    ):
        check_source(DataConfig(source=str(tmp_path / "d")))
    check_source(DataConfig(source=str(tmp_path / "d"), split="train_sft"))


def test_a_hub_dataset_is_read_by_subset_and_split(tmp_path, monkeypatch):
    """A hub-shaped dataset repository (two subsets declared in its README, each with train
    and test files), loaded by the datasets library as a hub id is: name=subset, split."""
    import datasets

    repo = tmp_path / "gsm-like"
    for subset, base in (("main", 0), ("socratic", 50)):
        (repo / subset).mkdir(parents=True)
        for split, r in (
            ("train", range(base, base + 20)),
            ("test", range(base + 100, base + 104)),
        ):
            text = "".join(json.dumps(_qa(i, subset)) + "\n" for i in r)
            (repo / subset / f"{split}.jsonl").write_text(text)
    configs = "".join(
        f"- config_name: {s}\n  data_files:\n"
        f"  - split: train\n    path: {s}/train.jsonl\n  - split: test\n    path: {s}/test.jsonl\n"
        for s in ("main", "socratic")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    calls = []
    real = datasets.load_dataset

    def from_the_mirror(path, **kwargs):  # the hub id resolves to the local repository
        calls.append((path, kwargs))
        return real(str(repo), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_the_mirror)
    monkeypatch.setattr(S, "_hub_commit", lambda source, revision: "c" * 40)
    cols = {"prompt": "question", "completion": "answer"}
    data = DataConfig(source="org/gsm-like", subset="socratic", eval_split="test", columns=cols)
    check_source(data)  # a hub id: nothing local to check
    out = prepare(data)
    assert _prompts(out.eval) == {f"What is {i} plus {i}?" for i in range(150, 154)}
    assert _prompts(out.train) == {f"What is {i} plus {i}?" for i in range(50, 70)}
    assert [(c[0], c[1]["name"], c[1]["split"]) for c in calls] == [
        ("org/gsm-like", "socratic", "test"),
        ("org/gsm-like", "socratic", "train"),
    ]
    assert {c[1]["revision"] for c in calls} == {"c" * 40}
    assert out.eval[0]["messages"][0]["content"].startswith("What is 150")
    # The subset is part of the source's fingerprint (the cache key).
    other = S.fingerprint_source(DataConfig(source="org/gsm-like", subset="main"))
    assert S.fingerprint_source(data) != other


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"split": "dev"},
            r"data.split: .*user has no split 'dev' \(it has train, validation, test\)",
        ),
        ({"eval_split": "dev"}, r"data.eval_split: .*user has no split 'dev'"),
        ({"subset": "main"}, r"data.subset: .*user: a local source has no subsets"),
        ({"eval_split": "train"}, r"data.eval_split: train is the training split too"),
    ],
)
def test_options_a_local_source_cannot_honour_fail_before_any_work(user_dict, kw, message):
    with pytest.raises(DataError, match=message):
        check_source(DataConfig(source=str(user_dict), **kw))


def test_a_split_of_one_file_or_a_missing_split_file_is_refused(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(_qa(1)) + "\n")
    with pytest.raises(DataError, match=r"data.split: .*rows.jsonl: one file has no splits"):
        check_source(DataConfig(source=str(f), split="train"))
    with pytest.raises(DataError, match=r"data.eval_split: .*: no file of the split 'test'"):
        check_source(DataConfig(source=str(tmp_path), eval_split="test"))


def test_every_option_is_in_the_prep_config_only_when_set():
    from llmflow.prepare.dataset import prep_config

    plain = prep_config(DataConfig(), "tiny")
    assert not {"split", "subset", "eval_split", "columns"} & set(plain)
    cols = {"prompt": "question"}
    full = DataConfig(split="a", subset="b", eval_split="c", columns=cols)
    assert prep_config(full, "tiny") == plain | {
        "split": "a",
        "subset": "b",
        "eval_split": "c",
        "columns": cols,
    }


def test_an_unknown_column_target_is_refused_naming_the_targets():
    from llmflow.configfile import load_config
    from llmflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.columns: .*answer_text: not a field llmflow"):
        load_config("configs/tiny.yaml", ["data.columns={answer_text: answer}"])


# -- data.truncation ---------------------------------------------------------------------------
def words(chats):
    """A counter for the tests: one token per word, one per turn's role marker."""
    return [sum(1 + len(m["content"].split()) for m in chat) for chat in chats]


def test_a_long_reply_is_cut_at_its_end_to_fit():
    chat = [
        {"role": "user", "content": "Count to forty."},
        {"role": "assistant", "content": " ".join(str(i) for i in range(1, 41))},
    ]
    cut = D.truncate_chat(chat, 20, words)
    assert cut[0] == chat[0] and words([cut])[0] <= 20
    # 1 + 3 tokens of the question, 1 + 15 of the reply's first 15 words.
    assert cut[1]["content"] == " ".join(str(i) for i in range(1, 16))


def test_a_long_prompt_loses_its_start_and_keeps_the_question_and_the_system_prompt():
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "old turn " * 10},
        {"role": "assistant", "content": "old reply"},
        {"role": "user", "content": "context " * 30 + "so what is two plus two?"},
        {"role": "assistant", "content": "four " * 30},
    ]
    cut = D.truncate_chat(chat, 40, words)
    assert words([cut])[0] <= 40
    assert [m["role"] for m in cut] == ["system", "user", "assistant"]  # older turns gone
    assert cut[0]["content"] == "Be brief."
    assert cut[1]["content"].endswith("so what is two plus two?")
    assert words([cut[:2]])[0] <= 20 and cut[2]["content"].startswith("four four")


def test_truncation_counts_the_rows_it_cut_and_quarantines_by_default(tmp_path):
    f = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "a " * (5 if i % 2 else 50)} for i in range(10)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {"eval_fraction": 0.2, "max_chars": 8000, "max_tokens": 20, "count_tokens": words}

    def records():
        return S.iter_records(DataConfig(source=str(f)))

    quarantined = D.prepare_records(records(), **args)
    assert len(quarantined.quarantined) == 5 and quarantined.num_truncated == 0
    assert quarantined.quarantined[0].reason == "too long: 53 tokens > data.max_tokens=20"
    cut = D.prepare_records(records(), truncate=True, **args)
    assert not cut.quarantined and cut.num_truncated == 5
    rows = cut.train + cut.eval
    assert len(rows) == 10 and max(r["n_tokens"] for r in rows) == 20
    from llmflow.prepare.dataset import prep_config

    assert prep_config(DataConfig(truncation="truncate"), "t")["truncation"] == "truncate"
