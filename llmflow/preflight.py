"""What can be checked of a config before any cluster work: one clear line, exit 2.

`llmflow run` calls it before it brings the stack up; the flows call it first thing, so a
run started from the UI or a schedule fails the same way, before training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmflow.config import PipelineConfig

# The stages whose settings each flow uses.
FLOW_STAGES = {"pipeline": ("eval", "serve"), "evaluate": ("eval",), "promote": ("serve",)}


def check_config(config: PipelineConfig, flow: str) -> None:
    """Engines (a vllm engine environment that can run), and the extra metrics (importable,
    no clash with a built-in) of the stages ``flow`` runs. Raises ConfigError."""
    from llmflow.engines import check_engines

    stages = FLOW_STAGES.get(flow, ())
    check_engines(config, stages)
    if "eval" in stages:
        from tasks.metrics import load_metrics

        load_metrics(config.eval.extra_metrics)
