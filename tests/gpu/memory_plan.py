"""The GPU memory check (issue 30): the shipped GPU configs' stages on real-size models with
random weights (no download), each measured peak beside the memory plan's estimate.

    .venv/bin/python -m tests.gpu.memory_plan [--only qwen|phi3] [--json FILE]

For Qwen2.5-0.5B and Phi-3-mini (their config.json values: tests/real_shapes.py) and the
config that fine-tunes each: the model is saved in bfloat16, as the hub ships it, and loaded
the way a training worker loads it (llmflow.finetune.loop: load_model, load_dtype,
build_optimizer); two training steps of the config's micro-batch at data.max_tokens, every
position but the first a target (the plan's worst case), under the worker's bf16 autocast;
a checkpoint and a resume on the GPU (the optimizer's moments must land on it, then one more
step); the eval-loss pass over eval.batch_size rows (llmflow.engines.losses); one hf scoring
batch (generate). A peak is torch.cuda.max_memory_allocated after a reset, so it counts what
was held before the step too. Run it first when a GPU is lent: it needs minutes, not the
whole session.

`--cpu` runs the same steps on CPU at reduced sizes and measures nothing: what
tests/unit/test_gpu_script.py runs, so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.real_shapes import PHI3, PHI3_CFG, QWEN, QWEN_CFG

MODELS = {"qwen": (QWEN, QWEN_CFG), "phi3": (PHI3, PHI3_CFG)}
# --cpu: the same architectures this small (the steps, not the sizes, are what it checks).
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}
SMALL_TOKENS = 64
GB = 1e9


class Peak:
    """The peak allocated bytes of a block on CUDA (None on CPU), from a reset at its start."""

    def __init__(self, device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> Self:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_random_model(model_config: dict[str, Any], out: Path) -> None:
    """A random-weight model of ``model_config``'s architecture, saved in bfloat16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in model_config.items() if k not in ("torch_dtype", "dtype")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    _free()


def run_model(name: str, on_cpu: bool, gpu_gb: float | None) -> dict[str, Any]:
    import torch

    from llmflow.configfile import load_config
    from llmflow.engines.losses import encoded_losses
    from llmflow.finetune.loop import (
        build_optimizer,
        load_dtype,
        load_model,
        reply_loss,
        trainable_state,
    )
    from llmflow.plan import plan

    model_config, config_path = MODELS[name]
    if on_cpu:
        model_config = {**model_config, **SMALL}
        model_config["num_key_value_heads"] = min(model_config["num_key_value_heads"], 4)
    overrides = [f"data.max_tokens={SMALL_TOKENS}"] if on_cpu else []
    cfg = load_config(ROOT / config_path, overrides)
    train, tokens = cfg.train, cfg.data.max_tokens
    stages = {s.name: s for s in plan(cfg, model_config, gpu_gb)}
    device = torch.device("cpu" if on_cpu else "cuda")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    vocab = model_config["vocab_size"]
    out: dict[str, Any] = {"model": name, "config": config_path, "device": str(device)}

    def batch(rows: int) -> dict[str, Any]:
        ids = torch.randint(3, vocab, (rows, tokens), device=device)
        labels = ids.clone()
        labels[:, :1] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    with tempfile.TemporaryDirectory(prefix="llmflow-gpu-plan-") as tmp:
        path = Path(tmp) / name
        t0 = time.perf_counter()
        save_random_model(model_config, path)
        out["build_s"] = round(time.perf_counter() - t0, 1)

        # Training: the worker's load, optimizer and loss; the second step has AdamW's state.
        model = load_model(str(path), train, load_dtype(train, device, bf16))
        model.train()
        opt, _ = build_optimizer(model, train, device)
        data = batch(train.batch_size)

        def step(model, opt, data) -> float:
            with autocast:
                loss = reply_loss(model, data)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        first = step(model, opt, data)
        with Peak(device) as peak:
            second = step(model, opt, data)
        out["train"] = {
            "plan_gb": round(stages["train"].peak / GB, 3),
            "peak_gb": peak.bytes and round(peak.bytes / GB, 3),
            "loss": [round(first, 3), round(second, 3)],
            "micro_batch": [train.batch_size, tokens],
        }

        # A checkpoint, then a resume into a fresh model on the same device.
        ckpt = Path(tmp) / "checkpoint.pt"
        torch.save(
            {"model": trainable_state(model), "optimizer": opt.state_dict(), "step": 2}, ckpt
        )
        del model, opt
        _free()
        model = load_model(str(path), train, load_dtype(train, device, bf16))
        model.train()
        opt, start = build_optimizer(
            model, train, device, torch.load(ckpt, map_location="cpu", weights_only=True)
        )
        moments = {
            t.device.type
            for s in opt.state.values()
            for k, t in s.items()
            if k in ("exp_avg", "exp_avg_sq")
        }
        third = step(model, opt, data)
        out["resume"] = {
            "start_step": start,
            "moments_on": sorted(moments),
            "loss": round(third, 3),
        }
        del model, opt, data
        _free()

        # The evaluate stage: the model as exported (its base's dtype), the loss pass and
        # one generate batch.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
        model.eval()
        rows = cfg.eval.batch_size
        half = tokens // 2
        encoded = [
            (ids, [0] * half + [1] * (tokens - half))
            for ids in torch.randint(3, vocab, (rows, tokens)).tolist()
        ]
        with Peak(device) as peak:
            losses = encoded_losses(model, 0, encoded)
        plan_eval = stages.get("eval loss")
        out["eval_loss"] = {
            "plan_gb": plan_eval and round(plan_eval.peak / GB, 3),
            "peak_gb": peak.bytes and round(peak.bytes / GB, 3),
            "rows": [rows, tokens],
            "tokens_scored": sum(n for _, n in losses),
        }
        prompts = torch.randint(3, vocab, (rows, half), device=device)
        with Peak(device) as peak, torch.inference_mode():
            generated = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=cfg.eval.max_new_tokens,
                min_new_tokens=cfg.eval.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        out["scoring"] = {
            "plan_gb": None,  # the hf engine's scoring is not a stage of the plan yet
            "peak_gb": peak.bytes and round(peak.bytes / GB, 3),
            "rows": [rows, half],
            "new_tokens": int(generated.shape[1] - half),
        }
        del model
        _free()
    return out


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["model  stage      plan GB  measured GB  measured/plan"]
    for r in results:
        for stage in ("train", "eval_loss", "scoring"):
            s = r[stage]
            plan_gb, peak_gb = s.get("plan_gb"), s.get("peak_gb")
            ratio = f"{peak_gb / plan_gb:.2f}" if plan_gb and peak_gb else "-"
            lines.append(
                f"{r['model']:<6} {stage:<10} {plan_gb if plan_gb is not None else '-':>7}  "
                f"{peak_gb if peak_gb is not None else '-':>11}  {ratio:>13}"
            )
        lines.append(
            f"{r['model']:<6} resume     from step {r['resume']['start_step']}, AdamW moments on "
            f"{','.join(r['resume']['moments_on'])}, loss {r['resume']['loss']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--cpu", action="store_true", help="Reduced sizes on CPU, nothing measured.")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); --cpu runs the steps")
        return 2
    gpu_gb = None if args.cpu else torch.cuda.get_device_properties(0).total_memory / GB
    where = (
        "CPU (reduced sizes)" if args.cpu else f"{torch.cuda.get_device_name(0)}, {gpu_gb:.0f} GB"
    )
    print(f"memory plan check on {where}, torch {torch.__version__}", flush=True)
    results = []
    for name in args.only or list(MODELS):
        t0 = time.perf_counter()
        results.append(run_model(name, args.cpu, gpu_gb))
        results[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(results[-1]), flush=True)
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    bad = [r["model"] for r in results if r["resume"]["moments_on"] != [r["device"].split(":")[0]]]
    if bad:
        print(f"error: after a resume AdamW's moments are not on the model's device: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
