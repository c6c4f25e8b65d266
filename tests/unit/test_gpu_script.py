"""The GPU memory check (tests/gpu/memory_plan.py) runs its steps on CPU at reduced sizes, so
the script a lent GPU runs first cannot rot between sessions (about 15 s)."""

from __future__ import annotations

import json

import torch

from llmflow.configfile import load_config
from tests.gpu import memory_plan
from tests.real_shapes import PHI3_CFG, QWEN_CFG


def test_the_gpu_memory_check_runs_every_step_on_cpu(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert memory_plan.main(["--cpu", "--json", str(out)]) == 0
    results = {r["model"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == ["phi3", "qwen"]
    tokens = memory_plan.SMALL_TOKENS
    for name, path in (("qwen", QWEN_CFG), ("phi3", PHI3_CFG)):
        r, cfg = results[name], load_config(path)
        assert r["train"]["micro_batch"] == [cfg.train.batch_size, tokens]
        assert r["train"]["plan_gb"] > 0 and r["train"]["peak_gb"] is None  # nothing measured
        assert all(0 < loss < 10 for loss in r["train"]["loss"]), r["train"]
        # The resume starts at the checkpoint's step with AdamW's moments on the model's device.
        assert r["resume"]["start_step"] == 2 and r["resume"]["moments_on"] == ["cpu"]
        assert r["eval_loss"]["tokens_scored"] == cfg.eval.batch_size * (tokens - tokens // 2)
        assert r["scoring"]["new_tokens"] == cfg.eval.max_new_tokens
    table = capsys.readouterr().out
    assert "qwen   resume     from step 2, AdamW moments on cpu" in table


def test_without_cuda_the_plain_command_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory_plan.main([]) == 2
    assert capsys.readouterr().out.startswith("error: no CUDA GPU here")
