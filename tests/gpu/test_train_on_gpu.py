"""Ray Train on a real GPU: the use_gpu run gets nccl, CUDA and bf16 autocast, and learns.

.venv/bin/python -m pytest tests/gpu/test_train_on_gpu.py -q
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_use_gpu_run_trains_on_cuda_with_nccl(tmp_path):
    import ray

    from llmflow.basemodels import resolve_base_model
    from llmflow.configfile import load_config
    from llmflow.finetune.trainer import run_training
    from llmflow.prepare.dataset import prepare_to_store
    from llmflow.store import Store

    store = Store(tmp_path / "store")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            "train.use_gpu=true",
            "train.max_steps=60",
            "train.checkpoint_every=30",
            "train.eval_every=30",
            "train.warmup_steps=5",
        ],
    )
    model_uri = resolve_base_model(cfg.train, store)
    dataset, report, _ = prepare_to_store(cfg.data, model_uri, store)
    assert dataset is not None, report.failure_message()
    # Ray workers find the project's packages through PYTHONPATH (as bench/train.py does).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        run = run_training(cfg.train, dataset, model_uri, store)
    finally:
        ray.shutdown()
    assert run.device.startswith("cuda"), run.device
    assert run.backend == "nccl"  # the GPU backend: every cross-rank reduction on the GPU
    import torch

    assert run.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert run.metrics["steps_run"] == 60
    assert run.metrics["train_loss_last"] < run.metrics["train_loss_first"] - 1.0, run.metrics


def test_two_gpu_workers_reduce_on_their_gpus(tmp_path):
    """Two ranks on two GPUs: every cross-rank reduction (loss sums, eval loss) runs under
    NCCL on CUDA tensors. Needs two GPUs; one GPU never reduces across ranks."""
    import pytest
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    import ray

    from llmflow.basemodels import resolve_base_model
    from llmflow.configfile import load_config
    from llmflow.finetune.trainer import run_training
    from llmflow.prepare.dataset import prepare_to_store
    from llmflow.store import Store

    store = Store(tmp_path / "store")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            "train.use_gpu=true",
            "train.num_workers=2",
            "train.max_steps=30",
            "train.checkpoint_every=30",
            "train.eval_every=10",
            "train.warmup_steps=5",
        ],
    )
    model_uri = resolve_base_model(cfg.train, store)
    dataset, report, _ = prepare_to_store(cfg.data, model_uri, store)
    assert dataset is not None, report.failure_message()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)
    try:
        run = run_training(cfg.train, dataset, model_uri, store)
    finally:
        ray.shutdown()
    assert run.backend == "nccl" and run.metrics["steps_run"] == 30
    assert run.metrics["train_loss_last"] < run.metrics["train_loss_first"], run.metrics
