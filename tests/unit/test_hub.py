"""Hub revisions without the hub: the HF cache's refs are what offline resolution reads, so a
cache laid out here (as huggingface_hub writes it) stands for a download made earlier. A new
commit behind a branch changes the dataset's fingerprint (the prepare cache misses); what
the cache does not know is one line naming HF_HUB_OFFLINE."""

from __future__ import annotations

import pytest

A, B = "a" * 40, "b" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _ref(cache, kind: str, repo: str, name: str, commit: str) -> None:
    ref = cache / f"{kind}s--{repo.replace('/', '--')}" / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def test_a_new_commit_behind_a_branch_changes_the_fingerprint(hf_cache):
    from llmflow.prepare.sources import fingerprint_source

    _ref(hf_cache, "dataset", "org/chats", "main", A)
    before = fingerprint_source("org/chats")
    assert fingerprint_source("org/chats", "main") == before == fingerprint_source("org/chats", A)
    _ref(hf_cache, "dataset", "org/chats", "main", B)  # the branch moved on the hub
    assert fingerprint_source("org/chats") != before
    _ref(hf_cache, "dataset", "org/chats", "v1", A)
    assert fingerprint_source("org/chats", "v1") == before  # a tag pins the old commit


def test_an_unresolvable_revision_offline_is_one_line_naming_hf_hub_offline(hf_cache):
    from llmflow.prepare.sources import DataError, fingerprint_source

    with pytest.raises(DataError) as err:
        fingerprint_source("org/unknown", "v2")
    msg = str(err.value)
    assert (
        msg.startswith(
            "data.source: org/unknown@v2: cannot resolve the revision offline (HF_HUB_OFFLINE=1)"
        )
        and "\n" not in msg
    )


def test_a_hub_base_model_resolves_to_its_pinned_snapshot(hf_cache):
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.hub import HubError

    _ref(hf_cache, "model", "org/llm", "v1.0", A)
    snap = hf_cache / "models--org--llm" / "snapshots" / A
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    path = resolve_base_model(TrainConfig(base_model="org/llm", base_model_revision="v1.0"))
    assert path == str(snap) and path.endswith(A)  # the commit is in every key built on it
    with pytest.raises(HubError, match=r"^train.base_model: org/llm@main: cannot resolve"):
        resolve_base_model(TrainConfig(base_model="org/llm"))
