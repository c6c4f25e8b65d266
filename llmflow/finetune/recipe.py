"""A LlamaFactory SFT recipe against llmflow's train section (``train.backend: llamafactory``).

Pure data, no LlamaFactory import: ``merge_recipe`` runs when the config is validated
(TrainConfig's before-validator), ``llamafactory_args`` when the train stage starts.

- Keys that overlap the train section (OVERLAP, ``finetuning_type``) map onto it: a key the
  train section does not set takes the recipe's value; one it sets must agree, else one line
  names both.
- LlamaFactory's Ray keys (``ray_num_workers``, ``resources_per_worker``) map onto llmflow's
  scaling; ``use_ray`` and the ``ray_*`` run settings are llmflow's to decide (it always
  trains on Ray, in its store).
- Keys that name data and output (OWNED) are llmflow's: the prepared dataset, the run's
  directory. They are left out of the arguments.
- Everything else (template, cutoff_len, lora_target, lora_alpha, bf16, ...) goes to
  LlamaFactory as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# LlamaFactory key -> (train field, type). The train section's names win in messages.
OVERLAP: dict[str, tuple[str, type]] = {
    "model_name_or_path": ("base_model", str),
    "lora_rank": ("lora_rank", int),
    "learning_rate": ("learning_rate", float),
    "per_device_train_batch_size": ("batch_size", int),
    "gradient_accumulation_steps": ("grad_accum", int),
    "max_steps": ("max_steps", int),
    "num_train_epochs": ("epochs", float),
    "warmup_steps": ("warmup_steps", int),
    "weight_decay": ("weight_decay", float),
    "save_steps": ("checkpoint_every", int),
    "save_total_limit": ("checkpoints_to_keep", int),
    "seed": ("seed", int),
    "ray_num_workers": ("num_workers", int),
}
# train.attn_implementation -> LlamaFactory's flash_attn (a recipe's own flash_attn wins).
FLASH_ATTN = {"sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}
# Where the data comes from and where the run goes: the prepared dataset and the run's
# directory in the store decide them.
OWNED = frozenset(
    {
        "dataset",
        "dataset_dir",
        "eval_dataset",
        "media_dir",
        "output_dir",
        "overwrite_output_dir",
        "logging_dir",
        "resume_from_checkpoint",
        "do_train",
        "do_eval",
        "do_predict",
        "report_to",
        "use_ray",
        "ray_run_name",
        "ray_storage_path",
        "ray_storage_filesystem",
        "ray_init_kwargs",
        "placement_strategy",
        # llmflow loads no remote code, whatever a recipe says (LlamaFactory's examples say true)
        "trust_remote_code",
    }
)
DATASET_NAME = "llmflow"  # the prepared train split's entry in dataset_info.json


class RecipeError(ValueError):
    """A recipe that cannot run as llmflow's train stage (the message names the key)."""


def read_recipe(value: Any) -> dict[str, Any]:
    """``train.llamafactory`` as a mapping: inline, or the YAML file a string names."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str | Path):
        raise RecipeError(
            f"train.llamafactory: expected the path of a LlamaFactory YAML or a mapping, "
            f"got {type(value).__name__}"
        )
    from llmflow.configfile import read_yaml
    from llmflow.errors import ConfigError

    try:  # its one line: a missing file, malformed YAML (where), not a mapping
        return read_yaml(Path(value).expanduser())
    except ConfigError as exc:
        raise RecipeError(f"train.llamafactory: {exc}") from None


def _as(kind: type, key: str, value: Any) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise RecipeError(f"train.llamafactory: {key}: {value!r} is not {what}") from None


def _implied(recipe: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """train field -> (the recipe key it comes from, the value it implies)."""
    out: dict[str, tuple[str, Any]] = {}
    for key, (field, kind) in OVERLAP.items():
        if recipe.get(key) is not None:
            out[field] = (key, _as(kind, key, recipe[key]))
    kind = recipe.get("finetuning_type")
    if kind is not None:
        if kind not in ("lora", "full"):
            raise RecipeError(
                f"train.llamafactory: finetuning_type {kind!r}: llmflow trains 'lora' or 'full'"
            )
        out["lora"] = ("finetuning_type", kind == "lora")
    stage = recipe.get("stage", "sft")
    if stage != "sft":
        raise RecipeError(f"train.llamafactory: stage {stage!r}: llmflow runs LlamaFactory's sft")
    resources = dict(recipe.get("resources_per_worker") or {})
    if resources:
        gpus = _as(float, "resources_per_worker.GPU", resources.pop("GPU", 0))
        out["use_gpu"] = ("resources_per_worker.GPU", gpus > 0)
        if "CPU" in resources:
            out["cpus_per_worker"] = ("resources_per_worker.CPU", float(resources.pop("CPU")))
        if resources:
            out["resources_per_worker"] = ("resources_per_worker", resources)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def merge_recipe(train: dict[str, Any]) -> dict[str, Any]:
    """The raw train section with the recipe read, its overlapping keys mapped onto it and
    left out of ``llamafactory`` (the rest of the recipe).

    Raises RecipeError (one line) for a key that disagrees with the train section."""
    out = dict(train)
    recipe = read_recipe(out["llamafactory"])
    # What maps onto the train section lives there only: a dump validates to the same config.
    out["llamafactory"] = {
        k: v
        for k, v in recipe.items()
        if k not in OVERLAP and k not in ("finetuning_type", "resources_per_worker")
    }
    implied = _implied(recipe)
    if "max_steps" in implied:  # max_steps wins over num_train_epochs, as in transformers
        implied.pop("epochs", None)
    elif "epochs" in implied and out.get("max_steps") is not None:
        raise RecipeError(
            f"train.llamafactory: num_train_epochs {recipe['num_train_epochs']!r} disagrees "
            f"with train.max_steps {out['max_steps']!r}: drop one of them"
        )
    for field, (key, value) in implied.items():
        if field not in out or out[field] is None:
            out[field] = value
        elif not _same(out[field], value):
            shown = recipe.get(key, value)
            raise RecipeError(
                f"train.llamafactory: {key} {shown!r} disagrees with train.{field} "
                f"{out[field]!r}: drop one of them"
            )
    return out


def llamafactory_args(train: dict[str, Any], base_model: str) -> dict[str, Any]:
    """The arguments of LlamaFactory's ``run_exp``, but for ``dataset_dir`` and
    ``output_dir``: each worker adds its local copies.

    ``train`` is the TrainConfig as a dict (recipe merged). Mapped keys come from the train
    section, owned ones from llmflow; the recipe's other keys pass through. ``template``
    defaults to none: LlamaFactory then formats with the tokenizer's own chat template, the
    one llmflow's scoring and serving apply.
    """
    recipe = dict(train.get("llamafactory") or {})
    passthrough = {
        k: v
        for k, v in recipe.items()
        if k not in OVERLAP
        and k not in OWNED
        and k not in ("finetuning_type", "stage", "resources_per_worker")
    }
    args: dict[str, Any] = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": base_model,
        "finetuning_type": "lora" if train["lora"] else "full",
        "learning_rate": train["learning_rate"],
        "per_device_train_batch_size": train["batch_size"],
        "gradient_accumulation_steps": train["grad_accum"],
        "max_steps": train["max_steps"],
        "warmup_steps": train["warmup_steps"],
        "weight_decay": train["weight_decay"],
        "lr_scheduler_type": "cosine",
        "seed": train["seed"],
        "save_steps": train["checkpoint_every"],
        "save_strategy": "steps",
        "logging_steps": 1,
        "dataset": DATASET_NAME,
        "overwrite_output_dir": True,
        "report_to": "none",
        "plot_loss": False,
        "trust_remote_code": False,
        "ddp_timeout": 1800,
        "include_num_input_tokens_seen": "non_padding",  # tokens/s in the train report
    }
    if train["lora"]:
        args.update(lora_rank=train["lora_rank"], lora_target="all", lora_dropout=0.0)
    if train.get("attn_implementation"):  # LlamaFactory's names for transformers' choices
        args["flash_attn"] = FLASH_ATTN[train["attn_implementation"]]
    return {**args, **passthrough}


def steps_for_epochs(epochs: float, num_train: int, batch: int, grad_accum: int, world: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``num_train`` rows: rows per step are
    batch x grad_accum x workers (a last partial batch counts as a step), at least one."""
    per_epoch = math.ceil(num_train / (batch * grad_accum * world))
    return max(1, math.ceil(epochs * per_epoch))
