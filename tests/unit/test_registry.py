"""The model registry: numbered versions, lineage manifests, atomic concurrent registration."""

from __future__ import annotations

import threading

import pytest

from llmflow.registry import (
    RegistryError,
    find_version,
    get_version,
    list_versions,
    read_manifest,
    register_version,
)
from llmflow.store import Store


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def test_versions_count_up_and_carry_their_lineage(tmp_path, model_dir):
    store = Store(tmp_path / "store")
    a = register_version(
        store,
        "m",
        model_dir,
        base_model="tiny",
        dataset_sha256="d" * 64,
        metrics={"loss": 1.0},
        lineage={"git_commit": "abc"},
    )
    b = register_version(store, "m", model_dir, base_model="tiny")
    assert (a.version, b.version) == ("v1", "v2")
    assert a.uri == store.uri("models", "m", "v1")
    assert (tmp_path / "store/models/m/v1/model.safetensors").read_bytes() == b"weights"
    assert [r.version for r in list_versions(store, "m")] == ["v1", "v2"]
    assert get_version(store, "m") == b and get_version(store, "m", "1") == a
    manifest = read_manifest(store, "m", "v1")
    assert manifest["git_commit"] == "abc" and manifest["ref"]["train_metrics"] == {"loss": 1.0}
    assert not [p for p in (tmp_path / "store/models/m").iterdir() if p.name.startswith(".tmp")]


def test_concurrent_registrations_never_share_a_version(tmp_path, model_dir):
    store = Store(tmp_path / "store")
    refs, errors = [], []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        try:
            refs.append(
                register_version(store, "m", model_dir, base_model="tiny", lineage={"i": i})
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = sorted(r.version for r in refs)
    assert len(set(versions)) == 8
    # each version's manifest is the one its writer wrote
    owners = {read_manifest(store, "m", r.version)["i"] for r in refs}
    assert owners == set(range(8))


def test_unknown_names_and_versions_are_clear_errors(tmp_path, model_dir):
    store = Store(tmp_path / "store")
    assert list_versions(store, "none") == []
    with pytest.raises(RegistryError, match="no versions"):
        get_version(store, "none")
    register_version(store, "m", model_dir, base_model="tiny")
    with pytest.raises(RegistryError, match="no version v7"):
        get_version(store, "m", "v7")
    with pytest.raises(RegistryError, match="model name"):
        register_version(store, "../evil", model_dir, base_model="tiny")


def test_find_version_matches_lineage_newest_first(tmp_path, model_dir):
    store = Store(tmp_path / "store")
    assert find_version(store, "m", checkpoint="c1") is None  # no versions at all
    register_version(
        store, "m", model_dir, base_model="tiny", lineage={"checkpoint": "c1", "format": "full"}
    )
    v2 = register_version(
        store, "m", model_dir, base_model="tiny", lineage={"checkpoint": "c1", "format": "full"}
    )
    v3 = register_version(
        store, "m", model_dir, base_model="tiny", lineage={"checkpoint": "c1", "format": "merged"}
    )
    assert find_version(store, "m", checkpoint="c1", format="full") == v2
    assert find_version(store, "m", checkpoint="c1", format="merged") == v3
    assert find_version(store, "m", checkpoint="c2", format="full") is None


def test_latest_if_same_data_compares_the_latest_versions_dataset_hash(tmp_path, model_dir):
    from llmflow.finetune.export import latest_if_same_data

    store = Store(tmp_path / "store")
    assert latest_if_same_data(store, "m", "a" * 64) == (None, False)
    register_version(store, "m", model_dir, base_model="tiny", dataset_sha256="a" * 64)
    v2 = register_version(store, "m", model_dir, base_model="tiny", dataset_sha256="b" * 64)
    assert latest_if_same_data(store, "m", "b" * 64) == (v2, True)
    assert latest_if_same_data(store, "m", "a" * 64) == (v2, False)  # only the latest counts


def test_annotations_add_eval_and_gate_sections_and_keep_the_rest(tmp_path, model_dir, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llmflow.registry import annotate

    store = Store(tmp_path / "store")
    ref = register_version(
        store, "m", model_dir, base_model="tiny", metrics={"train_loss_last": 0.5}
    )
    before = read_manifest(store, "m", ref.version)
    annotate(store, "m", ref.version, eval={"metrics": {"exact_match": 0.9375, "eval_loss": 0.125}})
    annotate(store, "m", ref.version, gate={"passed": True, "approved_by": "bob", "rules": []})
    after = read_manifest(store, "m", ref.version)
    assert after == {
        **before,
        "eval": {"metrics": {"exact_match": 0.9375, "eval_loss": 0.125}},
        "gate": {"passed": True, "approved_by": "bob", "rules": []},
    }
    assert not [
        p
        for p in (tmp_path / "store" / "models" / "m" / ref.version).iterdir()
        if p.name.startswith(".tmp")
    ]
    with pytest.raises(RegistryError):
        annotate(store, "m", "v9", eval={})
    llmflow = Path(sys.executable).parent / "llmflow"
    out = subprocess.run(
        [str(llmflow), "models", "list", "m"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMFLOW_STORE": str(tmp_path / "store")},
        timeout=120,
        check=False,
    ).stdout
    row = next(line for line in out.splitlines() if f" {ref.version} " in line)
    assert "exact_match=0.9375" in row and "eval_loss=0.125" in row and "passed (bob)" in row, out
