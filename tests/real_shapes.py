"""The real models' shapes, as the hub's config.json files say (Qwen/Qwen2.5-0.5B-Instruct,
microsoft/Phi-3-mini-4k-instruct), and the shipped configs that fine-tune them: what the
memory plan's unit tests and the GPU memory check (tests/gpu/memory_plan.py) build from,
with no download."""

from __future__ import annotations

QWEN = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
PHI3 = {
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN_CFG = "configs/qwen2.5-0.5b-instruct.yaml"
PHI3_CFG = "configs/phi-3-mini-4k-instruct.yaml"
