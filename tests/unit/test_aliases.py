"""Aliases: champion/previous moves, idempotence, and one champion under concurrency."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from llmflow.aliases import read_aliases, restore_champion, rollback, set_champion
from llmflow.errors import StoreError
from llmflow.store import Store


def test_champion_moves_and_previous_follows(tmp_path):
    s = Store(tmp_path)
    assert read_aliases(s, "m") == {}
    assert set_champion(s, "m", "1") == (True, None)
    assert set_champion(s, "m", "2") == (True, "1")
    assert read_aliases(s, "m") == {"champion": "2", "previous": "1"}
    assert set_champion(s, "m", "2") == (False, "1")  # idempotent
    assert rollback(s, "m") == "1"
    assert read_aliases(s, "m") == {"champion": "1", "previous": "2"}
    restore_champion(s, "m", "2", "1")
    assert read_aliases(s, "m") == {"champion": "2", "previous": "1"}


def test_rollback_without_previous(tmp_path):
    s = Store(tmp_path)
    set_champion(s, "m", "1")
    with pytest.raises(StoreError, match="no previous version"):
        rollback(s, "m")


def _promote(root: str, version: str, barrier) -> None:
    barrier.wait()
    for _ in range(20):
        set_champion(Store(root), "m", version)


def test_concurrent_promotions_leave_one_consistent_champion(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_promote, args=(str(tmp_path), str(v), barrier)) for v in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    aliases = read_aliases(Store(tmp_path), "m")
    assert aliases["champion"] in {"0", "1", "2", "3"}
    assert (
        aliases["previous"] in {"0", "1", "2", "3"} and aliases["previous"] != aliases["champion"]
    )
    assert sorted(p.name for p in (tmp_path / "models" / "m").iterdir()) == [
        ".aliases.lock",
        "aliases.json",
    ]
