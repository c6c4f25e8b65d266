"""Per-task overhead of the RayTaskRunner against Prefect's default runner, and a cold `up`.

    .venv/bin/python bench/overhead.py [--tasks 50] [--smoke] [--json out.json]

Starts a fresh local stack (temporary LLMFLOW_HOME, free ports) and times it: that is the
cold `llmflow up`. Then runs the same flow of N no-op tasks on Prefect's default thread
pool and on llmflow's ClusterTaskRunner (Ray), side by side against that stack's server,
and prints seconds per task and their ratio. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _serving import free_ports
from _smoke import parse_with_smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    # As many tasks as the warm-up run: its Ray workers take them (a start each is ~3 s here).
    args = parse_with_smoke(ap, {"tasks": 2})

    home = tempfile.mkdtemp(prefix="llmflow-bench-")
    # Every port the stack binds, as tests/conftest.py does: on their defaults (8080, 10001,
    # 8404, 9101) the metrics, Ray client and HAProxy ports would collide with a stack that
    # `llmflow up` started on this machine.
    from llmflow.settings import STACK_PORTS

    ports = free_ports(len(STACK_PORTS))
    os.environ.update({f"LLMFLOW_{name}_PORT": str(p) for name, p in zip(STACK_PORTS, ports)})
    os.environ.update(
        {
            "LLMFLOW_HOME": home,
            "LLMFLOW_STORE": str(Path(home) / "store"),
            "LLMFLOW_WORK_POOL": "llmflow-bench",
        }
    )
    from llmflow import processes, settings, stack

    settings.apply_offline_defaults()
    s = settings.StackSettings.from_env()
    t0 = time.perf_counter()
    stack.up(s, with_deploy=True)
    cold_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack.up(s, with_deploy=False)
    warm_up = time.perf_counter() - t0
    os.environ.update(processes.client_env(s))
    try:
        from prefect import flow, task
        from prefect.task_runners import ThreadPoolTaskRunner

        from llmflow.cluster import ClusterTaskRunner

        @task
        def noop(i: int) -> int:
            return i

        def make(runner):
            @flow(task_runner=runner)
            def many(n: int) -> int:
                return sum(noop.map(range(n)).result())

            return many

        results = {}
        # One warm-up run each: imports, worker start-up and the Ray connection are paid once.
        for name, runner in (("thread pool", ThreadPoolTaskRunner()), ("ray", ClusterTaskRunner())):
            f = make(runner)
            f(2)
            t0 = time.perf_counter()
            assert f(args.tasks) == sum(range(args.tasks))
            results[name] = time.perf_counter() - t0
    finally:
        stack.down(s)

    n = args.tasks
    per = {k: v / n for k, v in results.items()}
    figures = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "tasks": n,
        "cold_up_s": round(cold_up, 2),
        "idempotent_up_s": round(warm_up, 2),
        "thread_pool_s_per_task": round(per["thread pool"], 4),
        "ray_s_per_task": round(per["ray"], 4),
        "ray_vs_thread_pool": round(per["ray"] / per["thread pool"], 2),
    }
    print(f"machine: {figures['machine']}")
    print(f"cold `llmflow up` (server + head + serve + worker + deploy): {cold_up:.1f} s")
    print(f"second `llmflow up` (everything healthy, starts nothing):     {warm_up:.1f} s")
    print(
        f"{n} no-op tasks, thread pool: {results['thread pool']:.2f} s ({per['thread pool'] * 1e3:.1f} ms/task)"
    )
    print(f"{n} no-op tasks, Ray:         {results['ray']:.2f} s ({per['ray'] * 1e3:.1f} ms/task)")
    print(f"Ray per-task overhead vs thread pool: {figures['ray_vs_thread_pool']}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
