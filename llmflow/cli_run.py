"""`llmflow run` and `llmflow demo`: a flow run against the configured (or the local) stack,
its outcome in one line, and the demo's served answer and chat page.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from llmflow.cli_chat import chat_target
from llmflow.cli_common import FLOWS, ConfigOpt, SetOpt, echo, print_status
from llmflow.errors import (
    NOT_PROMOTED,
    ConfigError,
    LlmflowError,
    NotPromoted,
    RunFailed,
    StackError,
)


def prepare_environment(cfg) -> str:
    """Point this process at the Prefect server and Ray head the config names, bringing the
    local stack up when the config names none. Returns the Prefect API URL."""
    from llmflow import probes, processes, settings, stack

    settings.apply_offline_defaults()
    s = settings.StackSettings.from_env()
    if cfg.cluster.prefect_api_url:
        api = cfg.cluster.prefect_api_url
        if not stack.prefect_healthy(api, timeout=5):
            raise StackError(f"Prefect server at {api} is not reachable (cluster.prefect_api_url)")
    else:
        if not probes.is_up(s):
            echo("Local stack is not fully running: starting it (llmflow up)...")
            stack.up(s, echo=echo)
        os.environ.update(processes.client_env(s))
        api = s.prefect_api_url
    os.environ["PREFECT_API_URL"] = api
    if cfg.cluster.ray_address:
        addr = cfg.cluster.ray_address
        if not addr.startswith("ray://") and addr != "auto":
            host, _, port = addr.rpartition(":")
            if not port.isdigit() or not probes.port_open(host or "127.0.0.1", int(port), 3):
                raise StackError(f"Ray head at {addr} is not reachable (cluster.ray_address)")
    return api


def run_flow(name: str, cfg, echo=echo, **params):
    """Run a flow of FLOWS in this process against the configured stack; return its state.

    Unless --debug, the terminal shows the stage lines, progress bars and the outcome only:
    Prefect's and Ray's output goes to .llmflow/logs/run-<flow>-<time>.log (and every log
    line of the run to the Prefect UI, as always)."""
    import importlib

    if name not in FLOWS:
        raise LlmflowError(f"unknown flow '{name}'; choose one of: {', '.join(FLOWS)}")
    prepare_environment(cfg)
    module, func = FLOWS[name].split(":")
    with quiet_unless_debug(f"run-{name}", f"{name}: running"):
        flow_obj = getattr(importlib.import_module(module), func)
        return flow_obj(config=cfg, return_state=True, **params)


@contextlib.contextmanager
def quiet_unless_debug(what: str, line: str) -> Iterator[None]:
    """Prefect's, Ray's and Serve's own output to .llmflow/logs/<what>-<time>.log while the
    block runs (the terminal keeps llmflow's lines), unless --debug: every command that talks
    to the cluster, not only `llmflow run`."""
    from llmflow import terminal
    from llmflow.settings import StackSettings

    if os.environ.get("LLMFLOW_DEBUG") == "1":
        yield
        return
    log_file = StackSettings.from_env().logs_dir / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    echo(f"{line}; Prefect's and Ray's output in {log_file}")
    with terminal.quiet(log_file):
        yield


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
    from llmflow.configfile import load_config

    if retrain not in ("always", "if-data-changed"):
        raise ConfigError(f"--retrain: {retrain!r} is not one of: always, if-data-changed")
    cfg = load_config(config, set_ or [])
    from llmflow.preflight import check_config

    # Before the stack comes up: a vllm engine that cannot run, an unknown metric: one line.
    check_config(cfg, flow)
    params = {"retrain": retrain} if flow == "pipeline" else {}
    state = run_flow(flow, cfg, **params)
    finish(flow, state)
    if flow == "pipeline":
        _show_served(state.result(), cfg)


def finish(flow: str, state) -> None:
    from prefect.settings import PREFECT_UI_URL

    run_id = state.state_details.flow_run_id
    url = f"{PREFECT_UI_URL.value()}/runs/flow-run/{run_id}"
    if not state.is_completed():
        reason = (state.message or "").removeprefix("Flow run encountered an exception: ")
        raise RunFailed(f"flow '{flow}' ended {state.name}: {reason} (see {url})")
    if state.name == NOT_PROMOTED:  # the run Completed; the gate refused (exit 3)
        raise NotPromoted(f"flow '{flow}' {state.message} (see {url})")
    echo(f"Flow '{flow}' Completed: {url}")


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
    from llmflow.configfile import load_config
    from llmflow.settings import StackSettings

    cfg = load_config(config, set_ or [])
    t0 = time.monotonic()
    state = run_flow("pipeline", cfg)
    finish("pipeline", state)
    chat_url = None
    if chat and not cfg.cluster.ray_address:
        endpoint, args = chat_target(config, set_)
        try:
            chat_url = stack.start_chat(StackSettings.from_env(), endpoint, args, echo=echo).url
        except StackError as exc:  # the pipeline did its part: say why, do not fail the demo
            echo(f"chat: not started: {exc}")
    print_status(stack.status())
    _show_served(state.result(), cfg)
    echo(f"Demo finished in {time.monotonic() - t0:.0f}s.")
    _show_chat(cfg, chat_url)


def _show_chat(cfg, running_url: str | None) -> None:
    """The last line of the demo: where to chat with the served model."""
    from llmflow.settings import StackSettings

    if running_url:
        echo(
            f"Chat with the served model: {running_url}  (`llmflow status` shows it, "
            "`llmflow down` stops it)"
        )
    elif cfg.serve.chat:
        from llmflow.settings import serve_url

        echo(
            f"Chat with the served model: {serve_url(cfg.cluster)}{cfg.serve.route_prefix.rstrip('/')}/chat/"
            "  (served by Ray Serve next to the model)"
        )
    else:
        echo(
            f"Chat with the served model: {StackSettings.from_env().chat_url}  after "
            "`llmflow chat` (or `llmflow up --chat`)"
        )


def _show_served(result: dict, cfg) -> None:
    """After a pipeline run: the served endpoint and the model's answer to one eval question."""
    if result.get("skipped"):
        echo(f"Nothing retrained: {result['skipped']}")
        return
    rollout = result["rollout"]
    if not rollout.get("served_version") or not rollout.get("endpoint"):
        echo(f"Nothing served: {rollout.get('message', '')}")
        return
    endpoint, name = rollout["endpoint"], result["model"]["name"]
    question, answer = sample_answer(result, cfg.serve)
    echo(
        f"Served endpoint: {endpoint}/v1  (model {name}:{rollout['served_version']}, "
        f"OpenAI-compatible)"
    )
    echo(f"Sample: {question!r} -> {answer!r}")
    echo(
        f"Try: curl {endpoint}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{name}", "messages": '
        f'[{{"role": "user", "content": "{question}"}}]}}\''
    )
