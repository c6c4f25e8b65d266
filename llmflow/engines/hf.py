"""The hf engine: transformers ``generate`` in a Ray Data actor pool, batched, left padded.

Each actor loads the model once (``HFGenerator.__init__``) and then generates one batch per
call. A prompt longer than the model's context, less the tokens to generate, is cut from the
left (the end of a chat matters most) and flagged in ``prompt_truncated``; it never fails
the job. CPU or GPU: an actor uses CUDA when Ray gives it a GPU.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmflow.engines.stops import cut_at_stop_ids

if TYPE_CHECKING:
    import numpy as np
    import ray.data

    from llmflow.config import EvalConfig


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def to_messages(chat: Any) -> list[dict[str, str]]:
    """A chat as plain ``[{role, content}]``, whatever container Ray Data or Arrow gave."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(chat)]


def render_prompts(tokenizer, chats: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """Prompt texts: each chat through the model's chat template, opened for the reply."""
    if not chats:
        return []
    return tokenizer.apply_chat_template(
        [list(c) for c in chats], tokenize=False, add_generation_prompt=True
    )


def left_truncate(ids: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Keep the last ``max_tokens`` of each sequence; also say which ones were cut."""
    out, cut = [], []
    for x in ids:
        cut.append(len(x) > max_tokens)
        out.append(x[-max_tokens:] if len(x) > max_tokens else x)
    return out, cut


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right"):
    """One (batch, longest) long tensor of ``seqs``, padded with ``value`` on ``side``."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    if not seqs:
        return torch.zeros((0, 0), dtype=torch.long)
    tensors = [torch.tensor(list(s), dtype=torch.long) for s in seqs]
    return pad_sequence(tensors, batch_first=True, padding_value=value, padding_side=side)


def left_pad(ids: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) tensors, padded on the left as decoder-only generation needs."""
    return pad(ids, pad_id, "left"), pad([[1] * len(x) for x in ids], 0, "left")


def generated_lengths(new_tokens, eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Tokens each row generated: up to and including its first end token."""
    lengths = []
    for row in new_tokens.tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos_ids:
                break
        else:
            # Finished rows are padded after their end token; count none of those pads.
            while n and pad_id is not None and row[n - 1] == pad_id and pad_id not in eos_ids:
                n -= 1
        lengths.append(n)
    return lengths


def context_length(model_config, tokenizer) -> int:
    """The longest sequence the model takes: its position limit, else the tokenizer's."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


# -- teacher-forced loss ---------------------------------------------------------------------


def loss_mask(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a 0/1 mask of its assistant replies' tokens, every assistant
    turn's (training and the eval loss count the same tokens).

    Uses the chat template's ``{% generation %}`` blocks when it has them. The real models'
    templates (Qwen2.5, Phi-3, Llama-3) have none: then each assistant turn is the tokens
    between the chat before it rendered with the generation prompt and the chat through it,
    as they stand in the whole chat's rendering (where a template appends an end token only
    at the very end, as Phi-3's does, a turn inside the chat ends where the two part).
    """
    messages = [dict(m) for m in messages]
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        from llmflow.tinymodel import assistant_mask

        ids, mask = assistant_mask(tokenizer, messages)
        if any(mask):
            return ids, mask
    ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = messages[:i]
        start = _common_prefix(ids, _chat_ids(tokenizer, before, True)) if before else 0
        end = (
            len(ids)
            if i == len(messages) - 1
            else _common_prefix(ids, _chat_ids(tokenizer, messages[: i + 1], False))
        )
        mask[start:end] = [1] * max(0, end - start)
    return ids, mask


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(enc["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- the engine ------------------------------------------------------------------------------


class HFGenerator:
    """A Ray Data class UDF: one model per actor, ``generate`` on each batch of prompts.

    Args:
        model_path: a Hugging Face model directory (a local path or a store URI).
        max_new_tokens: tokens to generate at most per prompt.
        temperature: 0 is greedy; above 0 samples, seeded by ``seed``.
        seed: seeds the actor's torch RNG (sampling only).
        torch_threads: intra-op threads of this actor (None leaves torch's default).
        device: 'cpu', 'cuda', or None for cuda when one is visible.
        max_context: overrides the model's context length (tests use it to force truncation).
        with_loss: also compute each row's teacher-forced reply loss (``loss_sum``,
            ``loss_tokens``) from its full chat (a ``messages`` column), in the same actor:
            a separate loss job would load the model in a second actor (measured ~8 CPU s of
            imports and loading on 2 cores, for a few seconds of work).
        loss_batch_size: chats per teacher-forced forward pass.
    """

    def __init__(
        self,
        model_path: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        torch_threads: int | None = None,
        device: str | None = None,
        max_context: int | None = None,
        with_loss: bool = False,
        loss_batch_size: int = 32,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from llmflow.basemodels import load_tokenizer
        from llmflow.engines import local_model_dir

        if torch_threads:
            torch.set_num_threads(torch_threads)
        path = local_model_dir(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False
        ).to(self.device)
        self.model.eval()
        from llmflow.engines.stops import stop_token_ids

        self.eos_ids = set(stop_token_ids(self.model.generation_config, self.tokenizer))
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else next(iter(self.eos_ids))
        )
        context = max_context or context_length(self.model.config, self.tokenizer)
        self.max_new_tokens = max(1, min(max_new_tokens, context - 1))
        self.max_prompt_tokens = context - self.max_new_tokens
        self.temperature = temperature
        self.with_loss = with_loss
        self.loss_batch_size = max(1, loss_batch_size)
        torch.manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np
        import torch

        out = {k: v for k, v in batch.items() if k not in ("prompt_messages", "messages")}
        chats = [to_messages(c) for c in batch["prompt_messages"]]
        texts = render_prompts(self.tokenizer, chats)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, truncated = left_truncate(ids, self.max_prompt_tokens)
        input_ids, attn = left_pad(ids, self.pad_id)
        sampling = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False}
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attn.to(self.device),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                **sampling,
            )
        latency = time.perf_counter() - t0
        new = generated[:, input_ids.shape[1] :].cpu()
        # The answer ends before its first stop id, special or not (a generation_config may
        # name any token as a turn's end); what follows it is padding.
        answers = self.tokenizer.batch_decode(
            [cut_at_stop_ids(row.tolist(), self.eos_ids)[0] for row in new],
            skip_special_tokens=True,
        )
        n = len(answers)
        out.update(
            generation=np.array(answers, dtype=object),
            num_prompt_tokens=np.array([len(x) for x in ids], dtype=np.int64),
            num_generated_tokens=np.array(
                generated_lengths(new, self.eos_ids, self.pad_id), dtype=np.int64
            ),
            prompt_truncated=np.array(truncated, dtype=bool),
            empty_generation=np.array([not a.strip() for a in answers], dtype=bool),
            batch_id=np.array([uuid.uuid4().hex] * n, dtype=object),
            latency_s=np.full(n, latency, dtype=np.float64),
            device=np.array([self.device] * n, dtype=object),
        )
        if self.with_loss and "messages" in batch:
            out.update(self.losses(batch["messages"]))
        return out

    def losses(self, messages) -> dict[str, np.ndarray]:
        """``loss_sum`` and ``loss_tokens`` of each full chat's reply tokens, teacher forced."""
        import numpy as np

        from llmflow.engines.losses import example_losses

        chats = [to_messages(c) for c in messages]
        pairs: list[tuple[float, int]] = []
        for start in range(0, len(chats), self.loss_batch_size):
            pairs += example_losses(
                self.model, self.tokenizer, chats[start : start + self.loss_batch_size]
            )
        return {
            "loss_sum": np.array([s for s, _ in pairs], dtype=np.float64),
            "loss_tokens": np.array([t for _, t in pairs], dtype=np.int64),
        }


class HFEngine:
    """The hf engine: ``HFGenerator`` over a fixed Ray Data actor pool.

    Args:
        eval_cfg: batch_size, concurrency (actors), cpus_per_actor, threads_per_actor,
            max_new_tokens, temperature.
        model_path: a Hugging Face model directory (local path or store URI).
        num_cpus: CPUs Ray reserves per actor; None takes ``eval_cfg.cpus_per_actor``.
        num_gpus: GPUs per actor; None gives each actor one GPU when the cluster has any.
        torch_threads: intra-op threads per actor; None takes ``eval_cfg.threads_per_actor``,
            else matches ``num_cpus`` (at least 1).
        seed: sampling seed (temperature > 0).
        max_context: override of the model's context length.
        with_loss: the actors also compute each row's teacher-forced loss (rows must carry
            their full chat as ``messages``), so scoring loads the model once.
    """

    name = "hf"

    def __init__(
        self,
        eval_cfg: EvalConfig,
        model_path: str,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        torch_threads: int | None = None,
        seed: int = 0,
        max_context: int | None = None,
        with_loss: bool = False,
    ):
        self.cfg = eval_cfg
        self.model_path = model_path
        self.num_cpus = eval_cfg.cpus_per_actor if num_cpus is None else num_cpus
        self.num_gpus = num_gpus
        self.torch_threads = (
            torch_threads or eval_cfg.threads_per_actor or max(1, int(self.num_cpus))
        )
        self.seed = seed
        self.max_context = max_context
        self.with_loss = with_loss

    def generator_kwargs(self) -> dict[str, Any]:
        """What each actor's ``HFGenerator`` is built with."""
        return {
            "model_path": self.model_path,
            "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "seed": self.seed,
            "torch_threads": self.torch_threads,
            "max_context": self.max_context,
            "with_loss": self.with_loss,
        }

    def generate(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray

        num_gpus = self.num_gpus
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        return ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs=self.generator_kwargs(),
            batch_size=self.cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.cfg.concurrency),
            num_cpus=self.num_cpus,
            num_gpus=num_gpus,
        )
