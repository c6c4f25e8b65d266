"""Pipeline configuration: one typed section per stage, loaded from YAML, overridable.

Defaults live here; environment differences (laptop, cluster, GPU) live in configs/*.yaml.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, field_validator, model_validator

from llmflow import trust
from llmflow.config_eval import BenchmarksConfig, JudgeConfig
from llmflow.sections import Bundles, EnvNames, EnvVars, Section


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
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows in the eval split.")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows.")
    min_rows: int = Field(10, ge=1, description="Fail validation below this many clean rows.")
    max_chars: int = Field(8000, ge=1, description="Drop examples longer than this.")
    max_tokens: int = Field(512, ge=1, description="Drop examples longer than this many tokens.")
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


class ServeAutoscaling(Section):
    """Serve's autoscaling: replicas follow the ongoing requests per replica."""

    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas (0 lets the app scale to zero)."
    )
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims at."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


DEFAULT_APP = "llmflow"


class RolloutPolicy(Section):
    """How a gated version takes over the traffic (serve.rollout)."""

    strategy: Literal["all-at-once", "canary"] = Field(
        "all-at-once",
        description="all-at-once: the candidate replaces the champion in one rolling update. "
        "canary: a router at the same endpoint gives the candidate each step's share of "
        "requests, comparing its errors and latency with the champion's; a breach rolls back.",
    )
    steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        description="canary: the candidate's percent of requests at each step, strictly "
        "increasing, ending at 100.",
    )
    step_s: float = Field(60.0, gt=0, description="canary: seconds each step lasts at least.")
    min_requests: int = Field(
        20,
        ge=1,
        description="canary: candidate requests a step needs before it is judged; a step that "
        "has not had them after max_wait_s is rolled back (not enough traffic).",
    )
    max_wait_s: float = Field(
        300.0, gt=0, description="canary: the longest a step waits for min_requests."
    )
    max_error_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="canary: how far the candidate's error rate (5xx and upstream failures) "
        "may exceed the champion's in the same step.",
    )
    max_p99_ratio: float = Field(
        1.5,
        gt=0,
        description="canary: the candidate's p99 latency over the champion's (the step's, "
        "else the last step that had champion requests) may be at most this.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or value[-1] != 100:
            raise ValueError("must end at 100 (the candidate takes all the traffic)")
        if any(not 1 <= v <= 100 for v in value):
            raise ValueError("each step is a percent in 1..100")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("must be strictly increasing")
        return value


class ServeConfig(Section):
    app_name: str = Field(DEFAULT_APP, description="Ray Serve application name.")
    route_prefix: str = Field(
        "/",
        description="HTTP route of the application. Unset: '/' for the app 'llmflow', "
        "'/<app_name>' for any other, so a second model never collides with the first.",
    )

    @model_validator(mode="before")
    @classmethod
    def _own_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and "route_prefix" not in data:
            app = data.get("app_name", DEFAULT_APP)
            if app != DEFAULT_APP:
                data = {**data, "route_prefix": f"/{app}"}
        return data

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="'auto' picks vllm (ray.serve.llm) when its engine environment is "
        "healthy and it can be placed (a GPU, or vllm_placement asks for CPUs only), else hf "
        "(the OpenAI-compatible app of deployments/openai_app.py).",
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replicas; unused with autoscaling.")
    autoscaling: ServeAutoscaling | None = Field(
        None, description="Scale replicas between min and max by load (replaces num_replicas)."
    )
    max_batch_size: int = Field(16, ge=1, description="hf: requests generated in one batch.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="hf: how long an idle replica waits for more requests once one arrives. "
        "0: start at once; under load a batch forms from what queued meanwhile.",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests a replica takes at once; empty: twice max_batch_size (hf), so a "
        "full batch can queue while the one before generates.",
    )
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Extra replicas (percent of the target) a rollout starts before stopping "
        "old ones. 100: every old replica serves until its replacement is ready (needs room "
        "for both); 0: old replicas stop first and requests wait while the new ones load.",
    )
    start_attempts: int | None = Field(
        None,
        ge=1,
        description="Starts of a replica that fails to load before its rollout fails and is "
        "rolled back (Serve's max_constructor_retry_count); empty: Serve's 3 a replica.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the bearer API key (hf); "
        "it must be set where the replicas run (the Ray nodes' environment).",
    )
    api_key_file: str | None = Field(
        None,
        description="Path of a file holding the bearer API key (hf), readable on every "
        "Ray node (e.g. a mounted Kubernetes secret); wins over api_key_env.",
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: engine arguments (max_model_len, dtype, ...)."
    )
    accelerator_type: str | None = Field(
        None, description="vllm: GPU type to place replicas on (e.g. A10G, H100); empty: any."
    )
    vllm_placement: Bundles | None = Field(
        None,
        description="vllm: Ray resource bundles of one replica, e.g. [{CPU: 1}] on CPUs; "
        "empty: one GPU.",
    )

    chat: bool = Field(
        False,
        description="Also serve the chat page (deployments/chat_app.py) as its own Serve "
        "application, at <route_prefix>/chat, talking to this model's endpoint.",
    )
    rollout: RolloutPolicy = Field(
        default_factory=RolloutPolicy,
        description="How the candidate takes over the traffic: all at once (default) or by "
        "canary steps judged on live requests.",
    )


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
