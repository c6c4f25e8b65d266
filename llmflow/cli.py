"""The llmflow command line: `llmflow up | down | status | run | demo | chat | config`.

Heavy libraries (prefect, ray, torch) are imported inside the commands that use them, so
`llmflow --help` returns at once. An LlmflowError becomes one line on stderr and its exit
code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer

from llmflow.errors import ConfigError, LlmflowError, RunFailed, StackError

app = typer.Typer(
    name="llmflow",
    help="Pipeline-as-code for fine-tuning and shipping language models (Prefect + Ray).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Flow name -> "module:function". Every flow takes `config: PipelineConfig`.
FLOWS: dict[str, str] = {
    "pipeline": "flows.pipeline:pipeline",
    "prepare": "flows.prepare:prepare",
    "finetune": "flows.finetune:finetune",
    "evaluate": "flows.evaluate:evaluate",
    "promote": "flows.promote:promote",
    "check": "flows.check:check",
}

_state = {"debug": False}


def _add_subcommands() -> None:
    from llmflow.cli_models import models_app

    app.add_typer(models_app, name="models")


_add_subcommands()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="A configs/*.yaml file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.max_steps=50."),
]


def _echo(msg: str) -> None:
    typer.echo(msg)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["LLMFLOW_DEBUG"] = "1"


@app.command()
def up(
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the Ray head offers.")] = None,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs the Ray head declares.")] = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            help="Ray nodes on this machine, the head included: each extra node declares 2 CPUs, "
            "one logical GPU and the resource gpu_node (train.resources_per_worker places "
            "training there). Default: keep the nodes that run."
        ),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            help="The Prefect server's database: postgresql+asyncpg://user:password@host:5432/db "
            "(default: LLMFLOW_DATABASE_URL, else SQLite under .llmflow/prefect/).",
            show_default=False,
        ),
    ] = None,
    no_deploy: Annotated[bool, typer.Option("--no-deploy", help="Skip prefect deploy.")] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Also start the chat page over the served model (llmflow chat), "
            "on 127.0.0.1:7860 (LLMFLOW_CHAT_PORT).",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Start the local stack (Prefect server, Ray head + Serve, Prefect worker), idempotently."""
    from llmflow import settings, stack

    settings.apply_offline_defaults()
    endpoint, chat_args = _chat_target(config) if chat else (None, [])
    parts = stack.up(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        nodes=nodes,
        database=database,
        with_deploy=not no_deploy,
        chat_endpoint=endpoint,
        chat_args=chat_args,
        echo=_echo,
    )
    _print_status(parts)


@app.command()
def down() -> None:
    """Stop exactly what `llmflow up` started (by recorded pid)."""
    from llmflow import stack

    stack.down(echo=_echo)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each part of the local stack: URL, pid and health. Exit 1 if any is down."""
    from llmflow import stack

    parts = stack.status()
    if as_json:
        typer.echo(json.dumps(stack.status_dict(parts), indent=2))
    else:
        _print_status(parts)
        _print_engine_env()
    if not all(p.healthy for p in parts):
        raise typer.Exit(1)


def _print_status(parts) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("part", "address", "pid", "health", "detail")
    for p in parts:
        health = "[green]healthy[/green]" if p.healthy else "[red]down[/red]"
        table.add_row(p.name, p.url, str(p.pid or "-"), health, p.detail)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _print_engine_env() -> None:
    """The vLLM engine environment: optional, so it never changes status's exit code."""
    from llmflow import engine_env

    info = engine_env.probe()
    if info.healthy:
        typer.echo(
            f"vllm engine environment: {info.python}: {info.vllm_dist} {info.vllm_version}, "
            f"Ray {info.ray_version} and Python {info.python_version} match the cluster's"
        )
    else:
        typer.echo(f"vllm engine environment: not usable ({info.problem}); the hf engine serves")


@app.command()
def alerts(
    webhook: Annotated[
        str | None,
        typer.Option(
            help="URL to POST to when an llmflow flow run fails (Slack/Teams/any webhook)."
        ),
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Remove the failure automation.")] = False,
) -> None:
    """Failure alerts: a Prefect automation on the stack's server that posts to a webhook
    whenever a run of an llmflow flow fails, crashes or times out."""
    from llmflow import alerts as alerts_mod
    from llmflow import settings, stack

    if bool(webhook) == off:
        raise ConfigError("llmflow alerts: give exactly one of --webhook URL or --off")
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"--webhook: {webhook!r} is not an http(s) URL")
    settings.apply_offline_defaults()
    s = settings.StackSettings.from_env()
    os.environ.setdefault("PREFECT_API_URL", s.prefect_api_url)
    if not stack.prefect_healthy(os.environ["PREFECT_API_URL"], timeout=5):
        raise StackError(
            f"Prefect server at {os.environ['PREFECT_API_URL']} is not reachable "
            "(start it with: llmflow up)"
        )
    if off:
        _echo(f"removed {alerts_mod.disable()} automation(s) named {alerts_mod.AUTOMATION}")
    else:
        automation_id = alerts_mod.enable(webhook)
        _echo(
            f"automation {alerts_mod.AUTOMATION} ({automation_id}): failed runs of "
            f"{', '.join(alerts_mod.FLOW_NAMES)} post to {webhook}"
        )


def _chat_config(config: Path | None, set_: list[str] | None = None):
    """The config a chat reads serve.route_prefix and serve.api_key_env from: the file given,
    else configs/tiny.yaml (as the flows' default), with the --set overrides."""
    from llmflow.config import load_config
    from llmflow.settings import project_dir

    tiny = project_dir() / "configs" / "tiny.yaml"
    return load_config(config or (tiny if tiny.is_file() else None), set_ or [])


def _chat_target(config: Path | None, set_: list[str] | None = None) -> tuple[str, list[str]]:
    """The model endpoint (OpenAI base URL) a chat of this config talks to, and the
    `llmflow chat` options that hand it the same config."""
    from llmflow.chat import endpoint_for
    from llmflow.settings import serve_url

    cfg = _chat_config(config, set_)
    args = ["--config", str(Path(config).resolve())] if config else []
    return endpoint_for(serve_url(cfg.cluster), cfg.serve.route_prefix), args + [
        a for s in (set_ or []) for a in ("--set", s)
    ]


@app.command()
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
    from llmflow import settings, stack

    settings.apply_offline_defaults()
    cfg = _chat_config(config, set_)
    url = endpoint or _chat_target(config, set_)[0]
    s = settings.StackSettings.from_env()
    port = port if port is not None else s.chat_port
    if stack.port_open(host, port):
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
        echo=_echo,
    )


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + --set overrides) as YAML."""
    import yaml

    from llmflow.config import load_config

    cfg = load_config(config, set_ or [])
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _prepare_environment(cfg) -> str:
    """Point this process at the Prefect server and Ray head the config names, bringing the
    local stack up when the config names none. Returns the Prefect API URL."""
    from llmflow import settings, stack

    settings.apply_offline_defaults()
    s = settings.StackSettings.from_env()
    if cfg.cluster.prefect_api_url:
        api = cfg.cluster.prefect_api_url
        if not stack.prefect_healthy(api, timeout=5):
            raise StackError(f"Prefect server at {api} is not reachable (cluster.prefect_api_url)")
    else:
        if not stack.is_up(s):
            _echo("Local stack is not fully running: starting it (llmflow up)...")
            stack.up(s, echo=_echo)
        os.environ.update(stack.client_env(s))
        api = s.prefect_api_url
    os.environ["PREFECT_API_URL"] = api
    if cfg.cluster.ray_address:
        addr = cfg.cluster.ray_address
        if not addr.startswith("ray://") and addr != "auto":
            host, _, port = addr.rpartition(":")
            if not port.isdigit() or not stack.port_open(host or "127.0.0.1", int(port), 3):
                raise StackError(f"Ray head at {addr} is not reachable (cluster.ray_address)")
    return api


def run_flow(name: str, cfg, echo=_echo, **params):
    """Run a flow of FLOWS in this process against the configured stack; return its state."""
    import importlib

    if name not in FLOWS:
        raise LlmflowError(f"unknown flow '{name}'; choose one of: {', '.join(FLOWS)}")
    _prepare_environment(cfg)
    module, func = FLOWS[name].split(":")
    flow_obj = getattr(importlib.import_module(module), func)

    # Prefect logs the run's UI URL ("View at ...") as the run starts.
    return flow_obj(config=cfg, return_state=True, **params)


@app.command()
def run(
    flow: Annotated[str, typer.Argument(help=f"Flow to run: {', '.join(FLOWS)}.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    retrain: Annotated[
        str,
        typer.Option(
            help="pipeline only: 'always', or 'if-data-changed' (the dataset "
            "hash decides, as the retrain-nightly deployment does)."
        ),
    ] = "always",
) -> None:
    """Run a flow from the command line; exit 0 only when its run Completed."""
    from llmflow.config import load_config

    if retrain not in ("always", "if-data-changed"):
        raise ConfigError(f"--retrain: {retrain!r} is not one of: always, if-data-changed")
    cfg = load_config(config, set_ or [])
    from llmflow.preflight import check_config

    # Before the stack comes up: a vllm engine that cannot run, an unknown metric: one line.
    check_config(cfg, flow)
    params = {"retrain": retrain} if flow == "pipeline" else {}
    state = run_flow(flow, cfg, **params)
    _finish(flow, state)
    if flow == "pipeline":
        _show_served(state.result(), cfg)


def _finish(flow: str, state) -> None:
    from prefect.settings import PREFECT_UI_URL

    run_id = state.state_details.flow_run_id
    url = f"{PREFECT_UI_URL.value()}/runs/flow-run/{run_id}"
    if not state.is_completed():
        raise RunFailed(f"flow '{flow}' ended {state.name}: {state.message or ''} (see {url})")
    _echo(f"Flow '{flow}' Completed: {url}")


def sample_answer(result: dict, serve_cfg) -> tuple[str, str]:
    """Ask the served model the first eval question of the run's dataset; (question, answer)."""
    import httpx
    import pyarrow.parquet as pq

    row = pq.read_table(f"{result['dataset']['uri']}/eval.parquet").slice(0, 1).to_pylist()[0]
    messages = [m for m in row["messages"] if m["role"] != "assistant"][:2]
    endpoint = result["rollout"]["endpoint"]
    headers = {}
    from llmflow.apikey import resolve_api_key

    key = resolve_api_key(serve_cfg.api_key_env, serve_cfg.api_key_file)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    r = httpx.post(
        f"{endpoint}/v1/chat/completions",
        headers=headers,
        timeout=60,
        json={"model": result["model"]["name"], "messages": messages, "max_tokens": 32},
    )
    r.raise_for_status()
    return messages[-1]["content"], r.json()["choices"][0]["message"]["content"]


@app.command()
def demo(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    set_: SetOpt = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Start the chat page over the served model at the end (as `llmflow up --chat`).",
        ),
    ] = False,
) -> None:
    """Bring the stack up, run the whole pipeline on the tiny default, ask the served model."""
    from llmflow import stack
    from llmflow.config import load_config
    from llmflow.settings import StackSettings

    cfg = load_config(config, set_ or [])
    t0 = time.monotonic()
    state = run_flow("pipeline", cfg)
    _finish("pipeline", state)
    chat_url = None
    if chat and not cfg.cluster.ray_address:
        endpoint, args = _chat_target(config, set_)
        try:
            chat_url = stack.start_chat(StackSettings.from_env(), endpoint, args, echo=_echo).url
        except StackError as exc:  # the pipeline did its part: say why, do not fail the demo
            _echo(f"chat: not started: {exc}")
    _print_status(stack.status())
    _show_served(state.result(), cfg)
    _echo(f"Demo finished in {time.monotonic() - t0:.0f}s.")
    _show_chat(cfg, chat_url)


def _show_chat(cfg, running_url: str | None) -> None:
    """The last line of the demo: where to chat with the served model."""
    from llmflow.settings import StackSettings

    if running_url:
        _echo(
            f"Chat with the served model: {running_url}  (`llmflow status` shows it, "
            "`llmflow down` stops it)"
        )
    elif cfg.serve.chat:
        from llmflow.settings import serve_url

        _echo(
            f"Chat with the served model: {serve_url(cfg.cluster)}{cfg.serve.route_prefix.rstrip('/')}/chat/"
            "  (served by Ray Serve next to the model)"
        )
    else:
        _echo(
            f"Chat with the served model: {StackSettings.from_env().chat_url}  after "
            "`llmflow chat` (or `llmflow up --chat`)"
        )


def _show_served(result: dict, cfg) -> None:
    """After a pipeline run: the served endpoint and the model's answer to one eval question."""
    if result.get("skipped"):
        _echo(f"Nothing retrained: {result['skipped']}")
        return
    rollout = result["rollout"]
    if not rollout.get("served_version") or not rollout.get("endpoint"):
        _echo(f"Nothing served: {rollout.get('message', '')}")
        return
    endpoint, name = rollout["endpoint"], result["model"]["name"]
    question, answer = sample_answer(result, cfg.serve)
    _echo(
        f"Served endpoint: {endpoint}/v1  (model {name}:{rollout['served_version']}, "
        f"OpenAI-compatible)"
    )
    _echo(f"Sample: {question!r} -> {answer!r}")
    _echo(
        f"Try: curl {endpoint}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{name}", "messages": '
        f'[{{"role": "user", "content": "{question}"}}]}}\''
    )


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: LlmflowError -> one line on stderr + its exit code.

    Click handles usage errors itself (standalone mode: message and exit code 2).
    """
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="llmflow")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LlmflowError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the one-line rule
        if debug:
            traceback.print_exc()
        typer.echo(
            f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
