"""`llmflow models list | show | diff | promote | rollback | unserve | serve-config`: the registry
from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(
    help="The model registry: versions, lineage, champion.", no_args_is_help=True
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="A configs/*.yaml file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")]


@models_app.command("list")
def list_(name: Annotated[str | None, typer.Argument(help="A model name.")] = None) -> None:
    """Model names, or the versions of one model with their aliases and metrics."""
    from rich.console import Console
    from rich.table import Table

    from llmflow import aliases, registry
    from llmflow.store import Store

    store = Store()
    if name is None:
        names = [n for n in store.listdir("models") if not n.startswith(("_", "."))]
        for n in names:
            champ = aliases.read_aliases(store, n).get("champion", "-")
            typer.echo(f"{n}\tversions: {len(registry.list_versions(store, n))}\tchampion: {champ}")
        if not names:
            typer.echo(f"no models in {store.uri('models')}")
        return
    tags = {v: k for k, v in aliases.read_aliases(store, name).items()}
    table = Table("version", "alias", "created", "base model", "dataset", "train", "eval", "gate")
    for ref in registry.list_versions(store, name):
        manifest = registry.read_manifest(store, name, ref.version)
        train = ", ".join(f"{k}={v:.4g}" for k, v in sorted(ref.train_metrics.items())[:3])
        scored = (manifest.get("eval") or {}).get("metrics", {})
        shown = [k for k in ("exact_match", "token_f1", "eval_loss") if k in scored]
        evals = ", ".join(f"{k}={scored[k]:.4g}" for k in shown) or "-"
        gate = manifest.get("gate") or {}
        decided = ("passed" if gate.get("passed") else "failed") if gate else "-"
        if gate.get("approved_by"):
            decided += f" ({gate['approved_by']})"
        table.add_row(
            ref.version,
            tags.get(ref.version, ""),
            f"{ref.created_at:%Y-%m-%d %H:%M}",
            ref.base_model[-30:],
            (ref.dataset_sha256 or "-")[:12],
            train,
            evals,
            decided,
        )
    Console(width=220).print(table)  # a row per version, also in logs and pipes


@models_app.command()
def show(name: str, version: Annotated[str | None, typer.Argument()] = None) -> None:
    """A version's lineage manifest (default: the champion, else the latest)."""
    from llmflow import aliases, registry
    from llmflow.store import Store

    store = Store()
    version = version or aliases.read_aliases(store, name).get("champion")
    ref = registry.get_version(store, name, version)
    typer.echo(json.dumps(registry.read_manifest(store, name, ref.version), indent=2, default=str))


@models_app.command()
def diff(
    name: str,
    version_a: Annotated[str, typer.Argument(help="The version judged (as a candidate).")],
    version_b: Annotated[str, typer.Argument(help="The version it is judged against.")],
    metric: Annotated[
        str, typer.Option(help="The metric whose won and lost examples are shown.")
    ] = "exact_match",
    examples: Annotated[int, typer.Option(min=0, help="Examples won and lost shown.")] = 5,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999)] = 0.95,
) -> None:
    """Two versions row by row on the eval rows both were scored on (their stored
    predictions): each metric with its paired interval, and the examples that changed."""
    from llmflow import registry
    from llmflow.errors import StoreError
    from llmflow.evaluate.compare import diff_markdown
    from llmflow.evaluate.metrics import DIRECTIONS, LOWER
    from llmflow.evaluate.paired import compare, read_predictions
    from llmflow.store import Store

    store = Store()
    scored = {}
    for version in (version_a, version_b):
        ref = registry.get_version(store, name, version)
        scored[version] = registry.read_manifest(store, name, ref.version).get("eval") or {}
        if not scored[version].get("predictions_uri"):
            raise StoreError(
                f"{name}:{ref.version} has no stored predictions (never evaluated by a "
                "pipeline, or before llmflow recorded them): run `llmflow run evaluate` on it"
            )
    datasets = [scored[v].get("dataset_sha256") or "?" for v in (version_a, version_b)]
    if datasets[0] != datasets[1]:
        raise StoreError(
            f"{name}:{version_a} and {name}:{version_b} were scored on different datasets "
            f"({datasets[0][:16]} and {datasets[1][:16]}): their rows do not pair"
        )
    rows = []
    for version in (version_a, version_b):
        uri = scored[version]["predictions_uri"]
        try:
            rows.append(read_predictions(uri))
        except FileNotFoundError as exc:
            raise StoreError(f"{name}:{version}'s predictions {uri}: not found") from exc
    comparison = compare(
        rows[0],
        rows[1],
        DIRECTIONS,
        confidence,
        candidate_version=version_a,
        champion_version=version_b,
    )
    if not comparison.num_pairs:
        raise StoreError(f"{name}:{version_a} and {name}:{version_b} share no scored row")
    lower = DIRECTIONS.get(metric) == LOWER
    typer.echo(diff_markdown(comparison, rows[0], rows[1], metric, lower, examples))


def promote_config(name: str, config: Path | None, set_: list[str] | None, canary: bool):
    """The config `models promote` runs with: the file and --set, the model's name, and with
    --canary the canary strategy (the steps and policy stay the config's serve.rollout)."""
    from llmflow.configfile import load_config

    sets = [*(set_ or []), f"train.model_name={name}"]
    return load_config(config, [*sets, "serve.rollout.strategy=canary"] if canary else sets)


def _promote(
    name: str,
    version: str | None,
    config: Path | None,
    set_: list[str] | None,
    canary: bool = False,
) -> None:
    from llmflow import registry
    from llmflow.cli_common import echo
    from llmflow.cli_run import prepare_environment, quiet_unless_debug
    from llmflow.errors import RunFailed
    from llmflow.store import Store

    cfg = promote_config(name, config, set_, canary)
    prepare_environment(cfg)
    candidate = registry.get_version(Store(), name, version)
    with quiet_unless_debug(f"promote-{name}", f"promote {name}:{candidate.version}"):
        from flows.promote import promote as promote_flow

        state = promote_flow(config=cfg, candidate=candidate, return_state=True)
    if not state.is_completed():
        raise RunFailed(f"promotion of {name}:{candidate.version} failed: {state.message}")
    echo(state.result().message)


@models_app.command()
def promote(
    name: str,
    version: Annotated[str | None, typer.Argument()] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    canary: Annotated[
        bool,
        typer.Option(
            "--canary",
            help="Canary rollout for this promotion (the steps and policy of serve.rollout): "
            "the version takes a growing share of live requests, rolled back on a breach.",
        ),
    ] = False,
) -> None:
    """Serve a version and make it champion (smoke-tested; rolled back on failure)."""
    _promote(name, version, config, set_, canary)


@models_app.command()
def rollback(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Serve the previous champion again and make it champion."""
    from llmflow import aliases
    from llmflow.errors import LlmflowError
    from llmflow.store import Store

    previous = aliases.read_aliases(Store(), name).get("previous")
    if not previous:
        raise LlmflowError(f"model '{name}' has no previous version to roll back to")
    _promote(name, previous, config, set_)


@models_app.command()
def unserve(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Delete a model's Serve app and its serving record (the champion alias stays).

    `llmflow up` no longer restores it; `llmflow models promote` serves it again.
    """
    from llmflow.cli_common import echo
    from llmflow.cli_run import prepare_environment, quiet_unless_debug
    from llmflow.configfile import load_config
    from llmflow.errors import LlmflowError
    from llmflow.promote.serving import recorded
    from llmflow.promote.serving import unserve as unserve_model
    from llmflow.store import Store

    cfg = load_config(config, list(set_ or []))
    store = Store()
    if name not in {s.name for s in recorded(store)}:  # before any stack or cluster work
        raise LlmflowError(f"model '{name}' is not recorded as served (no serving.json)")
    prepare_environment(cfg)
    with quiet_unless_debug(f"unserve-{name}", f"unserve {name}"):
        app = unserve_model(store, name, cfg.cluster)
    echo(f"{name}: Serve app '{app}' deleted; `llmflow up` no longer restores it")


@models_app.command("serve-config")
def serve_config(
    rayservice: Annotated[
        Path | None,
        typer.Option(help="A KubeRay RayService manifest whose serveConfigV2 applications to set."),
    ] = None,
) -> None:
    """The served champions as Serve config applications (YAML, or into a RayService).

    The applications `llmflow up` restores; --rayservice writes them into the manifest's
    serveConfigV2, keeping the rest of it.
    """
    import yaml

    from llmflow.cli_common import echo
    from llmflow.promote.kuberay import set_applications
    from llmflow.promote.serving import serve_applications
    from llmflow.store import Store

    apps = serve_applications(Store())
    if rayservice is None:
        typer.echo(yaml.safe_dump({"applications": apps}, sort_keys=False), nl=False)
        return
    set_applications(rayservice, apps)
    echo(f"{rayservice}: serveConfigV2 carries {len(apps)} application(s)")
