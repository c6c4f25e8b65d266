"""Tasks of the stack self-check flow."""

from __future__ import annotations

import os
import socket

from prefect import get_run_logger, task


def node_info(index: int) -> dict:
    """Where this code runs: host, pid, and the Ray node and worker if inside Ray."""
    info = {"index": index, "host": socket.gethostname(), "pid": os.getpid(), "ray_node": None}
    import ray

    if ray.is_initialized():  # outside Ray the node and worker are absent
        ctx = ray.get_runtime_context()
        info["ray_node"] = ctx.get_node_id()
        info["ray_worker"] = ctx.get_worker_id()
    info["prefect_api_url"] = os.environ.get("PREFECT_API_URL")
    return info


@task(name="where-am-i")
def where_am_i(index: int) -> dict:
    info = node_info(index)
    get_run_logger().info(
        "check task %d on pid %d, ray node %s", index, info["pid"], (info["ray_node"] or "-")[:12]
    )
    return info
