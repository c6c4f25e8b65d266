"""The tiny base model: a small Llama built from a config, with a tokenizer trained on the data.

It is what the CPU default fine-tunes (``train.base_model: tiny``). Everything about it is
determined by the seed, the sizes and the texts its tokenizer is trained on, so a store can
key it by ``tiny_model_fingerprint`` and build it once.

The tokenizer is byte-level BPE with digits split one per token: any text encodes (no unknown
characters), merges learned from the data shorten frequent words, and numbers stay digit by
digit, which is what the bundled digit task needs. Its chat template wraps each assistant
turn in ``{% generation %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
returns the tokens a trainer computes loss on (see ``assistant_mask``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmflow.store import Store

# Bump when the builder changes what it writes for the same arguments: the fingerprint (and
# so the store key) changes with it, and stores rebuild instead of reusing a stale model.
BUILDER_VERSION = 1

BOS, EOS, PAD, UNK = "<|bos|>", "<|end|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

# <|role|>content<|end|> per turn. The assistant turn, its <|end|> included, sits inside
# {% generation %} so the mask covers what the model must learn to produce and to stop on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_NUM_MERGES = 256
DEFAULT_MIN_FREQUENCY = 2


def texts_sha256(texts: Iterable[str]) -> str:
    """Content hash of the tokenizer's training texts (order matters), for fingerprints."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tiny_model_fingerprint(seed: int, texts_sha: str, **sizes: Any) -> str:
    """A 16-hex key of everything that determines the built model's bytes.

    Args:
        seed: the build seed.
        texts_sha: ``texts_sha256`` of the tokenizer's training texts.
        sizes: keyword arguments of ``build_tiny_model`` (the rest take their defaults, so
            passing a default explicitly gives the same key).
    """
    payload = {
        "builder": BUILDER_VERSION,
        "seed": seed,
        "texts": texts_sha,
        "sizes": _build_options(sizes),
    }
    raw = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _build_options(sizes: dict[str, Any]) -> dict[str, Any]:
    """``sizes`` completed with build_tiny_model's defaults; unknown names are errors."""
    unknown = sorted(set(sizes) - set(_BUILD_DEFAULTS))
    if unknown:
        raise TypeError(f"build_tiny_model has no option(s) {unknown}")
    return {**_BUILD_DEFAULTS, **sizes}


def train_tokenizer(
    texts: Iterable[str],
    num_merges: int = DEFAULT_NUM_MERGES,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    unk_token: str | None = UNK,
):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``.

    The vocabulary is the special tokens, the 256 byte symbols and at most ``num_merges``
    merges of pairs seen at least ``min_frequency`` times. Digits are split off one by one
    before BPE (as Llama and Mistral tokenizers do), so no merge ever spans digits.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(special_tokens) + 256 + num_merges,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A list, not a generator: the trainer's result must not depend on how it is consumed.
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    """A ``PreTrainedTokenizerFast`` around ``tok`` with the special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # Left padding is what batched generation needs; training masks pads either way.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    num_merges: int = DEFAULT_NUM_MERGES,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
) -> Path:
    """Build the tiny Llama and its tokenizer into ``out_dir`` (a Hugging Face directory).

    Args:
        out_dir: created if missing; receives config.json, generation_config.json,
            model.safetensors and the tokenizer files.
        texts: what the tokenizer is trained on (the task's prompts and answers).
        seed: initialises the weights; the same arguments give byte-identical files.
        hidden_size, num_layers, num_heads, intermediate_size: the Llama's shape
            (``intermediate_size`` defaults to 4 x ``hidden_size``).
        max_positions: longest sequence the model takes.
        num_merges, min_frequency: see ``train_tokenizer``.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = wrap_tokenizer(train_tokenizer(texts, num_merges, min_frequency))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        # Tied embeddings: at this size the embedding matrix is a large share of the weights.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Initialise on a private generator state so building never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# The options a fingerprint covers, with their defaults, read off the signature above so the
# two cannot drift apart.
_BUILD_DEFAULTS: dict[str, Any] = {
    name: param.default
    for name, param in inspect.signature(build_tiny_model).parameters.items()
    if name not in ("out_dir", "texts", "seed")
}


def assistant_mask(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a 0/1 mask of its assistant tokens (where loss belongs).

    Works with any tokenizer whose chat template has ``{% generation %}`` blocks, as the tiny
    model's does; the mask covers each assistant reply and the end token that closes it.
    """
    enc = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def ensure_tiny_model(store: Store, texts: Iterable[str], seed: int = 0, **sizes: Any) -> str:
    """The tiny model built from ``texts`` and ``seed``, built once and kept in the store.

    Args:
        store: where the model lives, under ``models/_base/tiny-<fingerprint>``.
        texts: what the tokenizer is trained on (e.g. ``example_texts`` of the dataset).
        seed, sizes: as for ``build_tiny_model``.

    Returns:
        The URI of the model directory (a plain path on a local store).
    """
    from llmflow.store import MANIFEST

    texts = list(texts)
    sha = texts_sha256(texts)
    key = f"tiny-{tiny_model_fingerprint(seed, sha, **sizes)}"
    parts = ("models", "_base", key)
    # The manifest is written last, so on an object store it marks a complete upload.
    if not store.exists(*parts, MANIFEST):
        with store.atomic_dir(*parts) as tmp:
            build_tiny_model(tmp, texts, seed=seed, **sizes)
            manifest = {
                "kind": "tiny-base",
                "builder_version": BUILDER_VERSION,
                "seed": seed,
                "texts_sha256": sha,
                "options": _build_options(sizes),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return store.uri(*parts)


def example_texts(rows: Iterable[dict]) -> list[str]:
    """The message contents of chat rows, in order: what the tokenizer is trained on."""
    return [m["content"] for row in rows for m in row["messages"]]
