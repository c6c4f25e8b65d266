"""The store and the registry on a real S3 API: moto's server in a subprocess on 127.0.0.1,
reached through s3fs as a cluster reaches its bucket. The store is named by LLMFLOW_STORE (or
a root) alone; the endpoint and keys come from the standard AWS variables (AWS_ENDPOINT_URL_S3
for an S3-compatible store), as docs/cluster.md says.

Needs no Ray or Prefect server. Most of its time is building the tiny model into the bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from llmflow.errors import StoreError
from llmflow.store import Store

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow

BUCKET = "llmflow-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_fsspec_caches() -> None:
    import s3fs

    # S3FileSystem instances are cached per set of kwargs; the endpoint comes from the
    # environment, so an instance from before this module would point elsewhere.
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server in a subprocess on a free loopback port, with one bucket; the process
    environment is pointed at it (fake credentials) for the module and restored after."""
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()}") from None
            time.sleep(0.1)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,  # botocore, aiobotocore (s3fs) and pyarrow honour it
    }
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        _clear_fsspec_caches()
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield url
        finally:
            _clear_fsspec_caches()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def root(s3_endpoint) -> str:
    """A fresh prefix of the bucket for each test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/store"


@pytest.fixture
def store(root) -> Store:
    return Store(root)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(os.urandom(2048))
    (d / "sub" / "tokenizer.json").write_text('{"t": 1}')
    return d


def _objects(prefix: str) -> list[str]:
    import boto3

    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# -- the store -------------------------------------------------------------------------------
def test_store_root_comes_from_llmflow_store_and_the_endpoint_from_the_environment(
    root, monkeypatch
):
    monkeypatch.setenv("LLMFLOW_STORE", root)
    store = Store()
    assert store.root == root and not store.local
    uri = store.write_json({"a": 1}, "datasets", "abc", "manifest.json")
    assert uri == f"{root}/datasets/abc/manifest.json"
    assert store.rel(uri) == "datasets/abc/manifest.json"
    # The object really is in the bucket behind the endpoint (read with boto3, not s3fs).
    prefix = root.removeprefix(f"s3://{BUCKET}/")
    assert _objects(prefix) == [f"{prefix}/datasets/abc/manifest.json"]


def test_explicit_storage_options_reach_s3fs(root, s3_endpoint, monkeypatch):
    """Store(root, **storage_options): the programmatic way, here without the variable."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    store = Store(root, endpoint_url=s3_endpoint, skip_instance_cache=True)
    store.write_bytes(b"x", "f.bin")
    assert store.read_bytes("f.bin") == b"x"


def test_files_json_and_errors(store):
    store.write_bytes(b"old", "a", "f.bin")
    store.write_bytes(b"new", "a", "f.bin")  # one PUT replaces it whole
    assert store.read_bytes("a", "f.bin") == b"new"
    store.write_json({"k": [1, 2]}, "a", "b.json")
    assert store.read_json("a", "b.json") == {"k": [1, 2]}
    assert store.exists("a") and store.exists("a", "b.json") and not store.exists("zz")
    assert store.listdir("a") == ["b.json", "f.bin"] and store.listdir("nope") == []
    with pytest.raises(StoreError, match="not found in the store"):
        store.read_bytes("a", "missing.bin")
    store.write_bytes(b"{not json", "a", "bad.json")
    with pytest.raises(StoreError, match="corrupt JSON"):
        store.read_json("a", "bad.json")
    with pytest.raises(StoreError, match="not inside the store"):
        store.rel(f"s3://{BUCKET}/elsewhere/x")


def test_listdir_hides_temporaries(store):
    store.write_bytes(b"x", "d", "real.bin")
    store.write_bytes(b"x", "d", ".tmp-0123abcd")
    assert store.listdir("d") == ["real.bin"]


def test_atomic_dir_uploads_the_manifest_last_and_nothing_while_building(store):
    order: list[str] = []
    real_put = store.fs.put_file

    def put_file(src, dst, **kw):
        order.append(dst)
        return real_put(src, dst, **kw)

    store.fs.put_file = put_file  # this instance only (the test's own Store)
    try:
        with store.atomic_dir("datasets", "d1") as tmp:
            (tmp / "manifest.json").write_text('{"v": 1}')
            (tmp / "train.parquet").write_bytes(b"p" * 1000)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.txt").write_text("x")
            assert not store.exists("datasets", "d1")  # staged locally, nothing uploaded yet
    finally:
        del store.fs.put_file
    assert len(order) == 3 and order[-1].endswith("d1/manifest.json")
    assert store.listdir("datasets", "d1") == ["manifest.json", "sub", "train.parquet"]
    assert store.read_json("datasets", "d1", "manifest.json") == {"v": 1}
    # A second publish of a content-addressed key keeps the first; overwrite replaces it.
    with store.atomic_dir("datasets", "d1") as tmp:
        (tmp / "manifest.json").write_text('{"v": 2}')
    assert store.read_json("datasets", "d1", "manifest.json") == {"v": 1}
    with store.atomic_dir("datasets", "d1", overwrite=True) as tmp:
        (tmp / "manifest.json").write_text('{"v": 3}')
    assert store.read_json("datasets", "d1", "manifest.json") == {"v": 3}


def test_atomic_dir_failure_uploads_nothing(store):
    with pytest.raises(RuntimeError), store.atomic_dir("datasets", "d2") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")
    assert not store.exists("datasets", "d2") and store.listdir("datasets") == []


def test_download_dir_copies_a_tree(store, model_dir, tmp_path):
    with store.atomic_dir("models", "m", "v1") as tmp:
        for f in model_dir.rglob("*"):
            if f.is_file():
                dest = tmp / f.relative_to(model_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
    out = store.download_dir(store.uri("models", "m", "v1"), tmp_path / "copy")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    want = {
        p.relative_to(model_dir).as_posix(): p.read_bytes()
        for p in model_dir.rglob("*")
        if p.is_file()
    }
    assert got == want


def test_a_second_process_sees_new_keys_at_once(root):
    """Two Store objects on separate S3FileSystem instances stand for two processes (a flow
    driver and a Ray worker): what one writes the other lists and reads right away, even
    after it listed the same directory before (s3fs caches listings by default)."""
    import s3fs

    a = Store(root)
    b = Store(root)
    b.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    a.write_bytes(b"1", "models", "m", "v1", "manifest.json")
    assert a.listdir("models", "m") == ["v1"]  # a lists: this is what it might cache
    assert not a.exists("models", "m", "aliases.json")
    b.write_bytes(b"2", "models", "m", "v2", "manifest.json")
    b.write_json({"champion": "v2"}, "models", "m", "aliases.json")
    assert a.listdir("models", "m") == ["aliases.json", "v1", "v2"]
    assert a.exists("models", "m", "aliases.json")
    assert a.read_json("models", "m", "aliases.json") == {"champion": "v2"}


# -- the registry ----------------------------------------------------------------------------
def test_registry_versions_lineage_and_lookup(store, model_dir):
    from llmflow.registry import (
        find_version,
        get_version,
        list_versions,
        read_manifest,
        register_version,
    )

    a = register_version(
        store,
        "m",
        model_dir,
        base_model="tiny",
        dataset_sha256="d" * 64,
        metrics={"loss": 1.0},
        lineage={"checkpoint": "c1"},
    )
    b = register_version(store, "m", model_dir, base_model="tiny", lineage={"checkpoint": "c2"})
    assert (a.version, b.version) == ("v1", "v2")
    assert a.uri == f"{store.root}/models/m/v1"
    assert [r.version for r in list_versions(store, "m")] == ["v1", "v2"]
    assert get_version(store, "m") == b and get_version(store, "m", "1") == a
    assert find_version(store, "m", checkpoint="c1") == a
    assert find_version(store, "m", checkpoint="c9") is None
    assert read_manifest(store, "m", "v1")["ref"]["train_metrics"] == {"loss": 1.0}
    assert (
        store.read_bytes("models", "m", "v2", "model.safetensors")
        == (model_dir / "model.safetensors").read_bytes()
    )
    assert store.read_json("models", "m", "v2", "sub", "tokenizer.json") == {"t": 1}
    assert store.listdir("models", "m", "v1") == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "sub",
    ]


def test_concurrent_registrations_get_distinct_versions(store, model_dir):
    from llmflow.registry import list_versions, read_manifest, register_version

    n = 5
    refs, errors = [], []
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        # Each thread on its own S3FileSystem, as separate processes would be.
        own = Store(store.root, skip_instance_cache=True)
        barrier.wait()
        try:
            refs.append(register_version(own, "m", model_dir, base_model="tiny", lineage={"i": i}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    versions = [r.version for r in refs]
    assert len(set(versions)) == n, versions
    assert {read_manifest(store, "m", v)["i"] for v in versions} == set(range(n))
    assert sorted(r.version for r in list_versions(store, "m")) == sorted(versions)


def test_a_half_uploaded_version_is_invisible(store, model_dir):
    """A registration that died mid-upload (files up, no manifest) is no version: the latest
    is the newest complete one, and the next registration takes a fresh number."""
    from llmflow.registry import get_version, list_versions, register_version

    v1 = register_version(store, "m", model_dir, base_model="tiny")
    store.write_bytes(b"partial", "models", "m", "v2", "model.safetensors")  # died here
    assert [r.version for r in list_versions(store, "m")] == ["v1"]
    assert get_version(store, "m") == v1
    v3 = register_version(store, "m", model_dir, base_model="tiny")
    assert v3.version == "v3" and get_version(store, "m") == v3


def test_model_dir_of_a_version_loads_from_the_bucket(store, model_dir):
    """What a Ray worker or Serve replica does with a ModelRef's s3:// URI."""
    from llmflow.engines import local_model_dir
    from llmflow.registry import register_version

    ref = register_version(store, "m", model_dir, base_model="tiny")
    local = Path(local_model_dir(ref.uri))
    assert (local / "model.safetensors").read_bytes() == (
        model_dir / "model.safetensors"
    ).read_bytes()
    assert (local / "sub" / "tokenizer.json").is_file()


# -- stages on the bucket --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_store(s3_endpoint) -> tuple[Store, str]:
    """A store in the bucket holding the tiny base model (built straight into it, as
    `train.base_model: tiny` does on a cluster), and the model's s3:// URI."""
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    store = Store(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/store")
    base = resolve_base_model(TrainConfig(), store)
    assert base.startswith(store.root + "/models/_base/tiny-")
    return store, base


def test_prepare_a_dataset_into_the_bucket_and_read_it_back(tiny_store):
    import pyarrow.parquet as pq

    from llmflow.config import DataConfig
    from llmflow.prepare.dataset import prepare_to_store
    from llmflow.refs import DatasetRef

    store, base = tiny_store  # the tokenizer is read from the bucket
    data = DataConfig(max_rows=200)
    ref, report, run_uri = prepare_to_store(data, base, store, run_id="run-s3")
    assert report.success and ref is not None
    assert (
        ref.uri.startswith(f"{store.root}/datasets/")
        and run_uri == f"{store.root}/runs/run-s3/prepare"
    )
    key = store.rel(ref.uri)
    assert store.listdir(key) == [
        "eval.parquet",
        "manifest.json",
        "quarantine.jsonl",
        "train.parquet",
        "validation.json",
    ]
    assert DatasetRef.model_validate(store.read_json(key, "manifest.json")["ref"]) == ref
    with store.fs.open(store.path(key, "train.parquet"), "rb") as f:
        train = pq.read_table(f)
    assert train.num_rows == ref.num_train and ref.num_train + ref.num_eval <= 200
    assert set(train.column_names) >= {"id", "messages"}
    # The same input again is the same content address: the dataset is reused, not rewritten.
    again, _, _ = prepare_to_store(data, base, store, run_id="run-s3-2")
    assert again == ref


def test_a_serve_replica_loads_its_model_from_the_bucket(tiny_store):
    """The hf Serve app gets a version's s3:// URI as model_path (llmflow/promote/rollout.py app_args)."""
    from deployments.openai_app import OpenAIServer

    _, base = tiny_store
    server_cls = OpenAIServer.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
    server = server_cls.__new__(server_cls)
    server_cls.__init__(server, model_path=base, model_name="tiny", device="cpu")
    ids = server.tokenizer("Reverse this number: 12")["input_ids"]
    assert len(ids) > 3 and server.model.config.model_type == "llama"
