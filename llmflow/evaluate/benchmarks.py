"""Benchmark tasks of lm-evaluation-harness as guardrails, scored through llmflow's engines.

    eval.benchmarks.tasks -> the harness builds each task's requests -> EngineLM generates
    them with the eval engine on Ray Data (hf actors or the vLLM processor, as the eval split)
    -> the harness's filters and metrics score each document -> one row per document,
    ``<task>/<metric>`` columns, stored beside the predictions (benchmarks.parquet)

So a fine-tune that damages what the base model could do shows as a regression on
``<task>/<metric>``, compared row by row like any metric (llmflow/evaluate/paired.py) and
gated by ``gate.guardrails``. Tasks are hub task names (the harness's own, data from the hub)
or task YAML files whose data is local (``dataset_kwargs.data_files`` relative to the file).
llmflow generates; it does not compute log-likelihoods: ``generate_until`` tasks run, a
multiple-choice or perplexity task is refused in one line before any work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmflow.config import ClusterConfig, EvalConfig
from llmflow.config_eval import BenchmarksConfig
from llmflow.errors import ConfigError
from llmflow.evaluate.metrics import HIGHER, LOWER

BENCHMARKS_FILE = "benchmarks.parquet"
GENERATE = "generate_until"


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def load_task_file(name: str) -> dict[str, Any]:
    """A task YAML as the harness's task dict, its data files made absolute (relative to the
    file). Raises ConfigError naming the file and what is wrong."""
    import yaml

    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.benchmarks.tasks: {name}: no such task file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"eval.benchmarks.tasks: {name}: not YAML ({exc})") from exc
    if not isinstance(config, dict) or not config.get("task"):
        raise ConfigError(f"eval.benchmarks.tasks: {name}: a task file needs a 'task' name")
    output_type = config.get("output_type", GENERATE)
    if output_type != GENERATE:
        raise ConfigError(
            f"eval.benchmarks.tasks: {name}: output_type {output_type} (llmflow scores "
            f"{GENERATE} tasks: it generates with the eval engine, it computes no likelihoods)"
        )
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: str((path.parent / f).resolve()) for split, f in files.items()
        }
    return config


def task_directions(cfg: BenchmarksConfig) -> dict[str, str]:
    """``<task>/<metric>`` -> its direction, for the task files (their metric_list); a hub
    task's metrics are known once it ran: ``<task>/*`` stands for them until then."""
    out = {}
    for name in cfg.tasks:
        if not is_task_file(name):
            out[f"{name}/*"] = HIGHER
            continue
        config = load_task_file(name)
        for m in config.get("metric_list") or [{"metric": "exact_match"}]:
            better = m.get("higher_is_better", True)
            out[f"{config['task']}/{m['metric']}"] = HIGHER if better else LOWER
    return out


def cut_at_stop(text: str, until: Any) -> str:
    """The generation up to the first of the task's stop strings (``until``)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = len(text)
    for stop in stops:
        if stop and (i := text.find(stop)) >= 0:
            cut = min(cut, i)
    return text[:cut]


def _lm_class():
    from lm_eval.api.model import LM

    class EngineLM(LM):
        """The harness's model interface over llmflow's eval engine: each context is one user
        turn (the model's chat template applies, as for the eval split), generated greedily on
        Ray Data and cut at the task's stop strings."""

        def __init__(self, eval_cfg: EvalConfig, model_uri: str, cluster: ClusterConfig | None):
            super().__init__()
            self.eval_cfg, self.model_uri, self.cluster = eval_cfg, model_uri, cluster

        def generate_until(self, requests) -> list[str]:
            import pyarrow as pa

            from llmflow.engines import make_engine
            from llmflow.evaluate.eval_split import as_blocks

            if not requests:
                return []
            args = [r.args for r in requests]
            longest = max(
                int(kw.get("max_gen_toks") or self.eval_cfg.max_new_tokens) for _, kw in args
            )
            cfg = self.eval_cfg.model_copy(update={"max_new_tokens": longest, "temperature": 0.0})
            table = pa.table(
                {
                    "id": [str(i) for i in range(len(args))],
                    "prompt_messages": [[{"role": "user", "content": ctx}] for ctx, _ in args],
                    "reference": [""] * len(args),
                    "question": [ctx for ctx, _ in args],
                }
            )
            engine = make_engine(cfg.engine, cfg, self.model_uri, self.cluster)
            out = {
                str(r["id"]): str(r["generation"])
                for r in engine.generate(as_blocks(table, cfg.batch_size)).iter_rows()
            }
            return [cut_at_stop(out[str(i)], kw.get("until")) for i, (_, kw) in enumerate(args)]

        def loglikelihood(self, requests):
            raise ConfigError(f"eval.benchmarks: llmflow scores {GENERATE} tasks only")

        def loglikelihood_rolling(self, requests):
            raise ConfigError(f"eval.benchmarks: llmflow scores {GENERATE} tasks only")

    return EngineLM


def run_benchmarks(
    cfg: BenchmarksConfig,
    eval_cfg: EvalConfig,
    model_uri: str,
    cluster: ClusterConfig | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, str]]:
    """Every task on ``model_uri``: (``<task>/<metric>`` -> its mean, one row per document
    with its per-document scores, ``<task>/<metric>`` -> direction)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [load_task_file(t) if is_task_file(t) else t for t in cfg.tasks]
    # Indexing the harness's own tasks takes ~8 s: only when a hub task is named.
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    results = simple_evaluate(
        model=_lm_class()(eval_cfg, model_uri, cluster),
        tasks=tasks,
        task_manager=manager,
        limit=cfg.limit,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        verbosity="ERROR",
    )
    rows, directions = [], {}
    for task, samples in results["samples"].items():
        for m, better in results["higher_is_better"].get(task, {}).items():
            directions[f"{task}/{m}"] = HIGHER if better else LOWER
        for s in samples:
            suffix = "" if s.get("filter", "none") == "none" else f"/{s['filter']}"
            row = {
                "id": f"{task}{suffix}/{s['doc_id']}",
                "question": str(s["arguments"][0][0]) if s.get("arguments") else "",
                "reference": str(s.get("target", "")),
                "generation": str((s.get("filtered_resps") or [""])[0]),
            }
            for m in s.get("metrics", []):
                row[f"{task}/{m}{suffix}"] = float(s[m])
                directions.setdefault(f"{task}/{m}{suffix}", directions.get(f"{task}/{m}", HIGHER))
            rows.append(row)
    metrics = {}
    for name in sorted({k for r in rows for k in r if "/" in k}):
        values = [r[name] for r in rows if name in r and not math.isnan(r[name])]
        metrics[name] = sum(values) / len(values) if values else math.nan
    return metrics, rows, directions
