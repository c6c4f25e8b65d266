"""The artifact store: keys, atomic files and directories, local and object-store paths."""

from __future__ import annotations

import os

import pytest

from llmflow.errors import StoreError
from llmflow.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_json_round_trip(store):
    uri = store.write_json({"a": 1}, "datasets", "abc", "manifest.json")
    assert uri == os.path.join(store.root, "datasets/abc/manifest.json")
    assert store.read_json("datasets", "abc", "manifest.json") == {"a": 1}
    assert store.exists("datasets", "abc")
    assert store.rel(uri) == "datasets/abc/manifest.json"


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFLOW_STORE", str(tmp_path / "elsewhere"))
    assert Store().root == str(tmp_path / "elsewhere")


def test_missing_key_is_a_store_error(store):
    with pytest.raises(StoreError, match="not found in the store"):
        store.read_json("models", "nope", "manifest.json")


def test_corrupt_json_is_a_store_error(store):
    store.write_bytes(b"{not json", "x.json")
    with pytest.raises(StoreError, match="corrupt JSON"):
        store.read_json("x.json")


def test_rel_outside_root(store, tmp_path):
    with pytest.raises(StoreError, match="not inside the store"):
        store.rel(str(tmp_path / "other" / "f"))


def test_failed_write_leaves_old_file_and_no_temporary(store, monkeypatch):
    store.write_bytes(b"old", "f.bin")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.write_bytes(b"new", "f.bin")
    monkeypatch.undo()
    assert store.read_bytes("f.bin") == b"old"
    assert os.listdir(store.root) == ["f.bin"]


def test_atomic_dir_publishes_whole_directory(store):
    with store.atomic_dir("models", "m", "v1") as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "manifest.json").write_text("{}")
        # Nothing is visible while the directory is being written.
        assert store.listdir("models", "m") == []
    assert store.listdir("models", "m") == ["v1"]
    assert sorted(store.listdir("models", "m", "v1")) == ["manifest.json", "weights.bin"]


def test_atomic_dir_failure_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.atomic_dir("models", "m", "v2") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")
    assert not store.exists("models", "m", "v2")
    assert os.listdir(os.path.join(store.root, "models", "m")) == []


def test_atomic_dir_keeps_existing_unless_overwrite(store):
    with store.atomic_dir("datasets", "d") as tmp:
        (tmp / "a").write_text("first")
    with store.atomic_dir("datasets", "d") as tmp:
        (tmp / "a").write_text("second")
    assert store.read_bytes("datasets", "d", "a") == b"first"
    with store.atomic_dir("datasets", "d", overwrite=True) as tmp:
        (tmp / "a").write_text("third")
    assert store.read_bytes("datasets", "d", "a") == b"third"
    assert store.listdir("datasets") == ["d"]


def test_object_store_writes_manifest_last(monkeypatch):
    """On a store without rename (here fsspec's memory://), manifest.json marks completion."""
    store = Store("memory://llmflow-test-bucket/root")
    order: list[str] = []
    real_put = store.fs.put_file
    monkeypatch.setattr(
        store.fs, "put_file", lambda src, dst, **k: (order.append(dst), real_put(src, dst, **k))
    )
    with store.atomic_dir("models", "m", "v1") as tmp:
        (tmp / "manifest.json").write_text('{"v": 1}')
        (tmp / "a.safetensors").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert order[-1].endswith("v1/manifest.json") and len(order) == 3
    assert store.read_json("models", "m", "v1", "manifest.json") == {"v": 1}
    assert store.uri("models").startswith("memory://")
    assert store.listdir("models", "m", "v1") == ["a.safetensors", "manifest.json", "sub"]
