"""The stand-ins carry the real models' chat templates (no {% generation %} blocks), and the
loss mask finds every assistant turn of a multi-turn chat with them, as it must for the real
Qwen2.5 and Phi-3: on main before issue 30 it found the last turn only."""

from __future__ import annotations

import pytest

from llmflow.engines.hf import loss_mask
from llmflow.standins import FAMILIES, build_standin

CHAT = [
    {"role": "user", "content": "Reverse this number: 123"},
    {"role": "assistant", "content": "321"},
    {"role": "user", "content": "Reverse this number: 4071"},
    {"role": "assistant", "content": "1704"},
]
# What each template renders around a reply: the reply and its end, as the model must learn
# to write them (Phi-3's template closes the whole chat with its eos, <|endoftext|>).
REPLIES = {
    "qwen2": ["321<|im_end|>\n", "1704<|im_end|>\n"],
    "phi3": ["321<|end|>\n", "1704<|end|>\n<|endoftext|>"],
}


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of ids the mask marks, in order: one per assistant turn."""
    spans, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return [*spans, current] if current else spans


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def standin(request, tmp_path_factory):
    from transformers import AutoTokenizer

    from llmflow.bundled import generate_examples
    from llmflow.tinymodel import example_texts

    texts = example_texts(generate_examples(200))
    path = build_standin(tmp_path_factory.mktemp(request.param), request.param, texts)
    return request.param, AutoTokenizer.from_pretrained(path)


def test_the_templates_are_the_real_ones_without_generation_blocks(standin):
    family, tok = standin
    assert "{% generation %}" not in tok.chat_template
    text = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    if family == "qwen2":  # Qwen2.5's default system prompt, then ChatML
        assert text == (
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nReverse this number: 123<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    else:
        assert text == "<|user|>\nReverse this number: 123<|end|>\n<|assistant|>\n"


def test_the_loss_mask_covers_every_assistant_turn_and_nothing_else(standin):
    family, tok = standin
    ids, mask = loss_mask(tok, CHAT)
    assert len(ids) == len(mask)
    spans = masked_spans(ids, mask)
    assert [tok.decode(s) for s in spans] == REPLIES[family]
    # The system prompt and the user turns carry no loss.
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "Reverse this number: 123" in unmasked and "1704" not in unmasked


# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json), as test data: no
# {% generation %} blocks, a bos before the first header, <|eot_id|> closing every turn.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def test_the_loss_mask_covers_every_assistant_turn_of_the_llama3_template(tmp_path):
    """The third real template of issue 33 (Llama-3), on the tiny tokenizer with Llama-3's
    special tokens: each reply with its <|eot_id|>, no header, no user turn, no system."""
    from transformers import AutoTokenizer

    from llmflow.bundled import generate_examples
    from llmflow.tinymodel import build_tiny_model, example_texts

    path = build_tiny_model(tmp_path / "tiny", example_texts(generate_examples(200)), seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": special, "bos_token": special[0]})
    tok.chat_template = LLAMA3_TEMPLATE
    chat = [{"role": "system", "content": "Reverse numbers."}, *CHAT]
    ids, mask = loss_mask(tok, chat)
    spans = masked_spans(ids, mask)
    assert [tok.decode(s) for s in spans] == ["321<|eot_id|>", "1704<|eot_id|>"]
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert unmasked.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "Reverse this number: 4071" in unmasked and "321" not in unmasked
