"""The tiny model on a GPU: it loads, trains a step (loss falls) and generates on CUDA."""

from __future__ import annotations


def test_tiny_model_trains_and_generates_on_cuda(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.basemodels import load_tokenizer, resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.store import Store
    from llmflow.tinymodel import assistant_mask

    path = resolve_base_model(TrainConfig(), Store(tmp_path / "store"))
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).cuda()
    msgs = [
        {"role": "user", "content": "Reverse this number: 1234"},
        {"role": "assistant", "content": "4321"},
    ]
    ids, mask = assistant_mask(tok, msgs)
    x = torch.tensor([ids], device="cuda")
    labels = torch.where(torch.tensor([mask], device="cuda") == 1, x, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    prompt = tok.apply_chat_template(
        msgs[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(
        **{k: v.cuda() for k, v in prompt.items()}, max_new_tokens=8, do_sample=False
    )
    assert out.device.type == "cuda" and out.shape[1] > prompt["input_ids"].shape[1]
