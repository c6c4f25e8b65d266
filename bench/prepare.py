"""Rows/s and peak memory of the prepare stage on 100k synthetic rows.

    .venv/bin/python bench/prepare.py [--rows 100000] [--smoke] [--json out.json]

Side by side in one run, each in a fresh child process (so peak RSS is its own):
  baseline  read the JSONL and json.loads every line (the I/O floor)
  prepare   llmflow.prepare.dataset.prepare_to_store: load, normalise, clean, count tokens with the
            tiny model's tokenizer, split, validate with Great Expectations, write Parquet
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _forkserver import small_forkserver
from _smoke import parse_with_smoke

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _baseline(path: str, q) -> None:
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
            n += 1
    q.put((n, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _prepare(path: str, store_root: str, model_uri: str, q) -> None:
    import great_expectations  # noqa: F401

    import llmflow.prepare.validation  # noqa: F401 - import cost is not per-row work
    from llmflow.config import DataConfig
    from llmflow.prepare.dataset import prepare_to_store
    from llmflow.store import Store

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = DataConfig(source=path, min_rows=10)
    t0 = time.perf_counter()
    ref, report, _ = prepare_to_store(cfg, model_uri, Store(store_root))
    dt = time.perf_counter() - t0
    assert ref is not None, report.failure_message()
    q.put((report.num_input, dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parse_with_smoke(ap, {"rows": 500})
    ctx, q = small_forkserver()  # before heavy imports: children measure their own peak

    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import generate_examples, write_examples
    from llmflow.config import TrainConfig
    from llmflow.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="llmflow-bench-prepare-"))
    src = tmp / "rows.jsonl"
    write_examples(generate_examples(args.rows, seed=1), src)
    model_uri = resolve_base_model(TrainConfig(), Store(tmp / "store"))

    p = ctx.Process(target=_baseline, args=(str(src), q))
    p.start()
    n_b, t_b, rss_b = q.get()
    p.join()
    p = ctx.Process(target=_prepare, args=(str(src), str(tmp / "store"), model_uri, q))
    p.start()
    n_p, t_p, rss_p, rss_p0 = q.get()
    p.join()

    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "rows": n_p,
        "baseline_rows_per_s": round(n_b / t_b),
        "prepare_rows_per_s": round(n_p / t_p),
        "prepare_vs_baseline": round((n_p / t_p) / (n_b / t_b), 3),
        "prepare_s": round(t_p, 2),
        "prepare_peak_rss_mb": round(rss_p / 1024),
        "prepare_rss_before_mb": round(rss_p0 / 1024),
        "baseline_peak_rss_mb": round(rss_b / 1024),
    }
    print(f"machine: {figures['machine']}")
    print(
        f"baseline (json.loads per line): {n_b} rows in {t_b:.2f} s = {n_b / t_b:,.0f} rows/s, peak RSS {rss_b / 1024:.0f} MB"
    )
    print(
        f"prepare (load..validate..parquet): {n_p} rows in {t_p:.2f} s = {n_p / t_p:,.0f} rows/s, "
        f"peak RSS {rss_p / 1024:.0f} MB (after imports {rss_p0 / 1024:.0f} MB)"
    )
    print(f"prepare vs baseline: {figures['prepare_vs_baseline']}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
