"""Random-weight stand-ins of real model families, built locally: the architectures and chat
conventions of the GPU configs (configs/qwen2.5-0.5b-instruct.yaml, configs/phi-3-mini-4k-
instruct.yaml) at the tiny model's size, so their code paths run on CPU with no download.

- ``qwen2``: Qwen2ForCausalLM (grouped-query attention, tied embeddings), the ChatML template
  (``<|im_start|>role\\n...<|im_end|>``), turns ending with ``<|im_end|>``.
- ``phi3``: Phi3ForCausalLM (fused ``qkv_proj`` and ``gate_up_proj``), Phi-3's template
  (``<|user|>\\n...<|end|>``), turns ending with ``<|end|>`` while the tokenizer's eos is
  ``<|endoftext|>``: generation_config.eos_token_id lists both, as Phi-3-mini's does.

The templates are the real models' (no ``{% generation %}`` blocks, as in Qwen's and Phi-3's
own): the loss mask finds every assistant turn the way it must for the real models. The
tokenizer is the tiny model's byte-level BPE (digits one per token), trained on the texts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# The real models' chat templates (tokenizer_config.json of Qwen/Qwen2.5-0.5B-Instruct and
# microsoft/Phi-3-mini-4k-instruct), less Qwen's tool-calling branches: no {% generation %}
# blocks, so the loss mask takes the path real models take (engines.hf.loss_mask).
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Per family: special tokens (the pad first), eos, the ids a turn may end with, the template,
# and the template's own text (the tokenizer learns it too, so it stays a few tokens).
FAMILIES = {
    "qwen2": {
        "special": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "pad": "<|endoftext|>",
        "eos": "<|im_end|>",
        "stops": ("<|im_end|>", "<|endoftext|>"),
        "template": QWEN25_TEMPLATE,
        "texts": ("system\n" + QWEN_SYSTEM, "user\n", "assistant\n"),
    },
    "phi3": {
        "special": ("<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
        "pad": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "stops": ("<|endoftext|>", "<|end|>"),
        "template": PHI3_TEMPLATE,
        "texts": (),
    },
}


def build_standin(out_dir: str | Path, family: str, texts: Iterable[str], seed: int = 0) -> Path:
    """Build the ``family`` stand-in into ``out_dir`` (a Hugging Face model directory).

    Sizes: hidden 128, 2 layers, 4 heads (head_dim 32, what vLLM's CPU attention needs).
    """
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from llmflow.tinymodel import train_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown stand-in family {family!r} (have {', '.join(FAMILIES)})")
    fam = FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(
            [*texts, *fam["texts"]], special_tokens=fam["special"], unk_token=None
        ),
        eos_token=fam["eos"],
        pad_token=fam["pad"],
        additional_special_tokens=[t for t in fam["special"] if t not in (fam["eos"], fam["pad"])],
        chat_template=fam["template"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    stops = [tok.convert_tokens_to_ids(t) for t in fam["stops"]]
    config = _config(family, len(tok), tok.pad_token_id, tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _config(family: str, vocab: int, pad_id: int, eos_id: int):
    sizes = {
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "bos_token_id": None,
    }
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**sizes, num_key_value_heads=2, tie_word_embeddings=True)
    from transformers import Phi3Config

    return Phi3Config(**sizes, num_key_value_heads=4, tie_word_embeddings=False)
