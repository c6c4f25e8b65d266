"""Where the test time goes: a per-module table at the end of every run (`make test`, `make
drills`, CI's log), beside pytest's own `--durations` list of the slowest tests.

A module's time is the sum of its tests' setup, call and teardown, so a module-scoped fixture
(a trained model, an engine start) counts in the module whose first test asked for it, and the
session's stack in the first integration module's. Loaded by tests/conftest.py.
"""

from __future__ import annotations

from collections import defaultdict

import pytest


class ModuleTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, set[str]] = defaultdict(set)
        self.failed: dict[str, int] = defaultdict(int)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = report.nodeid.split("::", 1)[0]
        self.seconds[module] += report.duration
        self.tests[module].add(report.nodeid)
        if report.failed:
            self.failed[module] += 1

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        total = sum(self.seconds.values())
        w = terminalreporter
        w.write_sep("=", "time per module (setup + call + teardown)")
        width = max(len(m) for m in self.seconds)
        for module, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            failed = f"  {self.failed[module]} failed" if self.failed[module] else ""
            w.write_line(
                f"{module:<{width}}  {s:8.1f} s  {100 * s / total:5.1f} %"
                f"  {len(self.tests[module]):4d} tests{failed}"
            )
        w.write_line(f"{'all modules':<{width}}  {total:8.1f} s")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ModuleTimes(), "llmflow-module-times")
