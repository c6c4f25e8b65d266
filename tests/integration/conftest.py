"""The integration tier: its session fixtures (`stack`, `prefect_client`) live in
tests/conftest.py, shared with tests/drills/; `ray_on_stack` connects a module to the stack."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_on_stack(stack):
    """Connect this process to the stack's Ray head, as the flow's task runner does."""
    import ray

    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig

    if not ray.is_initialized():
        ray.init(address=stack.ray_address, **ray_init_kwargs(ClusterConfig()))
    yield stack
