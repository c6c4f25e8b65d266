"""`llmflow chat`: the browser chat over the served model, and the endpoint a config's chat
talks to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmflow.cli_common import ConfigOpt, SetOpt, echo
from llmflow.errors import StackError


def chat_config(config: Path | None, set_: list[str] | None = None):
    """The config a chat reads serve.route_prefix and serve.api_key_env from: the file given,
    else configs/tiny.yaml (as the flows' default), with the --set overrides."""
    from llmflow.configfile import load_config
    from llmflow.settings import project_dir

    tiny = project_dir() / "configs" / "tiny.yaml"
    return load_config(config or (tiny if tiny.is_file() else None), set_ or [])


def chat_target(config: Path | None, set_: list[str] | None = None) -> tuple[str, list[str]]:
    """The model endpoint (OpenAI base URL) a chat of this config talks to, and the
    `llmflow chat` options that hand it the same config."""
    from llmflow.chat_backend import endpoint_for
    from llmflow.settings import serve_url

    cfg = chat_config(config, set_)
    args = ["--config", str(Path(config).resolve())] if config else []
    return endpoint_for(serve_url(cfg.cluster), cfg.serve.route_prefix), args + [
        a for s in (set_ or []) for a in ("--set", s)
    ]


def chat(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    port: Annotated[
        int | None, typer.Option(help="Port of the page (default: LLMFLOW_CHAT_PORT, else 7860).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address the page binds.")] = "127.0.0.1",
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="OpenAI base URL of the model (…/v1). Default: the local stack's Serve URL plus "
            "serve.route_prefix of the config."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model id to ask (default: the first one the endpoint lists)."),
    ] = None,
) -> None:
    """Chat with the served model in the browser (Gradio), in the foreground.

    The page shows the serving version, its lineage and the endpoint, and streams answers;
    the key is read from serve.api_key_file or the variable serve.api_key_env names.
    """
    from llmflow import chat as chat_mod
    from llmflow import probes, settings

    settings.apply_offline_defaults()
    cfg = chat_config(config, set_)
    url = endpoint or chat_target(config, set_)[0]
    s = settings.StackSettings.from_env()
    port = port if port is not None else s.chat_port
    if probes.port_open(host, port):
        raise StackError(
            f"cannot start the chat: port {host}:{port} is already in use; "
            "pass --port or set LLMFLOW_CHAT_PORT"
        )
    chat_mod.launch(
        url,
        cfg.serve.api_key_env,
        model,
        host=host,
        port=port,
        api_key_file=cfg.serve.api_key_file,
        echo=echo,
    )
