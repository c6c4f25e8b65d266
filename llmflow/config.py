"""Pipeline configuration: one typed section per stage, loaded from YAML, overridable.

Defaults live here; environment differences (laptop, cluster, GPU) live in configs/*.yaml.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, field_validator, model_validator

from llmflow import trust
from llmflow.config_eval import BenchmarksConfig, JudgeConfig
from llmflow.config_serve import ServeConfig
from llmflow.sections import Bundles, EnvNames, EnvVars, Section

# What data.columns maps a dataset's own columns onto (llmflow/prepare/records.py reads them).
COLUMN_TARGETS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "response",  # the same as completion
    "system",
)


class DataConfig(Section):
    source: str = Field(
        "bundled",
        description="Where the instruction data comes from: 'bundled' (the synthetic task "
        "shipped with llmflow), a local JSONL/JSON/CSV/Parquet file or folder, a dataset "
        "saved with save_to_disk, or a Hugging Face hub id.",
    )
    revision: str | None = Field(
        None,
        description="Hub datasets: a commit, branch or tag (default main), resolved to its "
        "commit when prepare runs; the commit is the source's fingerprint.",
    )
    subset: str | None = Field(
        None, description="Hub datasets: the configuration (subset) name, e.g. 'main'."
    )
    split: str | None = Field(
        None,
        description="The split to train on: a hub dataset's or a saved DatasetDict's (default "
        "train), or the files of a folder named after it (train.jsonl, train/...).",
    )
    eval_split: str | None = Field(
        None,
        description="Evaluate on the dataset's own split (e.g. test, validation) instead of "
        "drawing eval_fraction of the rows; a training row that repeats one of its rows is "
        "dropped, so no eval row is trained on.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Your columns onto the recognised fields, e.g. {prompt: question, "
        "completion: answer, system: context}: the targets are " + ", ".join(COLUMN_TARGETS),
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows in the eval split.")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows.")
    min_rows: int = Field(10, ge=1, description="Fail validation below this many clean rows.")
    max_chars: int = Field(8000, ge=1, description="Drop examples longer than this.")
    max_tokens: int = Field(
        512,
        ge=1,
        description="Examples longer than this many tokens (the model's) are quarantined.",
    )
    truncation: Literal["quarantine", "truncate"] = Field(
        "quarantine",
        description="What becomes of an example over max_tokens: quarantined, or truncated to "
        "fit (the reply's end is cut; a prompt over half of max_tokens loses its start first), "
        "counted in the stage line and the validation report.",
    )
    max_quarantine_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the run when more rows than this are quarantined."
    )
    max_duplicate_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fail validation when more than this share of a split's rows repeat an "
        "id (a content hash) already in that split.",
    )
    seed: int = Field(0, description="Seed of the bundled task's generator.")

    @field_validator("columns")
    @classmethod
    def _column_targets(cls, value: dict[str, str]) -> dict[str, str]:
        for target, column in value.items():
            if target not in COLUMN_TARGETS:
                raise ValueError(
                    f"{target}: not a field llmflow reads ({', '.join(COLUMN_TARGETS)})"
                )
            if not column.strip():
                raise ValueError(f"{target}: the column name is empty")
        return value


class TrainConfig(Section):
    base_model: str = Field(
        "tiny",
        description="Base model: 'tiny' (built locally, deterministic), a local HF directory "
        "or a hub id.",
    )
    base_model_revision: str | None = Field(
        None,
        description="Hub base models: a commit, branch or tag (default main), resolved to its "
        "commit when the stage runs; the pinned snapshot is what trains (and the cache keys).",
    )
    model_name: str = Field("llmflow-tiny", description="Registry name of the fine-tuned model.")
    max_steps: int = Field(300, ge=1, description="Optimizer steps (unless epochs is set).")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the train split: the stage computes the steps."
    )
    batch_size: int = Field(16, ge=1, description="Examples per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(0.0, ge=0)
    lora: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    lora_rank: int = Field(8, ge=1)
    merge_lora: bool = Field(True, description="Merge the adapter into the base when saving.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass: one layer's "
        "held instead of all (real models at 1024 tokens need it), about a third more compute.",
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of a full or merged version's weights; empty: the base's."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="transformers' attention in training: sdpa (torch's: every GPU and CPU), "
        "eager (keeps each layer's T x T scores), flash_attention_2 (needs the flash-attn "
        "package on the GPU nodes); empty: transformers' default for the architecture.",
    )
    eval_every: int = Field(50, ge=1, description="Eval loss every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps.")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated before giving up.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Place each training worker on a GPU.")
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each training worker reserves besides its CPUs and "
        "GPU, e.g. {gpu_node: 1}: the workers then run only on nodes that declare them (the "
        "extra nodes of 'llmflow up --nodes 2', a KubeRay group's rayStartParams.resources).",
    )
    seed: int = Field(0)
    backend: Literal["llmflow", "llamafactory"] = Field(
        "llmflow",
        description="Who trains inside the TorchTrainer's workers: llmflow's own loop, or "
        "LlamaFactory's SFT in its environment (.venv-llamafactory; make install builds it). "
        "Either way the same scaling, checkpoints in the store, failure handling and resume.",
    )
    llamafactory: dict[str, Any] | None = Field(
        None,
        description="train.backend llamafactory: a LlamaFactory SFT recipe (a YAML path, or "
        "inline). Keys that overlap this section, and its Ray keys, map onto it (refused in one "
        "line when they disagree); the rest goes to LlamaFactory. Unset: derived from here.",
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_llamafactory_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("llamafactory") is None:
            return data
        if data.get("backend") != "llamafactory":
            raise ValueError("train.llamafactory is a recipe: set train.backend=llamafactory")
        from llmflow.finetune.recipe import merge_recipe

        return merge_recipe(data)

    @model_validator(mode="after")
    def _attention_exists(self) -> TrainConfig:
        if self.attn_implementation == "flash_attention_2" and not self.use_gpu:
            raise ValueError(
                "train.attn_implementation: flash_attention_2 runs on CUDA GPUs only: set "
                "train.use_gpu: true, or use sdpa (every device)"
            )
        return self

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU"):
                key = "cpus_per_worker" if name == "CPU" else "use_gpu"
                raise ValueError(f"{name} is set by train.{key}, not here")
            if not name.strip():
                raise ValueError("a resource name is empty")
            # Ray's rule: an amount above 1 must be whole (fractions share one unit).
            if amount <= 0 or (amount > 1 and amount != int(amount)):
                raise ValueError(
                    f"{name}: {amount:g} is not a positive amount (a fraction up "
                    "to 1, or a whole number)"
                )
        return value


class EvalConfig(Section):
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="'auto' picks vllm when its engine environment is healthy and it can be "
        "placed (a GPU in the cluster, or vllm_placement asks for CPUs only), else hf.",
    )
    # The defaults are measured for the tiny model on 2 CPU cores (bench/score.py, whole job,
    # start-up included): one actor of one torch thread, batch 256. One thread is the robust
    # choice where the cores are shared: with one core busy elsewhere, 1 x 1 scored 5,000
    # prompts in 17.3 s and 1 x 2 in 98.7 s (two threads spin-wait on a busy core). On a
    # dedicated machine set threads_per_actor to the cores: quiet, 1 x 2 took 15.0 s against
    # 19.8 s for 1 x 1. A second actor costs ~8 CPU s of imports and model load, more than it
    # saves on 2 cores. On GPUs set concurrency to the number of GPUs.
    batch_size: int = Field(256, ge=1, description="Prompts per generate call.")
    concurrency: int = Field(1, ge=1, description="Scoring actors (vllm: engine replicas).")
    cpus_per_actor: float = Field(1, gt=0, description="hf: CPUs Ray reserves per actor.")
    threads_per_actor: int | None = Field(
        None, ge=1, description="hf: torch threads per actor; empty: cpus_per_actor, at least 1."
    )
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    max_examples: int | None = Field(None, ge=1, description="Score at most this many.")
    extra_metrics: list[str] = Field(
        default_factory=list, description="Plug-in metrics by name (llmflow.metrics entry points)."
    )
    judge: JudgeConfig | None = Field(None, description="An LLM judge: the judge metric.")
    benchmarks: BenchmarksConfig | None = Field(None, description="lm-eval tasks as metrics.")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: engine arguments (max_model_len, dtype, kv_cache_memory_bytes: "
        "required on CPUs, where vLLM otherwise reserves 92% of the RAM).",
    )
    vllm_placement: Bundles | None = Field(
        None,
        description="vllm: Ray resource bundles of one engine replica, e.g. [{CPU: 1}] on CPUs "
        "or [{GPU: 1}, {GPU: 1}] for tensor_parallel_size 2; empty: one GPU.",
    )


class GateConfig(Section):
    """The promotion policy: the primary metric's paired interval of the improvement over the
    champion (llmflow/evaluate/paired.py) must lie above min_improvement (superiority: a tie
    or a gain within noise does not promote) or at/above -max_regression (non-inferiority)."""

    primary_metric: str = Field("exact_match", description="Metric the candidate must improve.")
    policy: Literal["superiority", "non-inferiority"] = "superiority"
    confidence: float = Field(0.95, gt=0.5, lt=1, description="The intervals' confidence level.")
    min_improvement: float = Field(0.0, ge=0, description="superiority: the bound to exceed.")
    max_regression: float = Field(0.0, ge=0, description="non-inferiority: the loss tolerated.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Absolute minimum per metric."
    )
    guardrails: dict[str, float] = Field(
        default_factory=dict,
        description="Metric -> largest regression tolerated (the interval's worst case).",
    )
    require_approval: bool = Field(False, description="Pause for a human decision in the UI.")
    approval_timeout_s: int = Field(3600, ge=1)


class ClusterConfig(Section):
    ray_address: str | None = Field(
        None,
        description="Ray head address (host:port or ray://...). Empty means the local stack "
        "started by 'llmflow up'.",
    )
    prefect_api_url: str | None = Field(
        None, description="Prefect API URL. Empty means the local stack's server."
    )
    env_vars: EnvVars = Field(
        default_factory=dict, description="Extra environment for Ray workers (no secrets)."
    )
    secret_env: EnvNames = Field(
        default_factory=list, description="Secrets the nodes must have set (names: HF_TOKEN)."
    )
    serve_url: str | None = Field(
        None,
        description="Base URL of the cluster's Ray Serve HTTP proxy (e.g. http://ray-head:8000): "
        "the promote stage's smoke test, the CLI's sample answer and the chat call it. Empty: "
        "LLMFLOW_SERVE_URL, else the local stack's.",
    )
    autoscaling: bool = Field(
        False,
        description="The cluster starts nodes on demand (KubeRay's autoscaler): the flows do "
        "not check the stages' resources against the nodes alive at the start.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU of the cluster: every flow holds the memory plan "
        "(`llmflow plan`) against it before any work; empty: the smallest GPU the nodes "
        "report (nvidia-smi).",
    )


Cluster = Annotated[ClusterConfig, pydantic.BeforeValidator(trust.no_interpreters)]  # no code


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: Cluster = Field(default_factory=ClusterConfig)
