"""The tiny base model: builds, loads back as a Hugging Face model, and is reproducible."""

from __future__ import annotations

import hashlib

import pytest

from llmflow.bundled import generate_examples
from llmflow.tinymodel import (
    assistant_mask,
    build_tiny_model,
    ensure_tiny_model,
    example_texts,
    texts_sha256,
    tiny_model_fingerprint,
)

ROWS = generate_examples(300, seed=0)
TEXTS = example_texts(ROWS)
CHAT = [
    {"role": "user", "content": "Reverse the digits: 1234"},
    {"role": "assistant", "content": "4321"},
]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, seed=0)


def test_directory_holds_safetensors_weights_only(built):
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]


def test_loads_back_and_generates(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert model.config.model_type == "llama"
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    prompts = [
        tok.apply_chat_template([m], tokenize=False, add_generation_prompt=True)
        for m in ({"role": "user", "content": "Write backwards: 12"}, CHAT[0])
    ]
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 0 < out.shape[1] - enc["input_ids"].shape[1] <= 4
    assert all(isinstance(s, str) for s in tok.batch_decode(out, skip_special_tokens=True))


def test_same_seed_same_bytes_other_seed_other_weights(built, tmp_path):
    again = build_tiny_model(tmp_path / "again", TEXTS, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(built / name), name
    other = build_tiny_model(tmp_path / "other", TEXTS, seed=1)
    assert _sha(other / "model.safetensors") != _sha(built / "model.safetensors")


def test_tokenizer_round_trips_text_and_keeps_digits_apart(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    for text in ("Reverse the digits: 0123", "unseen text, ünïcode\nand 42!"):
        assert tok.decode(tok(text)["input_ids"]) == text
    # One token per digit: reversing digits is then reversing tokens.
    assert tok.tokenize("98765") == list("98765")
    # Words every prompt repeats became single tokens (the tokenizer learned from the data).
    assert "Reverse" in tok.get_vocab()


def test_chat_template_renders_turns_and_generation_prompt(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|bos|><|user|>Reverse the digits: 1234<|end|><|assistant|>4321<|end|>"
    )
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|user|>Reverse the digits: 1234<|end|><|assistant|>"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.apply_chat_template(with_system, tokenize=False).startswith(
        "<|bos|><|system|>Be brief.<|end|><|user|>"
    )


def test_assistant_mask_covers_the_reply_and_its_end_token(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    ids, mask = assistant_mask(tok, CHAT)
    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4321<|end|>"
    # The prompt, up to and including <|assistant|>, is what generation starts from.
    prompt = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=False)
    assert ids[: len(prompt)] == list(prompt) and not any(mask[: len(prompt)])


def test_fingerprint_keys_every_input():
    sha = texts_sha256(TEXTS)
    key = tiny_model_fingerprint(0, sha)
    assert key == tiny_model_fingerprint(0, sha, hidden_size=128)  # a default, spelled out
    assert (
        len(
            {
                key,
                tiny_model_fingerprint(1, sha),
                tiny_model_fingerprint(0, sha[::-1]),
                tiny_model_fingerprint(0, sha, num_layers=3),
            }
        )
        == 4
    )
    with pytest.raises(TypeError):
        tiny_model_fingerprint(0, sha, hiden_size=64)


def test_ensure_builds_once_into_the_store(tmp_path, monkeypatch):
    from llmflow import tinymodel
    from llmflow.store import Store

    store = Store(tmp_path / "store")
    uri = ensure_tiny_model(store, TEXTS, seed=0)
    assert store.rel(uri).startswith("models/_base/tiny-")
    assert store.read_json(store.rel(uri), "manifest.json")["seed"] == 0

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a model the store already holds")

    monkeypatch.setattr(tinymodel, "build_tiny_model", fail)
    assert ensure_tiny_model(store, iter(TEXTS), seed=0) == uri


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~8 s
def test_build_is_reproducible_across_processes(built, tmp_path):
    """Another interpreter, another hash seed: tokenizer training must not depend on either."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from llmflow.bundled import generate_examples\n"
        "from llmflow.tinymodel import build_tiny_model, example_texts\n"
        "build_tiny_model(sys.argv[1], example_texts(generate_examples(300, seed=0)), seed=0)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _sha(tmp_path / name) == _sha(built / name), name
