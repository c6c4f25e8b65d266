"""Progress of a stage's long work (training steps, scored rows) from the Ray workers that
do it to the terminal that watches the flow run.

The driver names a small Ray actor after the flow run (``listening``) before it submits the
task; workers find it by that name and set their count (``report``, at most a few times a
second, fire and forget); the driver polls it while it waits for the task and draws a bar.
Without a terminal (a run from the Prefect UI, a schedule) nobody listens and ``report``
costs one failed name lookup every few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "llmflow"
REPORT_EVERY_S = 0.5
LOOKUP_EVERY_S = 5.0

_handles: dict[str, tuple[float, Any]] = {}  # actor name -> (looked up at, handle or None)
_last_report: dict[tuple[str, str], float] = {}


def actor_name(run_id: str) -> str:
    return f"llmflow-progress-{run_id}"


def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.counts: dict[str, tuple[int, int]] = {}

        def set(self, key: str, done: int, total: int) -> None:
            self.counts[key] = (done, total)

        def get(self) -> dict[str, tuple[int, int]]:
            return self.counts

    return Counter


def _handle(run_id: str):
    import ray

    name = actor_name(run_id)
    at, handle = _handles.get(name, (0.0, None))
    if handle is None and time.monotonic() - at > LOOKUP_EVERY_S:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # nobody listens to this run
            handle = None
        _handles[name] = (time.monotonic(), handle)
    return handle


def report(run_id: str | None, key: str, done: int, total: int, final: bool = False) -> None:
    """Set ``key``'s progress of flow run ``run_id`` (from a worker). Throttled; ``final``
    always goes through."""
    if not run_id:
        return
    now = time.monotonic()
    if not final and now - _last_report.get((run_id, key), 0.0) < REPORT_EVERY_S:
        return
    _last_report[(run_id, key)] = now
    handle = _handle(run_id)
    if handle is not None:
        handle.set.remote(key, int(done), int(total))


class Listener:
    """The driver's side: the counter actor, and a bar per key while a task runs."""

    def __init__(self, run_id: str, actor: Any) -> None:
        self.run_id, self.actor = run_id, actor

    def wait(self, future, key: str, label: str):
        """``future.result()``, drawing ``key``'s bar on the terminal meanwhile."""
        if self.actor is None:
            return future.result()
        import ray
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from llmflow import terminal

        console = Console(file=terminal.out())
        columns = (f"{label:>9}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # Not rich's default stdout/stderr redirect: Ray prints its workers' lines through
        # sys.stdout, and they belong in the log file with the rest.
        bar = Progress(
            *columns, console=console, transient=True, redirect_stdout=False, redirect_stderr=False
        )
        with bar:
            task = bar.add_task(label, total=None)
            while not future.state.is_final():
                future.wait(timeout=0.5)
                try:
                    counts = ray.get(self.actor.get.remote(), timeout=2)
                except Exception as exc:  # noqa: BLE001 - a bar that misses an update is still a bar
                    log.debug("progress of %s: no update (%s)", key, exc)
                    continue
                if key in counts:
                    done, total = counts[key]
                    bar.update(task, completed=done, total=total or None)
        return future.result()


@contextmanager
def listening(run_id: str | None) -> Iterator[Listener]:
    """A counter for flow run ``run_id`` while the block runs, when a live terminal watches
    and this process is connected to Ray; else a listener that just waits."""
    from llmflow import terminal

    actor = None
    # A bar needs a live terminal: piped output (CI, a log) gets the stage lines only, and no
    # counter for the workers to report to.
    if run_id and terminal.watching() and terminal.out().isatty():
        import ray

        if ray.is_initialized():
            actor = (
                _counter_class()
                .options(name=actor_name(run_id), namespace=NAMESPACE, get_if_exists=True)
                .remote()
            )
    try:
        yield Listener(run_id or "", actor)
    finally:
        if actor is not None:
            import ray

            ray.kill(actor)
