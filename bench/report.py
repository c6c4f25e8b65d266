"""Run every benchmark of bench/ on the tiny default and write bench/RESULTS.md.

    .venv/bin/python bench/report.py [--only train,score] [--out bench/RESULTS.md] [--smoke]
    make bench

Each benchmark runs as its own process (as a user would run it) with --json; this script
reads the figures back and writes one table: each figure, its baseline, the ratio (measured
side by side in the same run, so it holds on a noisy machine), the target where the issue
names one, and the machine it ran on (cores, memory, load before and after). A benchmark
that fails is reported as such, with its last output line, and the others still run; the
exit status is then 1.

--smoke runs each script with --smoke (tiny sizes, the same code paths and figure keys) and
turns its figures into rows all the same, so a script that no longer runs or a figure that was
renamed fails in minutes (tests/integration/test_bench.py). It prints the table and writes it
only to an --out given: its figures measure nothing, and bench/RESULTS.md is left alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str, str, str]  # figure, value, baseline, ratio, target (met?)


def _target(ok: bool, text: str) -> str:
    return f"{text}: {'met' if ok else '**missed**'}"


def overhead(f: dict) -> list[Row]:
    return [
        (
            "no-op task on Ray (RayTaskRunner)",
            f"{f['ray_s_per_task'] * 1e3:.1f} ms",
            f"{f['thread_pool_s_per_task'] * 1e3:.1f} ms on the thread pool",
            f"{f['ray_vs_thread_pool']:.1f}x",
            "-",
        ),
        (
            "cold `llmflow up` (server, head, Serve, worker, deploy)",
            f"{f['cold_up_s']:.1f} s",
            "-",
            "-",
            "-",
        ),
        ("second `llmflow up` (all healthy)", f"{f['idempotent_up_s']:.2f} s", "-", "-", "-"),
    ]


def prepare(f: dict) -> list[Row]:
    return [
        (
            f"prepare {f['rows']:,} rows (load..GX validation..parquet)",
            f"{f['prepare_rows_per_s']:,} rows/s",
            f"{f['baseline_rows_per_s']:,} rows/s (json.loads only)",
            f"{f['prepare_vs_baseline']:.3f}x",
            "-",
        ),
        (
            "prepare peak RSS",
            f"{f['prepare_peak_rss_mb']} MB",
            f"{f['prepare_rss_before_mb']} MB after imports",
            "-",
            "-",
        ),
    ]


def train(f: dict) -> list[Row]:
    rows: list[Row] = []
    plain = f["settings"]["plain"]
    for name, r in f["settings"].items():
        if name == "plain":
            continue
        if "error" in r:
            rows.append((f"Ray Train {name}", "**failed**", "-", "-", r["error"][:80]))
            continue
        best = name == f.get("best")
        rows.append(
            (
                f"Ray Train {name} ({r['workers']} x {r['threads']} threads), {f['steps']} steps",
                f"{r['tokens_per_s']:,.0f} tokens/s",
                f"{plain['tokens_per_s']:,.0f} tokens/s (plain loop)",
                f"{r['vs_plain']:.2f}x",
                _target(r["vs_plain"] >= f["target"], f">= {f['target']}x (best setting)")
                if best
                else "-",
            )
        )
        rows.append(
            (
                f"Ray Train {name}: task start to first step",
                f"{r['to_first_step_s']:.1f} s",
                f"{plain['to_first_step_s']:.1f} s (plain)",
                "-",
                "-",
            )
        )
    rows.append(("training peak RSS (plain loop)", f"{plain['peak_rss_mb']:.0f} MB", "-", "-", "-"))
    return rows


def score(f: dict) -> list[Row]:
    ray_eps = f["ray_examples_per_s"]
    rows: list[Row] = []
    if "naive_examples_per_s" in f:
        naive = f["naive_examples_per_s"]
        rows.append(
            (
                f"Ray Data hf scoring, {f['prompts']:,} prompts (start-up included)",
                f"{ray_eps:.1f} examples/s",
                f"{naive:.1f} examples/s (one at a time)",
                f"{ray_eps / naive:.1f}x",
                _target(ray_eps / naive >= 10, ">= 10x"),
            )
        )
    local = f["local_examples_per_s"]
    rows.append(
        (
            f"Ray Data hf scoring, {f['prompts']:,} prompts (start-up included)",
            f"{ray_eps:.1f} examples/s",
            f"{local:.1f} examples/s (batched generate, no Ray)",
            f"{ray_eps / local:.2f}x",
            _target(ray_eps / local >= 0.7, ">= 0.7x"),
        )
    )
    # Where the whole job's time goes: generation inside the actors against the same work
    # in this process, and the cold start of one actor (imports + model load).
    gen_s = f["ray_generate_s"] / max(f["concurrency"], 1)
    rows.append(
        (
            "Ray Data hf scoring: time in generate (actors, start-up excluded)",
            f"{gen_s:.1f} s",
            f"{f['local_wall_s']:.1f} s (batched generate, no Ray)",
            f"{f['local_wall_s'] / gen_s:.2f}x" if gen_s else "-",
            "-",
        )
    )
    rows.append(
        (
            "cold start of one scoring actor's process (imports + model load)",
            f"{f['cold_start_s']:.1f} s",
            "-",
            "-",
            "-",
        )
    )
    if "loss_same_pass_s" in f:
        rows.append(
            (
                "scoring + eval loss, one actor pass (evaluate stage)",
                f"{f['loss_same_pass_s']:.1f} s",
                f"{f['loss_apart_s']:.1f} s (two jobs, two model loads)",
                f"{f['loss_same_pass_vs_apart']:.2f}x",
                "-",
            )
        )
    return rows


def serve(f: dict) -> list[Row]:
    c1, cpu = f["c1"], f["cpu_ms_per_request_c32"]
    return [
        (
            (
                f"Serve ({f['ingress']} ingress), concurrency 32: req/s (batch "
                f"{f['max_batch_size']}, continuous batching)"
            ),
            f"{f['served_c32_req_per_s']:.1f} req/s",
            f"{f['offline_prompts_per_s']:.1f} prompts/s (same engine batched, no Serve)",
            f"{f['served_vs_offline_c32']:.3f}x",
            _target(f["served_vs_offline_c32"] >= 0.25, ">= 0.25x"),
        ),
        (
            "Serve, concurrency 32: batched vs unbatched app",
            f"{f['served_c32_req_per_s']:.1f} req/s",
            f"{f['served_c32_req_per_s'] / f['batched_vs_unbatched_c32']:.1f} req/s (unbatched)",
            f"{f['batched_vs_unbatched_c32']:.2f}x",
            _target(f["batched_vs_unbatched_c32"] >= 4, ">= 4x"),
        ),
        (
            "Serve, concurrency 32: a no-op Serve app (Serve's ceiling here)",
            f"{f['noop_c32_req_per_s']:.1f} req/s",
            "-",
            "-",
            "-",
        ),
        (
            "Serve p50 overhead over calling the engine directly, concurrency 1",
            f"{f['serve_p50_overhead_ms_c1']:+.1f} ms",
            (
                f"direct {c1['direct']['p50_ms']:.1f} ms; a no-op app's round trip "
                f"{f['noop_p50_ms_c1']:.1f} ms"
            ),
            "-",
            _target(f["serve_p50_overhead_ms_c1"] <= 5, "<= 5 ms"),
        ),
        (
            "CPU a request at concurrency 32: replica / ingress / client",
            f"{cpu['replica']:.2f} / {cpu['ingress']:.2f} / {cpu['client']:.2f} ms",
            f"{f['generate_ms_per_prompt_offline']:.2f} ms generate (offline, a prompt)",
            "-",
            "-",
        ),
    ]


def rollout(f: dict) -> list[Row]:
    before, during = f["phases"]["before"], f["phases"]["during"]
    return [
        (
            f"rolling update under load ({f['clients']} clients, {f['rollout_s']:.0f} s rollout)",
            f"{f['failed']} failed of {f['requests']}",
            "-",
            "-",
            _target(f["failed"] == 0, "0 failed"),
        ),
        (
            "latency during the rollout: p50/p99",
            f"{during['p50_ms']:.0f}/{during['p99_ms']:.0f} ms",
            f"{before['p50_ms']:.0f}/{before['p99_ms']:.0f} ms before it",
            f"{during['p50_ms'] / max(before['p50_ms'], 1e-9):.2f}x",
            "-",
        ),
    ]


def canary(f: dict) -> list[Row]:
    def cell(setting: str, c: int) -> dict:
        return next(r for r in f["rows"] if r["setting"] == setting and r["concurrency"] == c)

    rows = []
    for c in (1, 32):
        routed, direct = cell("router", c), cell("direct", c)
        base = f"{direct['req_per_s']} req/s, {direct['p50_ms']:.0f}/{direct['p99_ms']:.0f} ms"
        rows.append(
            (
                f"canary router, concurrency {c}: req/s, p50/p99",
                f"{routed['req_per_s']} req/s, {routed['p50_ms']:.0f}/{routed['p99_ms']:.0f} ms",
                f"{base} (direct to the version app)",
                f"{routed['req_per_s'] / max(direct['req_per_s'], 1e-9):.2f}x",
                "-",
            )
        )
    rows.append(
        (
            "canary router's added p50, concurrency 1 / 32",
            f"{f['router_p50_added_ms_c1']:+.1f} / {f['router_p50_added_ms_c32']:+.1f} ms",
            "direct to the version app",
            "-",
            "report",
        )
    )
    return rows


def _resolved(s: dict) -> bool:
    return all(len(e["wall_s"]) == 2 and e["wall_s"][1] - e["wall_s"][0] >= 2.0 for e in s.values())


def _marginal(e: dict, n: int) -> str:
    """The marginal rate, or why it is not one: a T(2N) - T(N) under 2 s is the machine's
    noise, not N prompts' generation time; a smoke run has no 2N job."""
    if len(e["wall_s"]) < 2:
        return "not measured: no 2N job (smoke run)"
    extra = e["wall_s"][1] - e["wall_s"][0]
    if extra < 2.0:
        return f"not resolved: T(2N) - T(N) = {extra:+.1f} s for {n} more prompts (noise)"
    return f"{n / extra:.1f}/s"


def _seconds(value: float | None) -> str:
    return "- s" if value is None else f"{value:.0f} s"


def vllm(f: dict) -> list[Row]:
    s, v, r = f["scoring"], f["serving"], f["ratios"]
    rows: list[Row] = [
        (
            f"scoring {f['prompts']} prompts, examples/s with start-up (vllm)",
            f"{s['vllm']['examples_per_s_with_startup']:.1f}/s",
            f"{s['hf']['examples_per_s_with_startup']:.1f}/s (hf)",
            f"{r['scoring_with_startup']:.2f}x",
            "-",
        ),
        (
            "scoring, examples/s without start-up (vllm; marginal rate N vs 2N)",
            _marginal(s["vllm"], f["prompts"]),
            _marginal(s["hf"], f["prompts"]) + " (hf)",
            f"{r['scoring_without_startup']:.2f}x" if _resolved(s) else "-",
            "report (0.5-0.6x measured before on 0.57 M)",
        ),
        (
            "scoring start-up, peak added RSS (vllm)",
            f"{_seconds(s['vllm']['startup_s'])}, {s['vllm']['peak_mib']:.0f} MiB",
            f"{_seconds(s['hf']['startup_s'])}, {s['hf']['peak_mib']:.0f} MiB (hf)",
            "-",
            "-",
        ),
    ]
    for c in (1, 32):
        a, b = v["vllm"][f"c{c}"], v["hf"][f"c{c}"]
        rows.append(
            (
                f"serving, concurrency {c}: req/s, p50 (vllm)",
                f"{a['req_per_s']:.1f} req/s, {a['p50_ms']:.0f} ms",
                f"{b['req_per_s']:.1f} req/s, {b['p50_ms']:.0f} ms (hf)",
                f"{r[f'serving_c{c}']:.2f}x",
                "-",
            )
        )
    rows.append(
        (
            "serving deploy, peak added RSS (vllm)",
            f"{v['vllm']['deploy_s']:.0f} s, {v['vllm']['peak_mib']:.0f} MiB",
            f"{v['hf']['deploy_s']:.0f} s, {v['hf']['peak_mib']:.0f} MiB (hf)",
            "-",
            "-",
        )
    )
    return rows


def tiny_task(f: dict) -> list[Row]:
    return [
        (
            (
                f"tiny task: exact match on {f['eval_examples']} eval examples after "
                f"{f['steps']} steps (plain torch loop)"
            ),
            f"{f['em_after']:.3f}",
            f"{f['em_before']:.3f} before fine-tuning",
            "-",
            "-",
        ),
        (
            f"tiny task: training loss, first step / mean of the last 10 (batch {f['batch_size']})",
            f"{f['loss_first']:.3f} / {f['loss_last']:.3f}",
            "-",
            "-",
            "-",
        ),
        (
            f"tiny task: training, {f['threads']} threads",
            f"{f['tokens_per_s']:,} tokens/s, {f['train_s']:.0f} s",
            "-",
            "-",
            "-",
        ),
    ]


# name -> (script args after --json, figures -> rows)
BENCHES: dict[str, tuple[list[str], Callable[[dict], list[Row]]]] = {
    "overhead": ([], overhead),
    "prepare": ([], prepare),
    "train": ([], train),
    "score": ([], score),
    "serve": ([], serve),
    "rollout": ([], rollout),
    "canary": ([], canary),
    "engines": ([], vllm),
    "tiny_task": ([], tiny_task),
}


def machine() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
        mem = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


def run_one(name: str, tmp: Path, smoke: bool) -> tuple[list[Row], str, bool]:
    """Run bench/NAME.py with --json; returns its rows, its line for "Runs:" and whether it
    failed (the script exited non-zero, wrote no figures, or its row function raised)."""
    extra, rows_of = BENCHES[name]
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--json", str(out), *extra]
    if smoke:
        cmd.append("--smoke")
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    wall = time.monotonic() - t0
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0 or not out.exists():
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1][:160]
        row = (name, "**failed**", "-", "-", f"exit {proc.returncode}: {last}")
        return [row], f"- `{name}`: failed after {wall:.0f} s", True
    try:
        rows = rows_of(json.loads(out.read_text()))
    except Exception as exc:  # noqa: BLE001 - a figure the row function wants is missing
        print(f"{name}: the row function failed: {type(exc).__name__}: {exc}", flush=True)
        row = (name, "**failed**", "-", "-", f"row function: {type(exc).__name__}: {exc}"[:160])
        return [row], f"- `bench/{name}.py`: {wall:.0f} s, its figures unreadable", True
    failed = any(r[1] == "**failed**" for r in rows)
    return rows, f"- `bench/{name}.py`: {wall:.0f} s", failed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", help="Comma-separated benchmarks to run (default: all).")
    ap.add_argument(
        "--out",
        type=Path,
        help="Where the table goes (default bench/RESULTS.md; none with --smoke).",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="Tiny sizes: check that every benchmark still runs."
    )
    args = ap.parse_args()
    if args.out is None and not args.smoke:
        args.out = ROOT / "bench" / "RESULTS.md"
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(
            f"error: --only: unknown benchmark(s) {', '.join(unknown)}; have {', '.join(BENCHES)}"
        )

    table: list[Row] = []
    runs: list[str] = []
    failed: list[str] = []
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llmflow-bench-") as tmp:
        for name in names:
            rows, run, bad = run_one(name, Path(tmp), args.smoke)
            table.extend(rows)
            runs.append(run)
            if bad:
                failed.append(name)
    load_after = os.getloadavg()[0]

    lines = [
        "# Benchmark results"
        + (" (smoke run: tiny sizes, the figures mean nothing)" if args.smoke else ""),
        "",
        f"`make bench` ({Path(__file__).name}), {started:%Y-%m-%d %H:%M} UTC, commit {git_commit()}.",
        f"Machine: {machine()}; load average {load_before:.2f} before, {load_after:.2f} after.",
        "Each ratio compares two measurements taken side by side in the same run.",
        "",
        "| figure | value | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {' | '.join(r)} |" for r in table],
        "",
        "Runs:",
        *runs,
        "",
    ]
    print("\n".join(lines), flush=True)
    if args.out:
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text("\n".join(lines))
        os.replace(tmp_out, args.out)
        print(f"wrote {args.out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
