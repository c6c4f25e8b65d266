"""Model aliases: models/<name>/aliases.json, {"champion": ..., "previous": ...}.

Updated under an exclusive lock and written atomically (temporary file, then rename), so
two promotions at once leave exactly one champion and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from filelock import FileLock

from llmflow.errors import StoreError
from llmflow.store import Store

ALIASES = "aliases.json"


@contextlib.contextmanager
def _locked(store: Store, name: str) -> Iterator[None]:
    if not store.local:
        # Object stores have no lock; promotions there are serialised by the pipeline's
        # Prefect concurrency limit (one run per model name).
        yield
        return
    os.makedirs(store.path("models", name), exist_ok=True)
    # Waits as long as it takes (flock underneath); the lock file stays beside aliases.json.
    with FileLock(store.path("models", name, ".aliases.lock"), preserve_lock_file=True):
        yield


def read_aliases(store: Store, name: str) -> dict[str, str]:
    if not store.exists("models", name, ALIASES):
        return {}
    data = store.read_json("models", name, ALIASES)
    if not isinstance(data, dict):
        raise StoreError(f"{store.uri('models', name, ALIASES)}: expected a JSON object")
    return data


def set_champion(store: Store, name: str, version: str) -> tuple[bool, str | None]:
    """Make ``version`` the champion; the old champion becomes 'previous'.

    Returns:
        (changed, previous champion). Promoting the champion again changes nothing.
    """
    with _locked(store, name):
        aliases = read_aliases(store, name)
        old = aliases.get("champion")
        if old == version:
            return False, aliases.get("previous")
        aliases = {**aliases, "champion": version}
        if old is not None:
            aliases["previous"] = old
        store.write_json(aliases, "models", name, ALIASES)
        return True, old


def restore_champion(store: Store, name: str, champion: str | None, previous: str | None) -> None:
    """Put the aliases back as they were (a promotion's undo)."""
    with _locked(store, name):
        aliases = {k: v for k, v in (("champion", champion), ("previous", previous)) if v}
        store.write_json(aliases, "models", name, ALIASES)


def rollback(store: Store, name: str) -> str:
    """Swap champion and previous; returns the new champion."""
    with _locked(store, name):
        aliases = read_aliases(store, name)
        if not aliases.get("previous"):
            raise StoreError(f"model '{name}' has no previous version to roll back to")
        new = {"champion": aliases["previous"], "previous": aliases["champion"]}
        store.write_json(new, "models", name, ALIASES)
        return new["champion"]
