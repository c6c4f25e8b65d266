"""Drill: two promotions of one model at once. They take turns (the promote slot), so the
end state is consistent: exactly one champion, the other version its `previous`, the
champion is what Serve answers with, and both runs report what they did."""

from __future__ import annotations

import contextvars
import threading

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import unserve

pytestmark = [pytest.mark.slow, pytest.mark.integration]
NAME = "race-test"


def test_two_promotions_at_once_leave_exactly_one_champion(stack):

    from flows.promote import promote
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    base = resolve_base_model(TrainConfig())
    a, b = (registry.register_version(Store(), NAME, base, base_model="tiny") for _ in range(2))
    cfg = load_config(
        None, [f"train.model_name={NAME}", f"serve.app_name={NAME}", "serve.route_prefix=/race"]
    )
    states: dict[str, object] = {}
    go = threading.Barrier(2)

    def run(version) -> None:
        go.wait()
        states[version.version] = promote(config=cfg, candidate=version, return_state=True)

    # Copies of this context: Prefect's settings (the stack's API URL) live in a contextvar.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(run, v)) for v in (a, b)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert all(s.is_completed() for s in states.values()), states
        rollouts = {v: s.result() for v, s in states.items()}
        champ = aliases.read_aliases(Store(), NAME)
        assert {champ["champion"], champ["previous"]} == {a.version, b.version}, champ
        first, last = champ["previous"], champ["champion"]
        # The later promotion replaced the earlier one, and says so; the earlier had none.
        assert rollouts[last].previous_version == first and rollouts[first].previous_version is None
        assert all(
            r.served_version == v and "is champion and served" in r.message
            for v, r in rollouts.items()
        )
        health = httpx.get(f"{stack.serve_url}/race/health", timeout=30).json()
        assert health["version"] == last
    finally:
        unserve(NAME, NAME)
