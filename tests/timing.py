"""Where the test time goes: a per-module table at the end of every run (`make test`, `make
drills`, CI's log), beside pytest's own `--durations` list of the slowest tests.

A module's time is the sum of its tests' setup, call and teardown, so a module-scoped fixture
(a trained model, an engine start) counts in the module whose first test asked for it, and the
session's stack in the first integration module's. Beside it, how busy the machine's cores were
meanwhile (/proc/stat, every process: Ray workers and servers included): a module far below 100 %
waits (on a server, a timer, a lease), one near it computes. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

_BUSY = "machine_busy_s"


def busy_seconds() -> float | None:
    """CPU-seconds the machine's cores have been busy since boot (None where /proc is absent)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class ModuleTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.busy: dict[str, float] = defaultdict(float)
        self.tests: dict[str, set[str]] = defaultdict(set)
        self.failed: dict[str, int] = defaultdict(int)
        self._mark: float | None = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        # Runs where the test runs (a pytest-xdist worker too); the figure travels in the
        # report's user_properties, which xdist sends on. A fresh list: the report's is the item's.
        outcome = yield
        now = busy_seconds()
        if now is not None and self._mark is not None:
            rep = outcome.get_result()
            rep.user_properties = [*rep.user_properties, (_BUSY, now - self._mark)]
        self._mark = now

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._mark = busy_seconds()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = report.nodeid.split("::", 1)[0]
        self.seconds[module] += report.duration
        self.busy[module] += sum(v for k, v in report.user_properties if k == _BUSY)
        self.tests[module].add(report.nodeid)
        if report.failed:
            self.failed[module] += 1

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        total = sum(self.seconds.values())
        cores = os.cpu_count() or 1
        w = terminalreporter
        w.write_sep("=", f"time per module (setup + call + teardown; cores busy of {cores})")
        width = max(len(m) for m in self.seconds)
        for module, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            busy = (
                f"{min(100, 100 * self.busy[module] / (s * cores)):5.0f} % busy"
                if s >= 0.5
                else " " * 11
            )
            failed = f"  {self.failed[module]} failed" if self.failed[module] else ""
            w.write_line(
                f"{module:<{width}}  {s:8.1f} s  {100 * s / total:5.1f} %  {busy}"
                f"  {len(self.tests[module]):4d} tests{failed}"
            )
        busy_all = 100 * sum(self.busy.values()) / (total * cores)
        w.write_line(f"{'all modules':<{width}}  {total:8.1f} s           {busy_all:5.0f} % busy")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ModuleTimes(), "llmflow-module-times")
