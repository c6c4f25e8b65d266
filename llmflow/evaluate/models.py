"""Which models an evaluation compares: the candidate version and the champion (the base
model while there is none).
"""

from __future__ import annotations

from llmflow import aliases, registry
from llmflow.basemodels import resolve_base_model
from llmflow.config import TrainConfig
from llmflow.refs import ModelRef
from llmflow.store import Store


def champion_model(train: TrainConfig) -> tuple[str, str]:
    """(uri, version) of the current champion, or of the base model when there is none, so
    the gate always compares like with like."""
    store = Store()
    champ = aliases.read_aliases(store, train.model_name).get("champion")
    if champ:
        ref = registry.get_version(store, train.model_name, champ)
        return ref.uri, ref.version
    return resolve_base_model(train, store), "base"


def candidate_of(model: ModelRef | None, train: TrainConfig) -> ModelRef:
    return model or registry.get_version(Store(), train.model_name)
