"""The integration tier: its session fixtures (`stack`, `prefect_client`) live in
tests/conftest.py, shared with tests/drills/; `ray_on_stack` connects a module to the stack."""

from __future__ import annotations

import pytest

from tests.integration.helpers import N_EVAL


@pytest.fixture(scope="module")
def ray_on_stack(stack):
    """Connect this process to the stack's Ray head, as the flow's task runner does."""
    import ray

    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig

    if not ray.is_initialized():
        ray.init(address=stack.ray_address, **ray_init_kwargs(ClusterConfig()))
    yield stack


@pytest.fixture(scope="session")
def eval_split(stack) -> str:
    """A prepared-format dataset in the session's store whose eval.parquet holds the last
    N_EVAL bundled examples (ids e000..e063): the scoring and vLLM tests' split."""
    from llmflow.bundled import bundled_path, read_examples
    from llmflow.store import Store
    from tests.tiny_training import write_eval_split

    return write_eval_split(Store(), read_examples(bundled_path())[-N_EVAL:], "eval-split", "e")


@pytest.fixture(scope="session")
def tiny_trained(stack, tmp_path_factory) -> str:
    """The tiny model trained once per session (150 steps on the other bundled examples, in
    process): it answers with digits, some exactly right. The scoring and vLLM tests share it;
    a test that changes it works on a copy."""
    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import bundled_path, read_examples
    from llmflow.config import TrainConfig
    from tests.tiny_training import train_tiny

    rows = read_examples(bundled_path())[:-N_EVAL]
    base = resolve_base_model(TrainConfig())
    return train_tiny(base, tmp_path_factory.mktemp("tiny-trained"), rows, steps=150)
