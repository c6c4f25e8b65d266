"""Config loading: files, --set overrides, and one-line errors naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmflow.config import PipelineConfig
from llmflow.configfile import apply_overrides, default_config, load_config
from llmflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_file_loads():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ has no YAML files"
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, PipelineConfig)


def test_tiny_is_the_cpu_default():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.train.base_model == "tiny"
    assert cfg.train.use_gpu is False
    assert cfg.data.source == "bundled"


def test_set_overrides_parse_yaml_scalars():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["train.max_steps=50", "train.lora=true", "train.learning_rate=1e-4", "data.max_rows=7"],
    )
    assert cfg.train.max_steps == 50
    assert cfg.train.lora is True
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.data.max_rows == 7


def test_set_can_build_nested_maps():
    cfg = load_config(None, ["gate.thresholds.exact_match=0.5", "cluster.env_vars.FOO=bar"])
    assert cfg.gate.thresholds == {"exact_match": 0.5}
    assert cfg.cluster.env_vars == {"FOO": "bar"}


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "unknown key 'train.max_stepz'" in msg and str(f) in msg
    assert "\n" not in msg and e.value.exit_code == 2


def test_unknown_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(f)


def test_wrong_type_names_key_and_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.max_steps" in str(e.value) and "'lots'" in str(e.value)


def test_out_of_range_value():
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        load_config(None, ["data.eval_fraction=1.5"])


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"^--set eval.batchsize=3: unknown key .eval.batchsize."):
        load_config(None, ["eval.batchsize=3"])


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train.max_steps=[1,"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [bad])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'max_steps' is not a section"):
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "malformed YAML at line" in str(e.value) and str(f) in str(e.value)


def test_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)


def test_config_round_trips_through_json():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=5"])
    again = PipelineConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg


def test_a_second_app_gets_its_own_route_prefix_by_default():
    from llmflow.configfile import load_config

    assert load_config(None).serve.route_prefix == "/"
    assert load_config(None, ["serve.app_name=qwen"]).serve.route_prefix == "/qwen"
    assert (
        load_config(None, ["serve.app_name=qwen", "serve.route_prefix=/"]).serve.route_prefix == "/"
    )


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", "phi-3-mini-4k-instruct"])
def test_the_gpu_configs_open_with_their_command_and_build_their_vllm_apps(name):
    """Each real-model config says how it runs and on what, and its vLLM serving app (as the
    promote stage builds it) validates as ray.serve.llm's LLMConfig."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from deployments.vllm_app import llm_config
    from llmflow.promote.apps import vllm_app_args
    from llmflow.refs import ModelRef

    path = ROOT / "configs" / f"{name}.yaml"
    head = path.read_text().splitlines()[:4]
    assert f"llmflow run pipeline --config configs/{name}.yaml" in head[1] and "GPU" in head[2]
    cfg = load_config(path)
    assert cfg.train.use_gpu and cfg.eval.engine == cfg.serve.engine == "vllm"
    assert cfg.train.attn_implementation == "sdpa"  # torch's own: on every GPU, no package
    assert cfg.serve.route_prefix == f"/{cfg.serve.app_name}" != "/"
    model = ModelRef(
        uri="/store/models/m/v1",
        name=cfg.train.model_name,
        version="v1",
        base_model=cfg.train.base_model,
    )
    llm = LLMConfig(**llm_config(vllm_app_args(cfg.serve, model)))
    assert llm.engine_kwargs["dtype"] == "bfloat16" and llm.placement_group_config["bundles"] == [
        {"GPU": 1.0}
    ]
    assert llm.deployment_config["max_surge_percent"] == 0  # one GPU: no room for two replicas


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.attn_implementation=flash_attention_2"], "flash_attention_2 runs on CUDA GPUs"),
        (["train.attn_implementation=flash"], "Input should be 'sdpa', 'eager' or"),
    ],
)
def test_an_attention_that_cannot_run_is_refused_before_any_work(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", sets)


def test_flash_attention_is_accepted_for_gpu_workers():
    sets = ["train.use_gpu=true", "train.attn_implementation=flash_attention_2"]
    assert load_config("configs/tiny.yaml", sets).train.attn_implementation == "flash_attention_2"


def test_the_flows_default_is_configs_tiny_yaml_and_importing_them_reads_no_config_file():
    import subprocess
    import sys

    assert default_config() == load_config(ROOT / "configs" / "tiny.yaml")
    probe = (
        "import sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == 'open' else None)\n"
        "import flows.pipeline, flows.check\n"
        "print([p for p in opened if p.endswith(('.yaml', '.yml')) and 'site-packages' not in p])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
