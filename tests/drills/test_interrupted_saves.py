"""Drill: a save killed halfway (SIGKILL, the process gets no chance to clean up) leaves no
half-written model version or dataset visible; the next save publishes a whole one.

The child process writes through the real registry and store code; a slowed copy (one file,
then a long pause) gives the drill a moment in which the save is half done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmflow import registry
from llmflow.store import Store

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import shutil, sys, time
    real_copyfile = shutil.copyfile
    def slow_copyfile(src, dst, *a, **k):  # one file, then the 'disk' stalls
        out = real_copyfile(src, dst, *a, **k)
        print("copied", src, flush=True)
        time.sleep(600)
        return out
    shutil.copyfile = slow_copyfile  # copy2 and copytree copy through it
    from llmflow.store import Store
    store = Store(sys.argv[1])
    if sys.argv[2] == "model":
        from llmflow import registry
        registry.register_version(store, "drill", sys.argv[3], base_model="tiny")
    else:
        with store.atomic_dir("datasets", "abc123") as d:
            for name in ("train.parquet", "eval.parquet", "manifest.json"):
                shutil.copy2(sys.argv[3] + "/" + name, d / name)
""")


def kill_when_half_done(*args: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()  # blocks until the first file is in the staging dir
        assert line.startswith("copied"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def source(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "train.parquet",
        "eval.parquet",
        "manifest.json",
    ):
        (d / name).write_bytes(os.urandom(1024))
    return d


def test_model_version_killed_halfway_is_never_visible(tmp_path, source):
    store = Store(tmp_path / "store")
    kill_when_half_done(str(tmp_path / "store"), "model", str(source))
    staged = [p for p in (tmp_path / "store/models/drill").iterdir()]
    assert staged and all(p.name.startswith(".tmp-") for p in staged), staged  # half done, hidden
    assert registry.list_versions(store, "drill") == []
    with pytest.raises(registry.RegistryError, match="no versions"):
        registry.get_version(store, "drill")
    ref = registry.register_version(store, "drill", source, base_model="tiny")  # the retry
    assert ref.version == "v1"
    assert sorted(p.name for p in Path(ref.uri).iterdir()) == sorted(
        ["config.json", "model.safetensors", "train.parquet", "eval.parquet", "manifest.json"]
    )


def test_dataset_killed_halfway_is_never_visible(tmp_path, source):
    store = Store(tmp_path / "store")
    kill_when_half_done(str(tmp_path / "store"), "dataset", str(source))
    assert not store.exists("datasets", "abc123")
    assert store.listdir("datasets") == []  # the staging dir is there, but hidden
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "store/datasets").iterdir())
    with store.atomic_dir("datasets", "abc123") as d:
        for name in ("train.parquet", "eval.parquet", "manifest.json"):
            (d / name).write_bytes((source / name).read_bytes())
    assert sorted(store.listdir("datasets", "abc123")) == [
        "eval.parquet",
        "manifest.json",
        "train.parquet",
    ]
