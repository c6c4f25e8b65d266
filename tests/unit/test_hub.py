"""Hub revisions without the hub: the HF cache's refs are what offline resolution reads, so a
cache laid out here (as huggingface_hub writes it) stands for a download made earlier. A new
commit behind a branch changes the dataset's fingerprint (the prepare cache misses); what
the cache does not know is one line naming HF_HUB_OFFLINE."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmflow.config import DataConfig

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
    before = fingerprint_source(DataConfig(source="org/chats"))
    assert (
        fingerprint_source(DataConfig(source="org/chats", revision="main"))
        == before
        == fingerprint_source(DataConfig(source="org/chats", revision=A))
    )
    _ref(hf_cache, "dataset", "org/chats", "main", B)  # the branch moved on the hub
    assert fingerprint_source(DataConfig(source="org/chats")) != before
    _ref(hf_cache, "dataset", "org/chats", "v1", A)
    assert (
        fingerprint_source(DataConfig(source="org/chats", revision="v1")) == before
    )  # a tag pins the old commit


def test_an_unresolvable_revision_offline_is_one_line_naming_hf_hub_offline(hf_cache):
    from llmflow.prepare.sources import DataError, fingerprint_source

    with pytest.raises(DataError) as err:
        fingerprint_source(DataConfig(source="org/unknown", revision="v2"))
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
    from llmflow.store import Store

    _ref(hf_cache, "model", "org/llm", "v1.0", A)
    snap = hf_cache / "models--org--llm" / "snapshots" / A
    snap.mkdir(parents=True)
    # As huggingface_hub lays it out: the snapshot's files are links to blobs.
    blob = hf_cache / "models--org--llm" / "blobs" / "c0ffee"
    blob.parent.mkdir()
    blob.write_text('{"model_type": "llama"}')
    (snap / "config.json").symlink_to(blob)
    path = resolve_base_model(TrainConfig(base_model="org/llm", base_model_revision="v1.0"))
    # In the store, which every node reads, not in this node's HF cache (issue 30); the
    # commit is in every key built on it.
    assert path == Store().uri("models", "_base", f"org--llm@{A}")
    copied = Path(Store().path("models", "_base", f"org--llm@{A}", "config.json"))
    assert not copied.is_symlink() and copied.read_text() == blob.read_text()
    blob.write_text("changed")  # the HF cache going away or changing does not touch it
    assert resolve_base_model(TrainConfig(base_model="org/llm", base_model_revision=A)) == path
    assert copied.read_text() == '{"model_type": "llama"}'
    with pytest.raises(HubError, match=r"^train.base_model: org/llm@main: cannot resolve"):
        resolve_base_model(TrainConfig(base_model="org/llm"))


def test_the_preflight_reads_a_hub_models_config_and_tokenizer_never_its_weights(
    hf_cache, tmp_path, monkeypatch
):
    """Checks before any work read config.json and the tokenizer (CONFIG_FILES): a snapshot
    in the cache that holds only those passes the causal-LM check, and nothing is copied to
    the store (the weights move when the stage runs)."""
    import fnmatch
    import shutil

    import huggingface_hub

    from llmflow.bundled import generate_examples
    from llmflow.config import TrainConfig
    from llmflow.finetune.checks import check_inputs
    from llmflow.store import Store
    from llmflow.tinymodel import build_tiny_model, example_texts

    tiny = build_tiny_model(tmp_path / "tiny", example_texts(generate_examples(50)), seed=0)
    _ref(hf_cache, "model", "org/small", "main", B)
    snap = hf_cache / "models--org--small" / "snapshots" / B
    snap.mkdir(parents=True)
    for f in tiny.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, snap / f.name)
    asked = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):  # the hub is the boundary: what would be downloaded
        asked.append(kwargs.get("allow_patterns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    check_inputs(TrainConfig(base_model="org/small"), None)
    assert asked and all(patterns for patterns in asked), asked  # never the whole repo
    assert not any(fnmatch.fnmatch("model.safetensors", p) for ps in asked for p in ps)
    assert not Store().exists("models", "_base", f"org--small@{B}")
