"""Where generations end: every id of generation_config.eos_token_id (Phi-3's <|end|>,
Llama-3's <|eot_id|>), OpenAI `stop` strings, and a finish_reason that agrees with
usage.completion_tokens ("length" only at max_tokens). The hf Serve app's generate path on
the real tiny model."""

from __future__ import annotations

import pytest

from llmflow.engines.stops import StreamStops, cut_at_stop_strings, finish_reason, stop_token_ids


class _Tok:
    eos_token_id = 2


class _Gen:
    def __init__(self, eos):
        self.eos_token_id = eos


def test_stop_ids_come_from_the_generation_config_and_the_tokenizer():
    assert stop_token_ids(_Gen([32000, 32007]), _Tok()) == (32000, 32007, 2)
    assert stop_token_ids(_Gen(2), _Tok()) == (2,)
    assert stop_token_ids(_Gen(None), _Tok()) == (2,)


def test_finish_reason_is_length_only_at_max_tokens():
    assert finish_reason(20, 20, stopped=False) == "length"
    assert finish_reason(4, 20, stopped=True) == "stop"
    assert finish_reason(20, 20, stopped=True) == "stop"
    assert cut_at_stop_strings("12|34|5", ["|", "4"]) == ("12", True)
    assert cut_at_stop_strings("12345", ["9"]) == ("12345", False)


def test_a_stream_never_sends_a_stop_string_or_what_follows_it():
    s = StreamStops(["END"])
    sent = "".join(s.feed(p) for p in ["ab", "cE", "N", "Dxyz", "more"]) + s.flush()
    assert sent == "abc" and s.stopped
    plain = StreamStops([])
    assert "".join(plain.feed(p) for p in ["a", "b"]) + plain.flush() == "ab"


@pytest.fixture(scope="module")
def served_parts(tmp_path_factory):
    """The tiny model trained briefly (it answers with digits), loaded as the Serve app does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmflow.basemodels import resolve_base_model
    from llmflow.bundled import bundled_path, read_examples
    from llmflow.config import TrainConfig
    from llmflow.store import Store
    from tests.tiny_training import train_tiny

    base = resolve_base_model(TrainConfig(), Store(tmp_path_factory.mktemp("store")))
    path = train_tiny(
        base, tmp_path_factory.mktemp("trained"), read_examples(bundled_path())[:2000], steps=40
    )
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval(), tok


def _job(tok, max_tokens=12, stop=()):
    from deployments.hf_generation import GenJob

    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse this number: 45678"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    return GenJob(list(ids), max_tokens, 0.0, 1.0, None, tuple(stop))


def test_a_turn_end_token_of_the_generation_config_stops_with_finish_reason_stop(served_parts):
    """A model whose turns end with a second end token (as Phi-3's <|end|>): the app stops on
    it and says "stop", with the tokens before it counted. Today's main said "length"."""
    import copy

    from deployments.hf_generation import generate_batch

    model, tok = served_parts
    [free] = generate_batch(model, tok, [_job(tok)])
    assert free.completion_tokens >= 3, free
    ids = tok(free.text, add_special_tokens=False)["input_ids"]
    end_token = ids[1]  # pretend the model's second answer token ends its turn
    turned = copy.deepcopy(model)
    turned.generation_config.eos_token_id = [tok.eos_token_id, end_token]
    [r] = generate_batch(turned, tok, [_job(tok)])
    assert r.finish_reason == "stop" and r.completion_tokens == 1, r
    assert r.text == tok.decode(ids[:1])


def test_openai_stop_strings_end_the_answer(served_parts):
    from deployments.hf_generation import generate_batch

    model, tok = served_parts
    [free] = generate_batch(model, tok, [_job(tok, max_tokens=12)])
    assert len(free.text) >= 3, free
    # finish_reason agrees with the count: "length" exactly when all 12 tokens came out.
    assert (free.finish_reason == "length") == (free.completion_tokens == 12), free
    stop = free.text[1]
    [r] = generate_batch(model, tok, [_job(tok, max_tokens=12, stop=[stop])])
    assert r.text == free.text[: free.text.index(stop)] and r.finish_reason == "stop"


def test_a_stop_list_over_four_is_a_400_shape_error():
    from pydantic import ValidationError

    from deployments.openai_protocol import ChatRequest

    with pytest.raises(ValidationError, match="at most 4 non-empty strings"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], stop=list("abcde"))
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], stop="|").stop == [
        "|"
    ]
