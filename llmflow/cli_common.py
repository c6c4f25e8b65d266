"""What the command line's modules share: the flows it runs, the --config/--set options, its
output helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Flow name -> "module:function". Every flow takes `config: PipelineConfig`.
FLOWS: dict[str, str] = {
    "pipeline": "flows.pipeline:pipeline",
    "prepare": "flows.prepare:prepare",
    "finetune": "flows.finetune:finetune",
    "evaluate": "flows.evaluate:evaluate",
    "promote": "flows.promote:promote",
    "check": "flows.check:check",
}


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="A configs/*.yaml file.")]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.max_steps=50."),
]


def echo(msg: str) -> None:
    """A line for the user: on the terminal, also while a run's output goes to its log."""
    from llmflow import terminal

    typer.echo(msg, file=terminal.out())


def print_status(parts) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("part", "address", "pid", "health", "detail")
    for p in parts:
        health = "[green]healthy[/green]" if p.healthy else "[red]down[/red]"
        table.add_row(p.name, p.url, str(p.pid or "-"), health, p.detail)
    from llmflow import terminal

    stream = terminal.out()
    Console(file=stream, width=None if stream.isatty() else 160).print(table)
