"""The model registry: numbered versions of each model under models/<name>/<version>/.

A version directory holds a save_pretrained directory (safetensors) and manifest.json, the
lineage: the ModelRef, dataset, config, base model, flow run id, git commit and metrics.
Versions are v1, v2, ... and are created atomically: two registrations racing for the same
number never share it (one wins, the other takes the next). Aliases come later.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from llmflow.errors import StoreError
from llmflow.refs import ModelRef
from llmflow.store import MANIFEST, Store

MODELS = "models"
_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CLAIMS = ".claims"  # object stores: one marker per attempt at a version number
MAX_ATTEMPTS = 100


class RegistryError(StoreError):
    """A model name or version is unknown or malformed in the registry."""


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name.startswith("_"):
        raise RegistryError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (not starting with '_')"
        )


def _number(version: str) -> int | None:
    m = _VERSION.match(version)
    return int(m.group(1)) if m else None


def _numbers(store: Store, name: str) -> list[int]:
    nums = (_number(v) for v in store.listdir(MODELS, name))
    return sorted(n for n in nums if n is not None)


def list_versions(store: Store, name: str) -> list[ModelRef]:
    """Every complete version of ``name``, oldest first ([] for an unknown name)."""
    _check_name(name)
    out = []
    for n in _numbers(store, name):
        if store.exists(MODELS, name, f"v{n}", MANIFEST):  # a manifest marks it complete
            out.append(get_version(store, name, f"v{n}"))
    return out


def get_version(store: Store, name: str, version: str | None = None) -> ModelRef:
    """The ModelRef of ``name`` at ``version`` ('v3', '3'), or of its latest version if None."""
    _check_name(name)
    if version is None:
        # The newest complete one: on an object store a registration that died mid-upload
        # leaves files under v<N> but no manifest.
        complete = (
            f"v{n}"
            for n in reversed(_numbers(store, name))
            if store.exists(MODELS, name, f"v{n}", MANIFEST)
        )
        version = next(complete, None)
        if version is None:
            raise RegistryError(f"model {name!r}: no versions in {store.uri(MODELS)}")
    elif version.isdigit():
        version = f"v{version}"
    if _number(version) is None:
        raise RegistryError(f"model {name!r}: version {version!r} is not of the form v<N>")
    if not store.exists(MODELS, name, version, MANIFEST):
        raise RegistryError(f"model {name!r}: no version {version} in {store.uri(MODELS, name)}")
    return ModelRef.model_validate(store.read_json(MODELS, name, version, MANIFEST)["ref"])


def find_version(store: Store, name: str, **lineage: Any) -> ModelRef | None:
    """The newest version of ``name`` whose manifest has all the given lineage values
    (say ``checkpoint=...``), or None: registration stays idempotent for re-runs."""
    for ref in reversed(list_versions(store, name)):
        manifest = store.read_json(MODELS, name, ref.version, MANIFEST)
        if all(manifest.get(k) == v for k, v in lineage.items()):
            return ref
    return None


def read_manifest(store: Store, name: str, version: str) -> dict[str, Any]:
    """The full lineage manifest of a version."""
    get_version(store, name, version)  # one clear error for a missing version
    return store.read_json(MODELS, name, version, MANIFEST)


def annotate(store: Store, name: str, version: str, **sections: Any) -> dict[str, Any]:
    """Add or replace top-level sections of a version's manifest (``eval``: the metrics it
    was scored with; ``gate``: the decision that promoted it and who approved it). The
    weights never change; the record of what was decided about them grows. The manifest is
    rewritten whole under a temporary name and renamed (Store.write_json), so a reader sees
    the old one or the new one, never a half."""
    manifest = read_manifest(store, name, version)
    manifest.update(sections)
    store.write_json(manifest, MODELS, name, version, MANIFEST)
    return manifest


def register_version(
    store: Store,
    name: str,
    model_dir: str | os.PathLike,
    *,
    base_model: str,
    dataset_sha256: str | None = None,
    metrics: dict[str, float] | None = None,
    lineage: dict[str, Any] | None = None,
) -> ModelRef:
    """Copy ``model_dir`` into the registry as the next version of ``name``.

    Args:
        store: the artifact store.
        name: the model's registry name.
        model_dir: a local save_pretrained directory.
        base_model, dataset_sha256, metrics: go into the ModelRef.
        lineage: the rest of the manifest (config, flow run id, git commit, ...).

    Returns:
        The new version's ModelRef. The directory appears whole, with its manifest, or not at
        all; a concurrent registration gets a different version.
    """
    _check_name(name)
    src = Path(model_dir)
    if not src.is_dir():
        raise RegistryError(f"{src}: no model directory to register")

    def manifest_for(version: str) -> dict[str, Any]:
        ref = ModelRef(
            uri=store.uri(MODELS, name, version),
            name=name,
            version=version,
            base_model=base_model,
            dataset_sha256=dataset_sha256,
            train_metrics=metrics or {},
        )
        return {"ref": ref.model_dump(mode="json"), **(lineage or {})}

    if store.local:
        return _register_local(store, name, src, manifest_for)
    return _register_remote(store, name, src, manifest_for)


def _register_local(store: Store, name: str, src: Path, manifest_for) -> ModelRef:
    """Stage next to the target, then rename: rename(2) onto an existing non-empty directory
    fails, so of two writers renaming to the same v<N> exactly one succeeds."""
    parent = store.path(MODELS, name)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        shutil.copytree(src, staging, dirs_exist_ok=True)
        n = (_numbers(store, name) or [0])[-1] + 1
        for _ in range(MAX_ATTEMPTS):
            version = f"v{n}"
            manifest = manifest_for(version)
            Path(staging, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                os.rename(staging, os.path.join(parent, version))
            except OSError:  # taken (ENOTEMPTY/EEXIST): try the number after the highest
                n = max(n + 1, (_numbers(store, name) or [0])[-1] + 1)
                continue
            return ModelRef.model_validate(manifest["ref"])
        raise RegistryError(f"model {name!r}: no free version after {MAX_ATTEMPTS} attempts")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _register_remote(store: Store, name: str, src: Path, manifest_for) -> ModelRef:
    """Object stores have no atomic rename. A writer drops a uniquely named claim for v<N>
    and keeps N only when, listed after its own write, its claim is the sole one. A winner's
    claim stays forever, so anyone who claims N later sees two and loses: a version is never
    shared. Contenders that collided withdraw their claims and try N again after a random
    pause (so one gets through, instead of all of them burning number after number); a
    number that already holds a claim or files is skipped. Files go up, manifest last."""
    fs = store.fs
    n = (_numbers(store, name) or [0])[-1] + 1
    collisions = 0
    for _ in range(MAX_ATTEMPTS):
        version = f"v{n}"
        claim_dir = store.path(MODELS, name, CLAIMS, version)
        if store.exists(MODELS, name, version) or _claims(fs, claim_dir):
            n, collisions = n + 1, 0  # taken, or held by a winner still starting its upload
            continue
        claim = uuid.uuid4().hex
        fs.pipe_file(posixpath.join(claim_dir, claim), b"")
        if _claims(fs, claim_dir) != [claim]:
            fs.rm_file(posixpath.join(claim_dir, claim))
            collisions += 1
            time.sleep(random.uniform(0, 0.05 * 2 ** min(collisions, 5)))
            continue
        manifest = manifest_for(version)
        target = store.path(MODELS, name, version)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            if f.name != MANIFEST:
                fs.put_file(str(f), posixpath.join(target, f.relative_to(src).as_posix()))
        store.write_json(manifest, MODELS, name, version, MANIFEST)
        return ModelRef.model_validate(manifest["ref"])
    raise RegistryError(f"model {name!r}: no free version after {MAX_ATTEMPTS} attempts")


def _claims(fs, claim_dir: str) -> list[str]:
    """The names of the claims on one version number ([] when there are none)."""
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(claim_dir, detail=False))
    except FileNotFoundError:
        return []
