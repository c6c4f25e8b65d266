"""Metrics on hand-written cases: exact match, SQuAD normalisation, token F1, ROUGE-L,
dotted-path loading, corpus means and the teacher-forced loss mask."""

from __future__ import annotations

import math

import pytest

from llmflow.errors import ConfigError
from llmflow.evaluate import metrics as M


def test_exact_match_strips_whitespace_only():
    assert M.exact_match(" 4321\n", "4321") == 1.0
    assert M.exact_match("4321.", "4321") == 0.0
    assert M.exact_match("Paris", "paris") == 0.0


def test_normalize_answer_is_squad_style():
    assert M.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert M.normalize_answer("an apple a day") == "apple day"
    assert M.normalized_exact_match("The Paris.", "paris") == 1.0
    assert M.normalized_exact_match("Paris, France", "paris") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: [cat, sat, on, mat]; ref: [cat, sat, on, red, mat] (articles dropped)
    # common 4 -> p = 4/4, r = 4/5 -> f1 = 2 * 1 * 0.8 / 1.8
    assert M.token_f1("the cat sat on the mat", "a cat sat on a red mat") == pytest.approx(
        1.6 / 1.8
    )
    assert M.token_f1("dog", "cat") == 0.0
    assert M.token_f1("", "") == 1.0 and M.token_f1("", "x") == 0.0
    # counts matter: "a a" would overlap "a" once (here with non-article tokens)
    assert M.token_f1("x x", "x") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_rouge_l_and_bleu_are_the_libraries_scores():
    # rouge-score stems: "killed" and "kill" are one token (1.0; 0.75 without stemming).
    assert M.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(1.0)
    assert M.rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    assert M.rouge_l("A B", "a b") == 1.0
    assert M.rouge_l("x", "y") == 0.0 and M.rouge_l("", "") == 1.0 and M.rouge_l("", "a") == 0.0
    # sacrebleu's sentence BLEU: 1 for the same sentence, less for one word of five changed.
    assert M.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert M.bleu("a b c d e", "a b c d f") == pytest.approx(0.6687, abs=1e-4)
    assert M.bleu("", "") == 1.0 and M.bleu("x", "") == 0.0


def test_extra_metrics_are_registered_plugins_never_module_paths():
    """eval.extra_metrics names `llmflow.metrics` entry points (examples/metrics-plugin is
    installed by make install); a module path, which would import code a run's parameters
    chose, is refused in one line listing what is registered."""
    import llmflow_example_metrics as example

    assert {"edit_distance", "shouting_match"} <= set(M.registered_metrics())
    assert M.load_metric("shouting_match") is example.shouting_match
    assert M.metric_directions(["shouting_match"])["shouting_match"] == "higher"
    metrics = M.load_metrics(["shouting_match"])
    assert set(metrics) == {*M.BUILTIN_METRICS, "shouting_match"}
    assert metrics["shouting_match"]("Abc", "aBC") == 1.0
    for path in (
        "llmflow_example_metrics:shouting_match",
        "llmflow_example_metrics.shouting_match",
        "os:system",
    ):
        with pytest.raises(
            ConfigError,
            match=rf"^eval.extra_metrics: '{path}' is a module path; name a metric registered "
            r"as an 'llmflow.metrics' entry point \(registered: .*shouting_match.*\)$",
        ):
            M.load_metric(path)
    with pytest.raises(ConfigError, match=r"'nope' is not a registered metric \(registered: "):
        M.load_metric("nope")
    with pytest.raises(ConfigError, match="a built-in metric of that name exists"):
        M.load_metrics(["rouge_l"])


def test_score_example_and_aggregate_means():
    metrics = M.load_metrics()
    rows = [M.score_example("4321", "4321", metrics), M.score_example("4312", "4321", metrics)]
    assert rows[0] == {
        "exact_match": 1.0,
        "normalized_exact_match": 1.0,
        "token_f1": 1.0,
        "rouge_l": 1.0,
        "bleu": 1.0,
    }
    assert rows[1]["exact_match"] == 0.0
    agg = M.aggregate(rows, ["exact_match", "rouge_l"])
    assert agg == {"exact_match": 0.5, "rouge_l": 0.5}
    assert M.aggregate([], ["exact_match"]) == {"exact_match": 0.0}


def test_loss_summary():
    s = M.loss_summary(6.0, 3)
    assert s["eval_loss"] == 2.0 and s["perplexity"] == pytest.approx(math.exp(2.0))
    assert s["eval_loss_tokens"] == 3.0
    assert math.isnan(M.loss_summary(0.0, 0)["eval_loss"])


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from llmflow.bundled import generate_examples
    from llmflow.tinymodel import example_texts, train_tokenizer, wrap_tokenizer

    return wrap_tokenizer(train_tokenizer(example_texts(generate_examples(200))))


CHAT = [
    {"role": "user", "content": "Reverse the digits: 123"},
    {"role": "assistant", "content": "321"},
]


def test_loss_mask_covers_the_reply_with_generation_tags(tiny_tokenizer):
    ids, mask = M.loss_mask(tiny_tokenizer, CHAT)
    masked = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "321<|end|>"


def test_loss_mask_falls_back_to_the_prompt_prefix_without_generation_tags(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    ids, mask = M.loss_mask(tok, CHAT)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "321<|end|>"
    assert mask[0] == 0 and sum(mask) == len(ids) - mask.index(1)


def test_teacher_forced_loss_on_a_random_model(tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    chats = [
        CHAT,
        [
            {"role": "user", "content": "Write backwards: 98765"},
            {"role": "assistant", "content": "56789"},
        ],
    ]
    per = M.example_losses(model, tiny_tokenizer, chats)
    # reply tokens: "321" + end = 4 and "56789" + end = 6 (digits are one token each)
    assert [n for _, n in per] == [4, 6]
    out = M.teacher_forced_loss(model, tiny_tokenizer, chats, batch_size=1)
    # a random model is close to uniform: loss near log(vocab)
    assert abs(out["eval_loss"] - math.log(len(tiny_tokenizer))) < 1.0
    assert out["perplexity"] == pytest.approx(math.exp(out["eval_loss"]))
    assert out["eval_loss"] == pytest.approx(sum(s for s, _ in per) / 10)


def test_loss_passes_keep_only_reply_positions_within_the_logits_budget(tiny_tokenizer):
    """The loss pass of a real vocabulary (152k) cannot hold a batch's float32 logits (issue
    30): only the positions before a reply token get logits, in passes of at most ``budget``
    values; the losses are those of the whole-sequence computation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmflow.engines.losses import LOGITS_BUDGET

    torch.manual_seed(0)
    vocab = len(tiny_tokenizer)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    ).eval()
    chats = [
        [
            {"role": "user", "content": f"Reverse the digits: {n}"},
            {"role": "assistant", "content": str(n)[::-1]},
        ]
        for n in (12, 34567, 8901234, 5, 678901234567)
    ]
    # The whole-sequence reference: every position's float32 logits at once.
    reference = []
    for chat in chats:
        ids, mask = M.loss_mask(tiny_tokenizer, chat)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        labels = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        reference.append((float(loss), int((labels != -100).sum())))

    shapes = []
    model.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.logits.shape)))
    for budget in (LOGITS_BUDGET, 8 * vocab, 3 * vocab):  # 3: a 13-token reply takes 5 passes
        shapes.clear()
        got = M.example_losses(model, tiny_tokenizer, chats, budget=budget)
        assert [n for _, n in got] == [n for _, n in reference]
        for (s, _), (ref, _) in zip(got, reference):
            assert s == pytest.approx(ref, rel=1e-4)
        assert all(b * k * vocab <= max(budget, vocab) for b, k, _ in shapes), (budget, shapes)
        # Only reply positions: never a whole padded sequence of the longest prompt.
        assert sum(b * k for b, k, _ in shapes) <= len(chats) * sum(n for _, n in reference)
    assert len(shapes) >= 5
