"""The llmflow command line: `llmflow up | down | status | run | demo | chat | config`.

Heavy libraries (prefect, ray, torch) are imported inside the commands that use them, so
`llmflow --help` returns at once. An LlmflowError becomes one line on stderr and its exit
code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Annotated

import typer

from llmflow.cli_chat import chat, chat_target
from llmflow.cli_common import ConfigOpt, SetOpt, echo, print_status
from llmflow.cli_run import demo, run
from llmflow.errors import ConfigError, LlmflowError, StackError

app = typer.Typer(
    name="llmflow",
    help="Pipeline-as-code for fine-tuning and shipping language models (Prefect + Ray).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_state = {"debug": False}


def _add_subcommands() -> None:
    from llmflow.cli_models import models_app

    app.add_typer(models_app, name="models")


_add_subcommands()


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
    no_restore: Annotated[
        bool,
        typer.Option(
            "--no-restore", help="Do not bring back the champions' Serve apps (serving.json)."
        ),
    ] = False,
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
    """Start the local stack (Prefect server, Ray head + Serve, Prefect worker), idempotently,
    and serve again every champion whose Serve app does not answer (a restarted head)."""
    from llmflow import settings, stack

    settings.apply_offline_defaults()
    endpoint, chat_args = chat_target(config) if chat else (None, [])
    parts = stack.up(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        nodes=nodes,
        database=database,
        with_deploy=not no_deploy,
        restore=False,
        echo=echo,
    )
    if not no_restore and stack.has_recorded_serving():
        from llmflow.cli_run import quiet_unless_debug

        # Connecting to Ray and deploying print Ray's and Serve's own lines: to the log.
        with quiet_unless_debug("restore", "serving the recorded champions again"):
            stack.restore_serving(settings.StackSettings.from_env(), echo)
        parts = stack.status()
    if endpoint:
        stack.start_chat(settings.StackSettings.from_env(), endpoint, chat_args, echo=echo)
        parts = stack.status()
    print_status(parts)


@app.command()
def down() -> None:
    """Stop exactly what `llmflow up` started (by recorded pid)."""
    from llmflow import stack

    stack.down(echo=echo)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each part of the local stack: URL, pid and health. Exit 1 if any is down."""
    from llmflow import probes, stack

    parts = stack.status()
    if as_json:
        typer.echo(json.dumps(probes.status_dict(parts), indent=2))
    else:
        print_status(parts)
        _print_served_apps()
        _print_engine_env()
    if not all(p.healthy for p in parts):
        raise typer.Exit(1)


def _print_served_apps() -> None:
    """The apps the store records as served (what `llmflow up` restores): the version each
    answers with and its request rate. Informational: never changes status's exit code."""
    from llmflow.promote.serving import served_status
    from llmflow.store import Store

    try:
        rows = served_status(Store())
    except LlmflowError as exc:
        typer.echo(f"served apps: {exc}")
        return
    for r in rows:
        live = f"serving {r['serving']}" if r["serving"] else "NOT answering"
        rate = (
            f", {r['requests_per_s']} req/s, {r['errors_per_s']} errors/s (last minute)"
            if r["requests_per_s"] is not None
            else ""
        )
        typer.echo(
            f"app {r['app']}: {r['model']} champion {r['champion']}, {live} ({r['engine']}) "
            f"at {r['url']}{rate}"
        )


def _print_engine_env() -> None:
    """The engine environments: optional, so they never change status's exit code."""
    from llmflow import engine_env

    for env, fallback in (
        (engine_env.VLLM, "the hf engine serves"),
        (engine_env.LLAMAFACTORY, "train.backend llamafactory cannot run"),
    ):
        info = engine_env.probe(env=env)
        if info.healthy:
            typer.echo(
                f"{env.package} environment: {info.python}: {info.dist} {info.version}, "
                f"Ray {info.ray_version} and Python {info.python_version} match the cluster's"
            )
        else:
            typer.echo(f"{env.package} environment: not usable ({info.problem}); {fallback}")


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
        echo(f"removed {alerts_mod.disable()} automation(s) named {alerts_mod.AUTOMATION}")
    else:
        automation_id = alerts_mod.enable(webhook)
        echo(
            f"automation {alerts_mod.AUTOMATION} ({automation_id}): failed runs of "
            f"{', '.join(alerts_mod.FLOW_NAMES)} post to {webhook}"
        )


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + --set overrides) as YAML."""
    import yaml

    from llmflow.configfile import load_config

    cfg = load_config(config, set_ or [])
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("plan")
def memory_plan(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gpu_memory_gb: Annotated[
        float | None,
        typer.Option(help="Memory of one GPU, GB (default: cluster.gpu_memory_gb)."),
    ] = None,
) -> None:
    """Each stage's peak GPU memory from the base model's config.json alone; exit 2 when a
    GPU stage cannot fit (no weights are read, no cluster is asked)."""
    from llmflow.configfile import load_config
    from llmflow.errors import ConfigError
    from llmflow.plan import report

    out, fits = report(load_config(config, set_ or []), gpu_memory_gb)
    for line in out[:-1]:  # the terms; the verdict last, on stderr when it does not fit
        typer.echo(line)
    if not fits:
        raise ConfigError(out[-1])
    typer.echo(out[-1])


# Commands whose code lives in their own modules, in the order `llmflow --help` lists them.
app.command()(chat)
app.command()(run)
app.command()(demo)


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
