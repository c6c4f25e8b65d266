"""train.backend llamafactory: a LlamaFactory recipe against the train section (its keys map
onto it or are refused in one line), and the arguments the workers hand to run_exp."""

from __future__ import annotations

import pytest

from llmflow.config import TrainConfig
from llmflow.configfile import load_config
from llmflow.errors import ConfigError
from llmflow.finetune.recipe import DATASET_NAME, llamafactory_args

# The shape of LlamaFactory's own examples (examples/train_lora/llama3_lora_sft_ray.yaml).
SEED = """\
### model
model_name_or_path: {base}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 512
overwrite_cache: true

### output
output_dir: tmp_dir
logging_steps: 10
save_steps: 25
overwrite_output_dir: true

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
max_steps: 50
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true

### ray
ray_run_name: llama3_8b_sft_lora
ray_storage_path: ./saves
ray_num_workers: 4
resources_per_worker:
  GPU: 1
placement_strategy: PACK
"""


def test_the_seed_recipe_maps_onto_the_train_section(tmp_path):
    recipe = tmp_path / "seed.yaml"
    recipe.write_text(SEED.format(base="meta-llama/Meta-Llama-3-8B-Instruct"))
    cfg = load_config(None, ["train.backend=llamafactory", f"train.llamafactory={recipe}"])
    t = cfg.train
    assert (t.base_model, t.lora, t.lora_rank) == ("meta-llama/Meta-Llama-3-8B-Instruct", True, 4)
    assert (t.batch_size, t.grad_accum, t.learning_rate, t.max_steps) == (2, 4, 1e-4, 50)
    assert (t.checkpoint_every, t.num_workers, t.use_gpu) == (25, 4, True)
    assert t.llamafactory["template"] == "llama3"  # read from the file, kept inline
    assert "learning_rate" not in t.llamafactory  # mapped: the train section holds it
    assert t.epochs is None  # max_steps wins over num_train_epochs, as in transformers
    # A dump validates to the same config (workers and Prefect parameters re-validate it).
    assert TrainConfig.model_validate(t.model_dump(mode="json")) == t


def test_the_arguments_keep_llmflows_data_and_output_and_pass_the_rest(tmp_path):
    recipe = tmp_path / "seed.yaml"
    recipe.write_text(SEED.format(base="tiny"))
    cfg = load_config(None, ["train.backend=llamafactory", f"train.llamafactory={recipe}"])
    args = llamafactory_args(cfg.train.model_dump(mode="json"), "/models/tiny")
    assert args["dataset"] == DATASET_NAME and args["report_to"] == "none"
    assert "dataset_dir" not in args and "output_dir" not in args  # each worker's own
    assert args["model_name_or_path"] == "/models/tiny"  # the resolved base, not the name
    assert (args["template"], args["cutoff_len"], args["bf16"]) == ("llama3", 512, True)
    assert (args["logging_steps"], args["warmup_ratio"]) == (10, 0.1)
    assert (args["save_steps"], args["max_steps"], args["lora_rank"]) == (25, 50, 4)
    for key in ("ray_num_workers", "resources_per_worker", "ray_storage_path", "use_ray"):
        assert key not in args, key
    assert "num_train_epochs" not in args  # max_steps decides, as in transformers
    assert args["trust_remote_code"] is False  # the recipe's true is not taken


def test_without_a_recipe_the_arguments_come_from_the_train_section():
    sets = ["train.backend=llamafactory", "train.lora=true"]
    cfg = load_config("configs/tiny.yaml", sets)
    args = llamafactory_args(cfg.train.model_dump(mode="json"), "/m")
    assert args["finetuning_type"] == "lora" and args["lora_target"] == "all"
    assert args["learning_rate"] == cfg.train.learning_rate == 0.003
    assert args["max_steps"] == 300 and args["save_steps"] == cfg.train.checkpoint_every
    assert args["per_device_train_batch_size"] == 16 and args["stage"] == "sft"
    assert "template" not in args  # the tokenizer's own chat template
    assert "flash_attn" not in args  # LlamaFactory's auto, as transformers' default
    for ours, theirs in (("eager", "disabled"), ("sdpa", "sdpa")):
        cfg = load_config("configs/tiny.yaml", [*sets, f"train.attn_implementation={ours}"])
        assert llamafactory_args(cfg.train.model_dump(mode="json"), "/m")["flash_attn"] == theirs


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["train.learning_rate=0.1", "train.llamafactory={learning_rate: 1.0e-4}"],
            "train.llamafactory: learning_rate 0.0001 disagrees with train.learning_rate 0.1",
        ),
        (
            ["train.lora=false", "train.llamafactory={finetuning_type: lora}"],
            "train.llamafactory: finetuning_type 'lora' disagrees with train.lora False",
        ),
        (
            ["train.llamafactory={finetuning_type: freeze}"],
            "train.llamafactory: finetuning_type 'freeze': llmflow trains 'lora' or 'full'",
        ),
        (["train.llamafactory={stage: dpo}"], "train.llamafactory: stage 'dpo'"),
        (
            ["train.max_steps=50", "train.llamafactory={num_train_epochs: 3}"],
            "train.llamafactory: num_train_epochs 3 disagrees with train.max_steps 50",
        ),
        (
            ["train.llamafactory={lora_rank: four}"],
            "train.llamafactory: lora_rank: 'four' is not an integer",
        ),
        (["train.llamafactory=/no/such/recipe.yaml"], "train.llamafactory: /no/such/recipe.yaml"),
    ],
)
def test_a_recipe_that_disagrees_is_refused_in_one_line(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.backend=llamafactory", *sets])
    line = str(err.value)
    assert message in line and "\n" not in line and "(got" not in line


def test_a_recipe_without_its_backend_is_refused():
    with pytest.raises(
        ConfigError, match=": train.llamafactory is a recipe: set train.backend=llamafactory$"
    ):
        load_config(None, ["train.llamafactory={lora_rank: 4}"])


def test_epochs_become_steps_of_the_train_split_when_the_stage_runs():
    from llmflow.finetune.recipe import steps_for_epochs
    from llmflow.finetune.trainer import resolve_epochs, run_key

    cfg = load_config(
        None,
        [
            "train.backend=llamafactory",
            "train.llamafactory={num_train_epochs: 2.5, per_device_train_batch_size: 8}",
            "train.num_workers=2",
        ],
    )
    t = cfg.train
    assert t.epochs == 2.5 and TrainConfig.model_validate(t.model_dump(mode="json")) == t
    # 1000 rows, 16 a step (8 x 2 workers): 63 steps an epoch (the last one partial).
    assert steps_for_epochs(2.5, 1000, 8, 1, 2) == 158
    run = resolve_epochs(t, 1000)
    assert (run.max_steps, run.epochs) == (158, None)
    assert resolve_epochs(run, 5) is run  # no epochs: unchanged
    # The run's key follows the steps: more data, more steps, another run.
    assert run_key(run, "d", "b") != run_key(resolve_epochs(t, 2000), "d", "b")
    assert steps_for_epochs(1, 3, 16, 1, 1) == 1
