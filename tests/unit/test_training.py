"""The pure parts of the finetune stage, without Ray: masking, batching, schedule, checks, export."""

from __future__ import annotations

import json
import math
import re

import pytest

from llmflow.basemodels import ModelError
from llmflow.bundled import generate_examples
from llmflow.config import TrainConfig
from llmflow.finetune.batches import IGNORE_INDEX, batch_indices, collate, encode_chat, lr_at
from llmflow.finetune.checks import (
    DatasetNotFound,
    InsufficientResources,
    NonFiniteLoss,
    check_causal_lm,
    check_dataset,
    check_placeable,
    worker_resources,
)
from llmflow.finetune.export import export_model, loss_plot_png, loss_table
from llmflow.finetune.loop import (
    EVAL_BATCH_SIZE,
    build_optimizer,
    check_finite_loss,
    eval_batch_rows,
    is_checkpoint_step,
    load_dtype,
    load_model,
    reply_loss,
    trainable_state,
)
from llmflow.finetune.trainer import run_key
from llmflow.refs import DatasetRef
from llmflow.tinymodel import build_tiny_model, example_texts

ROWS = generate_examples(200, seed=0)
CHAT = [
    {"role": "user", "content": "Reverse the digits: 1234"},
    {"role": "assistant", "content": "4321"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), example_texts(ROWS), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


# -- masking ---------------------------------------------------------------------------------
def test_loss_targets_are_the_assistant_reply_and_its_end_token_only(tokenizer):
    ids, labels = encode_chat(tokenizer, CHAT)
    assert len(ids) == len(labels)
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "4321<|end|>"
    # everything before the reply (bos, roles, the prompt) carries no loss
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert "1234" in tokenizer.decode(ids[:first])
    assert all(t == IGNORE_INDEX for t in labels[:first])


def test_template_without_generation_blocks_targets_the_last_reply(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    _, labels = encode_chat(tok, CHAT)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "4321<|end|>"


def test_collate_pads_right_and_pads_carry_no_loss():
    batch = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([5, 6], [IGNORE_INDEX, 6])]
    b = collate(batch, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 6, IGNORE_INDEX]]


def test_model_loss_counts_only_masked_tokens(tiny, tokenizer):
    """The HF loss over our labels equals cross-entropy averaged over assistant tokens."""
    import torch

    model = load_model(str(tiny), TrainConfig())
    b = collate([encode_chat(tokenizer, r["messages"]) for r in ROWS[:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**b)
    logits, labels = out.logits[:, :-1], b["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert float(out.loss) == pytest.approx(float(manual), rel=1e-5)


# -- batching, schedule, checks --------------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_step():
    args = {"n": 50, "seed": 3, "grad_accum": 2, "world": 2, "batch_size": 4}
    a = [
        batch_indices(step=s, micro=m, rank=r, **args)
        for s in range(20)
        for m in range(2)
        for r in range(2)
    ]
    b = [
        batch_indices(step=s, micro=m, rank=r, **args)
        for s in range(20)
        for m in range(2)
        for r in range(2)
    ]
    assert a == b
    # ranks of one micro-batch are disjoint; consecutive slices walk whole epochs
    assert not set(a[0]) & set(a[1])
    flat = [i for batch in a for i in batch]
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))
    assert flat[:50] != flat[50:100]  # each epoch is shuffled anew
    assert batch_indices(step=0, micro=0, rank=0, **{**args, "seed": 4}) != a[0]


def test_lr_warms_up_linearly_then_decays_by_cosine():
    peak, warmup, total = 1e-3, 10, 110
    assert lr_at(0, peak, warmup, total) == pytest.approx(1e-4)
    assert lr_at(4, peak, warmup, total) == pytest.approx(5e-4)
    assert lr_at(9, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(10, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(60, peak, warmup, total) == pytest.approx(peak / 2)
    assert lr_at(110, peak, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, peak, 0, total) == pytest.approx(peak)  # no warm-up
    lrs = [lr_at(s, peak, warmup, total) for s in range(warmup, total)]
    assert lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_names_the_step(bad):
    with pytest.raises(NonFiniteLoss, match=r"at step 17\b"):
        check_finite_loss(bad, 17)
    check_finite_loss(2.5, 17)


def test_checkpoints_every_n_steps_and_at_the_end():
    train = TrainConfig(max_steps=25, checkpoint_every=10)
    assert [s for s in range(1, 26) if is_checkpoint_step(s, train)] == [10, 20, 25]


def test_run_key_ignores_operational_fields():
    base = TrainConfig()
    key = run_key(base, "sha", "/m")
    same = base.model_copy(
        update={
            "max_failures": 0,
            "checkpoint_every": 7,
            "model_name": "x",
            "resources_per_worker": {"gpu_node": 1},
        }
    )
    assert run_key(same, "sha", "/m") == key  # where it runs is not what it learns
    assert run_key(base.model_copy(update={"learning_rate": 1e-4}), "sha", "/m") != key
    assert run_key(base, "other", "/m") != key and run_key(base, "sha", "/n") != key


NODE = {"Alive": True, "Resources": {"CPU": 2.0}}
GPU_NODE = {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}


def test_placeable_workers_pass():
    check_placeable(TrainConfig(num_workers=2, cpus_per_worker=1), [NODE])
    check_placeable(TrainConfig(num_workers=1, use_gpu=True), [NODE, GPU_NODE])


def test_unplaceable_workers_fail_with_the_numbers():
    with pytest.raises(InsufficientResources) as exc:
        check_placeable(TrainConfig(num_workers=3, cpus_per_worker=1), [NODE])
    msg = str(exc.value)
    assert "num_workers=3" in msg and "needs 3 CPU" in msg and "has 2 CPU in total" in msg
    with pytest.raises(InsufficientResources, match="needs .*2 GPU.* 1 GPU in total"):
        check_placeable(TrainConfig(num_workers=2, use_gpu=True), [NODE, GPU_NODE])
    # two 1.5-CPU workers do not fit on two 2-CPU nodes' worth... per node, only one each
    check_placeable(TrainConfig(num_workers=2, cpus_per_worker=1.5), [NODE, NODE])
    with pytest.raises(InsufficientResources, match="at most 1 such worker"):
        check_placeable(
            TrainConfig(num_workers=2, cpus_per_worker=1.5), [NODE, {**NODE, "Alive": False}]
        )


def test_custom_resources_place_workers_only_on_nodes_that_declare_them():
    train = TrainConfig(num_workers=1, resources_per_worker={"gpu_node": 1})
    assert worker_resources(train) == {"CPU": 1.0, "gpu_node": 1.0}  # no GPU: torch stays on CPU
    tagged = {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0, "gpu_node": 1.0}}
    check_placeable(train, [NODE, tagged])
    with pytest.raises(
        InsufficientResources,
        match=r"needs 1 CPU, 1 gpu_node, but the Ray cluster "
        r"has 4 CPU, 0 gpu_node in total and at most 0 such worker",
    ):
        check_placeable(train, [NODE, NODE])
    with pytest.raises(InsufficientResources, match="at most 1 such worker"):  # one per node
        check_placeable(train.model_copy(update={"num_workers": 2}), [NODE, tagged])


@pytest.mark.parametrize(
    "value, message",
    [
        ({"GPU": 1}, "GPU is set by train.use_gpu"),
        ({"CPU": 2}, "CPU is set by train.cpus_per_worker"),
        ({"gpu_node": 0}, "gpu_node: 0 is not a positive amount"),
        ({"gpu_node": 1.5}, "gpu_node: 1.5 is not a positive amount"),
        ({" ": 1}, "a resource name is empty"),
    ],
)
def test_resources_per_worker_is_validated(value, message):
    from llmflow.configfile import load_config
    from llmflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.resources_per_worker.*" + re.escape(message)):
        load_config(None, [f"train.resources_per_worker={json.dumps(value)}"])
    assert TrainConfig(resources_per_worker={"gpu_node": 0.5, "x": 2}).resources_per_worker == {
        "gpu_node": 0.5,
        "x": 2.0,
    }


# -- bad inputs ------------------------------------------------------------------------------
def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ModelError,
        match=r"model type 'bert' is not a causal language model "
        r"\(architectures: BertForMaskedLM\)",
    ):
        check_causal_lm(str(tmp_path))


def test_the_tiny_llama_is_a_causal_lm(tiny):
    check_causal_lm(str(tiny))


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="cannot read its config"):
        check_causal_lm(str(tmp_path))


def test_a_missing_dataset_is_refused(tmp_path):
    ref = DatasetRef(
        uri=str(tmp_path / "datasets" / "nope"), sha256="ab" * 32, num_train=1, num_eval=1
    )
    with pytest.raises(DatasetNotFound, match=r"datasets/nope: no manifest.json"):
        check_dataset(ref)


# -- the loss at real sizes --------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_reply_loss_is_the_models_loss_from_the_reply_positions_logits_only(
    tiny, tokenizer, lora
):
    """Issue 30: at 8 x 1024 tokens of a 152k vocabulary the whole batch's logits are 1.24 G
    values; the training loss takes only the positions that predict a target, and gives the
    loss and the gradients of ``model(**batch).loss``."""
    import torch

    rows = [encode_chat(tokenizer, r["messages"]) for r in ROWS[:6]]
    batch = collate(rows, tokenizer.pad_token_id)
    train = TrainConfig(lora=lora, lora_rank=4)
    model = load_model(str(tiny), train)
    shapes = []
    hook = model.register_forward_hook(lambda _m, _a, out: shapes.append(out.logits.shape))
    mine = reply_loss(model, batch)
    mine.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    hook.remove()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)
    kept, full = shapes
    targets = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).sum()
    assert kept[1] == targets < full[1] == batch["input_ids"].shape[1]


def test_a_lora_base_loads_in_bf16_on_a_bf16_gpu_and_its_adapter_trains_in_float32(tiny):
    import torch

    lora, full = TrainConfig(lora=True, lora_rank=4), TrainConfig()
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert load_dtype(lora, cuda, bf16_supported=True) == torch.bfloat16
    assert load_dtype(lora, cuda, bf16_supported=False) == torch.float32  # a V100
    assert load_dtype(lora, cpu, bf16_supported=True) == torch.float32
    assert load_dtype(full, cuda, bf16_supported=True) == torch.float32  # what trains: fp32
    model = load_model(str(tiny), lora, torch.bfloat16)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(
    tiny, tokenizer, lora
):
    import torch

    batch = collate([encode_chat(tokenizer, r["messages"]) for r in ROWS[:4]], 0)
    runs = {}
    for checkpointing in (False, True):
        train = TrainConfig(lora=lora, lora_rank=4, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = load_model(str(tiny), train)
        model.train()
        calls: list[int] = []
        [mlp] = [m for n, m in model.named_modules() if n.endswith("layers.0.mlp")]
        # A pre-hook: the recomputation stops early, inside the MLP, once it has what the
        # backward needs, so a hook after the MLP's forward would not see it.
        mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss = reply_loss(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[checkpointing] = (float(loss), grads, len(calls))
    (plain_loss, plain, once), (ckpt_loss, ckpt, twice) = runs[False], runs[True]
    assert (once, twice) == (1, 2)  # the layer ran again in the backward pass
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-4, atol=1e-6)
    # The same math: a run resumes whether or not it is turned on (an operational field).
    assert run_key(TrainConfig(gradient_checkpointing=True), "sha", "base") == run_key(
        TrainConfig(), "sha", "base"
    )


def test_eval_batches_are_bounded_by_their_logits_not_only_rows():
    from llmflow.engines.losses import LOGITS_BUDGET

    rows = [([1] * 300, [IGNORE_INDEX] * 300)] * 100
    assert eval_batch_rows(rows, vocab=500) == EVAL_BATCH_SIZE  # the tiny model: rows bound it
    qwen = eval_batch_rows(rows, vocab=151_936)  # Qwen2.5: 5 rows of 300 tokens, not 64
    assert qwen == LOGITS_BUDGET // (300 * 151_936) == 5
    assert qwen * 300 * 151_936 * 4 <= 1.1 * 2**30  # about 1 GiB of float32 logits, not 29 GB
    assert eval_batch_rows([([1] * 4096, [0] * 4096)], vocab=151_936) == 1  # never 0


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_resume_puts_the_optimizer_state_on_the_models_device(tiny, tokenizer, lora):
    """A checkpoint saved on one device (the CPU here) and resumed on another (a GPU in
    production; ``meta`` shows it without one): every AdamW moment lands on the device of its
    parameter, so the first step after the resume does not mix devices. Loading the state
    before moving the model left them on the CPU (issue 30)."""
    import torch

    train = TrainConfig(lora=lora, lora_rank=4, learning_rate=1e-3)
    model = load_model(str(tiny), train)
    opt, start = build_optimizer(model, train, torch.device("cpu"))
    assert start == 0 and not opt.state
    ids = torch.tensor([encode_chat(tokenizer, CHAT)[0]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = {"model": trainable_state(model), "optimizer": opt.state_dict(), "step": 7}

    resumed = load_model(str(tiny), train)
    opt2, start = build_optimizer(resumed, train, torch.device("meta"), state)
    assert start == 7
    trainable = [p for p in resumed.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "meta" for p in trainable)
    moments = [
        t for s in opt2.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
    ]
    assert len(moments) == 2 * len(trainable)
    assert {t.device.type for t in moments} == {"meta"}


# -- export ----------------------------------------------------------------------------------
def _perturbed_state(model, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in trainable_state(model).items()
    }


def test_lora_merge_exports_a_plain_model_directory(tiny, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    train = TrainConfig(lora=True, lora_rank=4, merge_lora=True)
    peft_model = load_model(str(tiny), train)
    state = _perturbed_state(peft_model)
    assert state and all("lora_" in k for k in state)  # only the adapter is trainable
    peft_model.load_state_dict(state, strict=False)

    assert export_model(str(tiny), state, train, tmp_path) == "merged"
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert "adapter_config.json" not in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([encode_chat(tokenizer, CHAT)[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny)
        assert not torch.allclose(base(ids).logits, merged(ids).logits)


def test_unmerged_lora_exports_the_adapter_with_its_base(tiny, tmp_path):
    train = TrainConfig(lora=True, lora_rank=4, merge_lora=False)
    state = _perturbed_state(load_model(str(tiny), train))
    assert export_model(str(tiny), state, train, tmp_path) == "adapter"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_full_finetune_exports_the_trained_weights(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    train = TrainConfig()
    model = load_model(str(tiny), train)
    state = _perturbed_state(model)
    assert export_model(str(tiny), state, train, tmp_path) == "full"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(dict(loaded.named_parameters())[name], state[name])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "merged"])
def test_an_export_keeps_the_base_models_dtype(tiny, tmp_path, lora):
    """A bf16 base (the real Qwen2.5 and Phi-3 checkpoints) exports bf16 weights, not the
    float32 the training ran in (issue 30: 15.3 GB a Phi-3 version)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny).to(torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    train = TrainConfig(lora=lora, lora_rank=4, merge_lora=True)
    out = tmp_path / "out"
    export_model(str(base), _perturbed_state(load_model(str(base), train)), train, out)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The tiny base is float32 and stays so (the test above loads its trained weights).
    assert export_model(str(tiny), {}, TrainConfig(), tmp_path / "f32") == "full"
    f32 = load_file(tmp_path / "f32" / "model.safetensors")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    # train.export_dtype overrides the base's.
    half = TrainConfig(export_dtype="bfloat16")
    assert export_model(str(tiny), {}, half, tmp_path / "bf16") == "full"
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}


# -- artifacts -------------------------------------------------------------------------------
HISTORY = {
    "train": [[s, 5.0 - s / 100, 1e-3] for s in range(1, 301)],
    "eval": [[150, 3.5], [300, 2.1]],
}


def test_loss_table_is_bounded_and_keeps_the_last_step():
    rows = loss_table(HISTORY, max_rows=100)
    assert len(rows) <= 101 and rows[0]["step"] == 1 and rows[-1]["step"] == 300
    assert rows[-1]["eval_loss"] == 2.1


def test_loss_plot_is_a_png():
    assert loss_plot_png(HISTORY, "t")[:8] == b"\x89PNG\r\n\x1a\n"


def _reduce_on_rank(rank: int, world: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    from llmflow.finetune.loop import all_sum

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        out.put((rank, all_sum([1.0, float(rank)], torch.device("cpu")), dist.get_backend()))
    finally:
        dist.destroy_process_group()


def test_all_sum_reduces_across_two_real_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reduce_on_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert results == [(0, [2.0, 1.0], "gloo"), (1, [2.0, 1.0], "gloo")]


def test_all_sum_hands_the_process_group_the_workers_device(monkeypatch):
    """NCCL refuses CPU tensors: the reduction must run on the device the worker trains on
    (the loop's own reductions built CPU tensors whatever the backend)."""
    import torch
    import torch.distributed as dist

    from llmflow.finetune.loop import all_sum

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: seen.append(t.device))
    assert all_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert seen == [torch.device("cpu")]
    import inspect

    import llmflow.finetune.loop as training

    loop = inspect.getsource(training.train_loop)
    assert loop.count("all_sum(") == 2 and loop.count(", device)") >= 2


def test_a_llamafactory_export_takes_the_export_dtype(tiny, tmp_path):
    """LlamaFactory's full checkpoints are float32 (it trains in them); the version is saved
    in the dtype export_dtype gives (the base's unless train.export_dtype says), as llmflow's
    own export is (issue 30: exports in fp32 double every replica's download)."""
    import torch
    from safetensors.torch import load_file

    from llmflow.finetune import llamafactory

    out = tmp_path / "lf"
    llamafactory.export_model(str(tiny), str(tiny), False, False, out, torch.bfloat16)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
