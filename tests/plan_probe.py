"""Measure one training step's peak memory on CPU, for tests/unit/test_plan.py: a random-weight
model of a real architecture at reduced size, llmflow's own loss and optimizer (reply_loss,
build_optimizer), the second step (AdamW's state exists), every position but the first a
target (the plan's worst case). Prints one JSON line per spec: the measured peak in bytes.

Run in its own process with glibc told to map large blocks and give them back at once
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident set follows what torch
holds; the peak is /proc/self/status's VmHWM after clear_refs reset it (Linux), less the
resident set just before the measured step: each spec's figure is its own, so one process
measures them one after another (torch's import, ~6 s on 2 cores, paid once).

    python -m tests.plan_probe '[{"model": {...config.json...}, "batch": 4, "seq": 256, ...}]'
"""

from __future__ import annotations

import gc
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key))


def main(spec: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmflow.config import TrainConfig
    from llmflow.finetune.loop import build_optimizer, reply_loss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = {k: v for k, v in spec["model"].items() if k not in ("torch_dtype", "dtype")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, pad_token_id=0, eos_token_id=1)
    train = TrainConfig(**spec["train"])
    model = AutoModelForCausalLM.from_config(  # in float32, as on CPU
        config, dtype=torch.float32, attn_implementation=train.attn_implementation
    )
    if train.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=train.lora_rank,
            lora_alpha=2 * train.lora_rank,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt, _ = build_optimizer(model, train, torch.device("cpu"))
    ids = torch.randint(3, config.vocab_size, (spec["batch"], spec["seq"]))
    labels = ids.clone()
    labels[:, :1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step() -> None:
        reply_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state is made here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    step()
    return {"peak": held + _status("VmHWM") - before}


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        print(json.dumps(main(spec)), flush=True)
        gc.collect()  # the last spec's model and optimizer state go before the next one
