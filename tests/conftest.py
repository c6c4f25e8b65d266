"""Shared test settings: offline switches on, and llmflow's state kept out of the checkout."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect, ray or transformers: offline, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Unit tests must not touch a developer's .llmflow/ (or their running stack).
os.environ.setdefault("LLMFLOW_HOME", tempfile.mkdtemp(prefix="llmflow-test-"))
