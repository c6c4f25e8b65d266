"""Child processes that measure their own peak memory, for the benchmarks."""

from __future__ import annotations

import multiprocessing as mp


def _noop() -> None:
    pass


def small_forkserver():
    """A forkserver context started now, while the caller is still small.

    Peak RSS (ru_maxrss) is inherited across fork and exec, so children forked from a
    process that already loaded torch would report its peak, not their own. Call this before
    heavy imports; returns (context, queue).
    """
    ctx = mp.get_context("forkserver")
    q = ctx.Queue()
    warm = ctx.Process(target=_noop)
    warm.start()
    warm.join()
    return ctx, q
