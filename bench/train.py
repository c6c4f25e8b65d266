"""Benchmark: tokens/s of the Ray Train fine-tune (1 and 2 workers) against a plain loop.

    .venv/bin/python bench/train.py [--steps 400] [--cpus 2] [--ray ray-1,ray-2] [--smoke]
        [--json out.json]

Same tiny model, same prepared dataset (the bundled task, prepared into a temporary store),
same batches and learning rate (configs/tiny.yaml: batch 16, lr 3e-3), side by side in one run:
  plain   a single-process torch loop, torch.set_num_threads(--cpus), in a fresh child
          process (so its peak RSS is its own). It does what llmflow.finetune.loop.train_loop does
          with the same pure helpers (read_rows, encode_rows, load_model, batch_indices,
          collate, lr_at): the same rows per step, then the loop's closing eval loss and
          checkpoint save, which train_loop also times.
  ray-1   llmflow.finetune.trainer.run_training: 1 worker x --cpus threads.
  ray-2   run_training: 2 workers x --cpus/2 threads, batch 8 each (the same 16 rows per
          step; --per-worker-batch gives each worker 16, so 32 rows per step).
Ray is a private local instance started here (num_cpus=2*--cpus, no dashboard); each run
gets a fresh storage directory, so it never resumes. eval_every and checkpoint_every are set
to --steps: one eval and one checkpoint, after the last step, in every setting.
400 steps (the tiny config trains 300): at 100 the loop lasts ~3 s and the first steps'
warm-up dominates (measured 0.68x at 100 steps against 0.95x at 400, same quiet machine).

Figures per setting: tokens/s over the loop (first step to loop end, as train_loop reports
it; the plain loop also gives steps-only tokens/s), wall time (fit for Ray, child process
start to exit for plain), time from task start to the first step (fit() called for Ray,
process start for plain: both include imports, data and model loading), peak RSS (the plain
child's ru_maxrss; for Ray, psutil samples every 0.1 s of the train worker processes: the
largest and the sum, and of the whole local Ray instance), and tokens/s vs the plain loop.
Prints figures; asserts nothing. The machine's load goes straight into the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _forkserver import small_forkserver
from _smoke import parse_with_smoke

# Ray workers are started by the raylet, which inherits this environment: they find the
# project's `tasks` package and the offline switches this way.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


# -- the plain loop (a child process) ---------------------------------------------------------
def _plain(train_cfg: dict, base_model: str, dataset_uri: str, threads: int, q) -> None:
    """train_loop without Ray: same data, model, batches, schedule, closing eval + checkpoint."""
    t_start = time.time()
    import torch

    from llmflow.basemodels import load_tokenizer
    from llmflow.config import TrainConfig
    from llmflow.finetune.batches import (
        IGNORE_INDEX,
        batch_indices,
        collate,
        encode_rows,
        lr_at,
        read_rows,
    )
    from llmflow.finetune.loop import (
        EVAL_BATCH_SIZE,
        MAX_EVAL_ROWS,
        MAX_GRAD_NORM,
        load_model,
        trainable_state,
    )

    train = TrainConfig.model_validate(train_cfg)
    torch.set_num_threads(threads)
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(base_model)
    data = encode_rows(tokenizer, read_rows(dataset_uri, "train"))
    eval_data = encode_rows(tokenizer, read_rows(dataset_uri, "eval")[:MAX_EVAL_ROWS])
    model = load_model(base_model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    model.train()
    losses, tokens = [], 0
    t_first_step = time.time()
    for step in range(train.max_steps):
        lr = lr_at(step, train.learning_rate, train.warmup_steps, train.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = n_target = 0.0
        for micro in range(train.grad_accum):
            idx = batch_indices(
                len(data), train.seed, step, micro, train.grad_accum, 0, 1, train.batch_size
            )
            b = collate([data[i] for i in idx], tokenizer.pad_token_id)
            loss = model(**b).loss
            (loss / train.grad_accum).backward()
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += loss.item() * n
            n_target += n
            tokens += int(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / max(1.0, n_target))
    t_steps_end = time.time()
    # What train_loop does after its last step (and counts in its train_s): eval, checkpoint.
    model.eval()
    with torch.no_grad():
        for i in range(0, len(eval_data), EVAL_BATCH_SIZE):
            float(model(**collate(eval_data[i : i + EVAL_BATCH_SIZE], tokenizer.pad_token_id)).loss)
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {
                "model": trainable_state(model),
                "optimizer": opt.state_dict(),
                "step": train.max_steps,
            },
            Path(d) / "train_state.pt",
        )
    t_end = time.time()
    q.put(
        {
            "t_start": t_start,
            "t_first_step": t_first_step,
            "t_end": t_end,
            "steps_s": t_steps_end - t_first_step,
            "train_s": t_end - t_first_step,
            "tokens": tokens,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


# -- memory sampling --------------------------------------------------------------------------
class RssSampler:
    """Peak RSS (MB) of this process's descendants, sampled every ``every`` seconds.

    ``peak_by_kind``: the largest single process whose command line holds each marker, the
    peak of their sum, and the peak of the sum over all descendants (the whole local Ray).
    """

    def __init__(self, markers: tuple[str, ...], every: float = 0.1):
        self.markers, self.every = markers, every
        self.peak_one = {m: 0.0 for m in markers}
        self.peak_sum = {m: 0.0 for m in markers}
        self.peak_all = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        cmdlines: dict[int, str] = {}
        while not self._stop.is_set():
            sums = {m: 0.0 for m in self.markers}
            total = 0.0
            for p in me.children(recursive=True):
                try:
                    if p.pid not in cmdlines or not any(m in cmdlines[p.pid] for m in self.markers):
                        cmdlines[p.pid] = " ".join(p.cmdline())  # the title changes once
                    rss = p.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                for m in self.markers:
                    if m in cmdlines[p.pid]:
                        sums[m] += rss
                        self.peak_one[m] = max(self.peak_one[m], rss)
            for m in self.markers:
                self.peak_sum[m] = max(self.peak_sum[m], sums[m])
            self.peak_all = max(self.peak_all, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--cpus", type=int, default=2, help="Cores used by every setting.")
    ap.add_argument(
        "--per-worker-batch",
        action="store_true",
        help="ray-2: batch 16 per worker (32 rows per step) instead of 8.",
    )
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument(
        "--ray",
        default="ray-1,ray-2",
        help="The Ray Train settings to run (a smoke run: ray-2, the path with two workers).",
    )
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    # A smoke run trains through Ray once: a Ray Train fit is ~40 s here, mostly start-up.
    args = parse_with_smoke(ap, {"steps": 5, "ray": "ray-2"})
    ray_names = args.ray.split(",")
    if set(ray_names) - {"ray-1", "ray-2"}:
        ap.error(f"--ray: ray-1 and/or ray-2, not {args.ray!r}")

    ctx, q = small_forkserver()  # before heavy imports: children measure their own peak

    from llmflow.basemodels import resolve_base_model
    from llmflow.configfile import load_config
    from llmflow.prepare.dataset import prepare_to_store
    from llmflow.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="llmflow-bench-train-"))
    store = Store(tmp / "store")
    base = load_config(ROOT / "configs" / "tiny.yaml")
    t0 = time.perf_counter()
    model_uri = resolve_base_model(base.train, store)
    dataset, report, _ = prepare_to_store(base.data, model_uri, store)
    assert dataset is not None, report.failure_message()
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"setup (tiny model + prepared bundled task): {time.perf_counter() - t0:.1f} s; "
        f"dataset {dataset.uri}"
    )

    common = [
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.max_failures=0",
    ]
    half = max(1, args.cpus // 2)
    half_batch = (
        base.train.batch_size if args.per_worker_batch else max(1, base.train.batch_size // 2)
    )
    settings = {
        "plain": (load_config(ROOT / "configs" / "tiny.yaml", common).train, args.cpus),
        "ray-1": (
            load_config(
                ROOT / "configs" / "tiny.yaml",
                common + ["train.num_workers=1", f"train.cpus_per_worker={args.cpus}"],
            ).train,
            args.cpus,
        ),
        "ray-2": (
            load_config(
                ROOT / "configs" / "tiny.yaml",
                common
                + [
                    "train.num_workers=2",
                    f"train.cpus_per_worker={half}",
                    f"train.batch_size={half_batch}",
                ],
            ).train,
            half,
        ),
    }
    rows: dict[str, dict] = {}

    # (1) the plain loop, in a fresh child process.
    train, threads = settings["plain"]
    with RssSampler(("forkserver",)) as sampler:
        t0 = time.time()
        p = ctx.Process(
            target=_plain, args=(train.model_dump(mode="json"), model_uri, dataset.uri, threads, q)
        )
        p.start()
        out = None
        while out is None:
            try:
                out = q.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty: is the child still there?
                if not p.is_alive():
                    raise SystemExit(f"plain loop died (exit code {p.exitcode})") from None
        p.join()
        wall = time.time() - t0
    rows["plain"] = {
        "workers": 1,
        "threads": threads,
        "rows_per_step": train.batch_size,
        "tokens": out["tokens"],
        "train_s": out["train_s"],
        "tokens_per_s": out["tokens"] / out["train_s"],
        "steps_only_tokens_per_s": out["tokens"] / out["steps_s"],
        "wall_s": wall,
        "to_first_step_s": out["t_first_step"] - t0,
        "peak_rss_mb": out["ru_maxrss_mb"],
        "peak_rss_sampled_mb": sampler.peak_one["forkserver"],
        "loss_first": out["loss_first"],
        "loss_last": out["loss_last"],
    }
    print(f"plain: {rows['plain']['tokens_per_s']:.0f} tokens/s, wall {wall:.1f} s")

    # (2) Ray Train through the project's run_training, on a private local Ray.
    import ray

    from llmflow.finetune.trainer import run_training

    t0 = time.time()
    ray.init(
        address="local",
        num_cpus=2 * args.cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    ray_init_s = time.time() - t0
    try:
        for name in ray_names:
            train, threads = settings[name]
            runs = Store(tmp / f"runs-{name}")  # fresh: a run here never resumes
            with RssSampler(("RayTrainWorker", "TrainController")) as sampler:
                t0 = time.time()
                try:
                    run = run_training(train, dataset, model_uri, runs)
                except Exception as exc:  # noqa: BLE001 - report it, go on with the next
                    print(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                    rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                wall = time.time() - t0
            m = run.metrics
            rows[name] = {
                "workers": train.num_workers,
                "threads": threads,
                "rows_per_step": train.batch_size * train.num_workers,
                "tokens": m["tokens"],
                "train_s": m["train_s"],
                "tokens_per_s": m["tokens_per_s"],
                "wall_s": m["fit_s"],
                "call_s": wall,
                "to_first_step_s": m["startup_s"],
                "worker_setup_s": m["worker_setup_s"],
                "peak_rss_mb": sampler.peak_one["RayTrainWorker"],
                "workers_rss_sum_mb": sampler.peak_sum["RayTrainWorker"],
                "controller_rss_mb": sampler.peak_one["TrainController"],
                "ray_all_rss_mb": sampler.peak_all,
                "loss_first": m["train_loss_first"],
                "loss_last": m["train_loss_last"],
                "steps_run": m["steps_run"],
            }
            print(f"{name}: {m['tokens_per_s']:.0f} tokens/s, fit {m['fit_s']:.1f} s")
    finally:
        ray.shutdown()

    plain_tps = rows["plain"]["tokens_per_s"]
    for r in rows.values():
        if "tokens_per_s" in r:
            r["vs_plain"] = r["tokens_per_s"] / plain_tps

    print()
    print(
        f"steps {args.steps}, batch {base.train.batch_size} rows/step (ray-2: "
        f"{rows.get('ray-2', {}).get('rows_per_step', '-')}), lr {base.train.learning_rate}, "
        f"{args.cpus} cores per setting; ray.init {ray_init_s:.1f} s (not counted)"
    )
    head = (
        f"{'setting':<8} {'workers x thr':>13} {'tokens/s':>9} {'vs plain':>9} {'loop s':>7} "
        f"{'wall s':>7} {'1st step s':>10} {'peak RSS MB':>12} {'loss first->last':>17}"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<8} FAILED: {r['error']}")
            continue
        rss = f"{r['peak_rss_mb']:.0f}" + (
            f" (sum {r['workers_rss_sum_mb']:.0f})" if r["workers"] > 1 else ""
        )
        print(
            f"{name:<8} {r['workers']:>9} x {r['threads']:<1} {r['tokens_per_s']:>9.0f} "
            f"{r['vs_plain']:>8.2f}x {r['train_s']:>7.1f} {r['wall_s']:>7.1f} "
            f"{r['to_first_step_s']:>10.1f} {rss:>12} "
            f"{r['loss_first']:>8.3f}->{r['loss_last']:.3f}"
        )
    print()
    print(
        f"plain: steps-only {rows['plain']['steps_only_tokens_per_s']:.0f} tokens/s (without "
        f"the closing eval + checkpoint); peak RSS sampled {rows['plain']['peak_rss_sampled_mb']:.0f} MB"
    )
    for name in ray_names:
        r = rows[name]
        if "error" not in r:
            print(
                f"{name}: worker setup {r['worker_setup_s']:.1f} s of {r['to_first_step_s']:.1f} s "
                f"to first step; run_training call {r['call_s']:.1f} s; controller RSS "
                f"{r['controller_rss_mb']:.0f} MB; whole local Ray peak {r['ray_all_rss_mb']:.0f} MB"
            )
    ok = {n: r["vs_plain"] for n, r in rows.items() if n != "plain" and "vs_plain" in r}
    best = max(ok, key=ok.get) if ok else None
    if best:
        verdict = "meets" if ok[best] >= args.target else "misses"
        print(
            f"best Ray Train setting: {best} at {ok[best]:.2f}x the plain loop's tokens/s "
            f"({verdict} the {args.target}x target)"
        )
    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_end": os.getloadavg()[0],
        "steps": args.steps,
        "cpus": args.cpus,
        "ray_init_s": ray_init_s,
        "settings": rows,
        "best": best,
        "best_vs_plain": ok.get(best) if best else None,
        "target": args.target,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
