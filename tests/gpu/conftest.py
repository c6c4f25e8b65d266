"""GPU tier: every test here is marked `gpu` and skipped, with the reason, without CUDA."""

from __future__ import annotations

import pytest


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    have = _cuda()
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if not have:
                item.add_marker(
                    pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
                )
