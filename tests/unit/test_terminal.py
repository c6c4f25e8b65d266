"""The quiet terminal: the process's output goes to the log file, the user's lines do not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmflow import progress, terminal


def test_quiet_sends_fd_output_to_the_log_and_keeps_the_users_lines(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from llmflow import terminal\n"
        f"with terminal.quiet(Path({str(log)!r})):\n"
        "    print('noise on stdout'); print('noise on stderr', file=sys.stderr)\n"
        "    os.system('echo child noise')\n"
        "    terminal.stage('prepare', 'dataset abc: 9 train / 1 eval rows')\n"
        "print('after')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.split("\n") == ["  prepare  dataset abc: 9 train / 1 eval rows", "after", ""]
    assert proc.stderr == ""
    logged = log.read_text()
    assert "noise on stdout" in logged and "noise on stderr" in logged
    assert "child noise" in logged and "dataset abc" not in logged


def test_an_exception_leaves_its_traceback_in_the_log_only(tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(ValueError, match="bad data"), terminal.quiet(log):
        raise ValueError("bad data")
    assert "Traceback" in log.read_text() and "ValueError: bad data" in log.read_text()
    assert not terminal.watching()


def test_report_without_a_listener_is_a_no_op_and_throttled(monkeypatch):
    lookups = []
    monkeypatch.setattr(progress, "_handle", lambda run_id: lookups.append(run_id))
    for step in range(100):
        progress.report("run-1", "train", step, 100)
    progress.report("run-1", "train", 100, 100, final=True)
    progress.report(None, "train", 1, 100, final=True)  # no flow run: nothing at all
    assert 1 <= len(lookups) <= 3 and set(lookups) == {"run-1"}
