"""Batch scoring of a model on an eval split with Ray Data: generate, score, report.

    eval.parquet -> split_chats -> engine.generate (Ray Data: actor pool / vLLM) -> score_row
                 -> predictions.parquet + EvalReport (metrics, engine, throughput)

plus a teacher-forced pass (eval loss, perplexity) over the same rows. Every Ray Data
function here is named and pure enough to test alone. tasks/evaluate.py's @task adds the
Prefect side (caching, artifacts: compare.py's ``worst_examples``, ``comparison_rows``).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from llmflow.config import ClusterConfig, EvalConfig
from llmflow.evaluate.compare import basename
from llmflow.evaluate.eval_split import (
    as_blocks,
    chat_requests,
    check_eval_split,
    read_eval_split,
    read_manifest,
)
from llmflow.refs import EvalReport

PREDICTIONS_FILE = "predictions.parquet"


@functools.lru_cache(maxsize=8)
def _metrics(extra: tuple[str, ...]):
    from llmflow.evaluate.metrics import load_metrics

    return load_metrics(extra)


def score_row(row: dict[str, Any], extra_metrics: tuple[str, ...] = ()) -> dict[str, Any]:
    """The row with one column per metric of its generation against its reference."""
    from llmflow.evaluate.metrics import score_example

    scores = score_example(
        str(row["generation"]), str(row["reference"]), _metrics(tuple(extra_metrics))
    )
    return {**row, **scores}


class TeacherForcedLoss:
    """A Ray Data class UDF: summed reply-token loss and token count of each chat."""

    def __init__(self, model_path: str, torch_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from llmflow.basemodels import load_tokenizer
        from llmflow.engines import local_model_dir

        if torch_threads:
            torch.set_num_threads(torch_threads)
        path = local_model_dir(model_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False
        ).to(device)
        self.model.eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from llmflow.engines.hf import to_messages
        from llmflow.engines.losses import example_losses

        chats = [to_messages(c) for c in batch["messages"]]
        losses = example_losses(self.model, self.tokenizer, chats)
        return {
            "id": batch["id"],
            "loss_sum": np.array([s for s, _ in losses], dtype=np.float64),
            "loss_tokens": np.array([n for _, n in losses], dtype=np.int64),
        }


def _ensure_ray() -> None:
    """Connect to LLMFLOW_RAY_ADDRESS, or start a private local instance, if not connected.

    A bare ray.init() would attach to whichever cluster started last on this machine; the
    flow's task runner has normally connected already, so this is the plain-function path.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("LLMFLOW_RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")


def percentile(values: Sequence[float], q: float, method: str = "linear") -> float:
    """The q-th percentile (0..100) of ``values``; nan for no values. ``method`` is
    numpy.percentile's: "linear" interpolates, "inverted_cdf" is the nearest rank."""
    import numpy as np

    if not values:
        return float("nan")
    return float(np.percentile(values, q, method=method))


def throughput(rows: Sequence[Mapping[str, Any]], wall_s: float) -> dict[str, float]:
    """examples/s, generated tokens/s over the wall time, and per-batch latency p50/p95."""
    batches: dict[str, float] = {}
    for r in rows:
        batches.setdefault(str(r["batch_id"]), float(r["latency_s"]))
    tokens = sum(int(r["num_generated_tokens"]) for r in rows)
    lat = list(batches.values())
    return {
        "examples_per_s": len(rows) / wall_s if wall_s > 0 else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "wall_s": wall_s,
        "batches": float(len(lat)),
    }


def generate_predictions(
    eval_cfg: EvalConfig,
    model_uri: str,
    dataset_uri: str,
    engine_options: dict | None = None,
    with_loss: bool = False,
    cluster: ClusterConfig | None = None,
    progress_run: str | None = None,
    progress_key: str = "score",
) -> tuple[list[dict[str, Any]], str, float]:
    """Run the generation and per-row scoring job; returns (rows, engine name, wall seconds).

    Ray Data runs what needs the actors: the engine. The driver splits the chats before and
    scores the rows after (about 50 us a row each, 0.4 s for 5,000 rows), as every row comes
    back to it anyway; as Ray Data stages they took a worker process of their own, 3.6 CPU s
    on 2 cores (measured), next to the actors' start-up. The wall time covers the whole job:
    reading the split, the actors' start-up (model load), generation and scoring.

    ``with_loss``: the hf engine's actors also compute each row's teacher-forced loss
    (``loss_sum``, ``loss_tokens``), loading the model once for both; other engines leave
    those columns out (``eval_loss`` then runs its own job). ``progress_run``: the flow run
    whose terminal counts the rows as they come back (llmflow.progress).
    """
    from llmflow import progress
    from llmflow.engines import make_engine, select_engine

    options = dict(engine_options or {})
    loss_in_engine = (
        with_loss and select_engine(eval_cfg.engine, cluster, eval_cfg.vllm_placement) == "hf"
    )
    if loss_in_engine:
        options["with_loss"] = True
    engine = make_engine(eval_cfg.engine, eval_cfg, model_uri, cluster, **options)
    t0 = time.perf_counter()
    table = read_eval_split(dataset_uri, eval_cfg.max_examples)
    requests = chat_requests(table, keep_messages=loss_in_engine)
    generated = []
    for row in engine.generate(as_blocks(requests, eval_cfg.batch_size)).iter_rows():
        generated.append(row)
        progress.report(progress_run, progress_key, len(generated), requests.num_rows)
    progress.report(progress_run, progress_key, len(generated), requests.num_rows, final=True)
    extra = tuple(eval_cfg.extra_metrics)
    rows = [score_row(row, extra) for row in generated]
    return rows, engine.name, time.perf_counter() - t0


def eval_loss(
    eval_cfg: EvalConfig, model_uri: str, dataset_uri: str, num_cpus: float | None = None
) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """Teacher-forced eval loss and perplexity over the eval split, and each row's loss.

    One actor, reserving ``num_cpus`` (default ``eval_cfg.cpus_per_actor``).
    """
    import ray

    from llmflow.evaluate.metrics import loss_summary

    batch_size = min(eval_cfg.batch_size, 32)
    ds = as_blocks(read_eval_split(dataset_uri, eval_cfg.max_examples), batch_size)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    num_cpus = eval_cfg.cpus_per_actor if num_cpus is None else num_cpus
    threads = eval_cfg.threads_per_actor or max(1, int(num_cpus))
    ds = ds.map_batches(
        TeacherForcedLoss,
        fn_constructor_kwargs={"model_path": model_uri, "torch_threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=num_cpus,
        num_gpus=gpus,
    )
    per_row = {str(r["id"]): (float(r["loss_sum"]), int(r["loss_tokens"])) for r in ds.take_all()}
    total = sum(s for s, _ in per_row.values())
    tokens = sum(n for _, n in per_row.values())
    return loss_summary(total, tokens), per_row


PREDICTION_COLUMNS = (
    "id",
    "question",
    "reference",
    "generation",
    "num_prompt_tokens",
    "num_generated_tokens",
    "prompt_truncated",
    "empty_generation",
    "latency_s",
)


def predictions_table(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]):
    """The predictions as an Arrow table, one row per example, sorted by id."""
    import pyarrow as pa

    cols = [
        *PREDICTION_COLUMNS,
        *metric_names,
        *(["eval_loss", "eval_loss_tokens"] if rows and "eval_loss" in rows[0] else []),
    ]
    ordered = sorted(rows, key=lambda r: str(r["id"]))
    return pa.table({c: [_plain(r.get(c)) for r in ordered] for c in cols})


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def score_dataset(
    eval_cfg: EvalConfig,
    model_uri: str,
    dataset_uri: str,
    out_uri: str,
    *,
    model_version: str | None = None,
    dataset_sha256: str | None = None,
    engine_options: dict[str, Any] | None = None,
    with_loss: bool = True,
    cluster: ClusterConfig | None = None,
    progress_run: str | None = None,
    progress_key: str = "score",
) -> EvalReport:
    """Score ``model_uri`` on the eval split of ``dataset_uri`` and write its predictions.

    Args:
        eval_cfg: engine, batch size, concurrency, max_new_tokens, temperature, max_examples,
            extra metrics.
        model_uri: a saved model directory (safetensors), local or in the store.
        dataset_uri: a prepared dataset directory holding eval.parquet.
        out_uri: the directory receiving predictions.parquet (atomically, via Store).
        model_version, dataset_sha256: for the report; read from the directories'
            manifest.json (else their names) when not given.
        engine_options: engine knobs over eval_cfg (hf: num_cpus, torch_threads, num_gpus, seed).
        with_loss: also compute teacher-forced eval loss and perplexity.
        cluster: the cluster section: where the vLLM engine environment is (vllm engine).

    Returns:
        The EvalReport: mean metrics, eval loss and perplexity, counts of truncated prompts
        and empty generations, the engine used and its throughput.

    Raises:
        EvalDataError: the eval split is missing, empty or malformed.
        ModelError: the model directory lacks config, tokenizer or safetensors weights.
    """
    from llmflow.engines import check_model_dir, select_engine
    from llmflow.evaluate.metrics import aggregate, load_metrics, loss_summary
    from llmflow.store import Store

    # Everything that can be wrong with the inputs fails here, before any cluster work.
    check_model_dir(model_uri)
    check_eval_split(dataset_uri)
    select_engine(eval_cfg.engine, cluster, eval_cfg.vllm_placement)
    metric_names = list(load_metrics(eval_cfg.extra_metrics))

    _ensure_ray()
    rows, engine_name, wall_s = generate_predictions(
        eval_cfg,
        model_uri,
        dataset_uri,
        engine_options,
        with_loss=with_loss,
        cluster=cluster,
        progress_run=progress_run,
        progress_key=progress_key,
    )
    metrics = aggregate(rows, metric_names)
    metrics["truncated_prompts"] = float(sum(bool(r["prompt_truncated"]) for r in rows))
    metrics["empty_generations"] = float(sum(bool(r["empty_generation"]) for r in rows))
    if with_loss:
        if rows and "loss_sum" in rows[0]:  # the engine computed it in the same pass
            per_row = {str(r["id"]): (float(r["loss_sum"]), int(r["loss_tokens"])) for r in rows}
            total = sum(s for s, _ in per_row.values())
            loss = loss_summary(total, sum(n for _, n in per_row.values()))
        else:
            num_cpus = (engine_options or {}).get("num_cpus")
            loss, per_row = eval_loss(eval_cfg, model_uri, dataset_uri, num_cpus=num_cpus)
        metrics.update(loss)
        for r in rows:
            s, n = per_row.get(str(r["id"]), (float("nan"), 0))
            r["eval_loss"] = s / n if n else float("nan")
            r["eval_loss_tokens"] = n  # the weight of the row in the report's eval_loss

    table = predictions_table(rows, metric_names)
    predictions_uri = Store(out_uri).write_parquet(table, PREDICTIONS_FILE)

    model_manifest = read_manifest(model_uri).get("ref", {})
    data_manifest = read_manifest(dataset_uri).get("ref", {})
    return EvalReport(
        model_uri=model_uri,
        model_version=model_version or model_manifest.get("version") or basename(model_uri),
        dataset_sha256=dataset_sha256 or data_manifest.get("sha256") or basename(dataset_uri),
        engine=engine_name,
        metrics=metrics,
        num_examples=len(rows),
        device=",".join(sorted({str(r["device"]) for r in rows if r.get("device")})) or None,
        predictions_uri=predictions_uri,
        throughput=throughput(rows, wall_s),
    )
