"""The memory plan: each stage's peak GPU memory from the base model's config.json alone (no
weights, no tokenizer, no data), held against the GPU it runs on, before any work starts.

`llmflow plan --config FILE` prints it; every flow's preflight refuses a config whose GPU
stage cannot fit, in one line naming the largest term and a change that makes it fit.

The arithmetic, per GPU, for the decoder-only families llmflow serves (Llama, Qwen2, Phi-3,
Mistral: RMSNorm, rotary attention with grouped KV heads, a gated MLP):

- training: the weights (float32, or bf16 for a LoRA run's frozen base on a GPU), AdamW's
  two moments of what trains (float32: 8 bytes a parameter), DDP's gradient buckets with
  more than one worker, the activations autograd keeps (per token and layer,
  ``activation_bytes``; with gradient checkpointing one float32 hidden state a layer plus one
  layer's worth during its recomputation), and the larger of the gradients (4 bytes a
  trained parameter) and the loss's logits at the reply positions (at most every token of a
  batch of ``data.max_tokens`` rows: in the backward pass the float32 log-softmax, its
  gradient and the logits' gradient, 12 bytes each), which are freed before most gradients
  exist;
- the eval-loss pass: the weights and the loss passes' logits budget (engines/losses.py);
- a vLLM engine: what vLLM takes by construction, ``gpu_memory_utilization`` of the GPU,
  checked to hold the bf16 weights and the KV cache of one ``max_model_len`` sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmflow.errors import ConfigError

if TYPE_CHECKING:
    from llmflow.config import PipelineConfig

GB = 1e9
# What vLLM takes when vllm_engine_kwargs does not say (its own default).
VLLM_UTILIZATION = 0.9


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model, read from its config.json."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Shape:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                vocab=int(cfg["vocab_size"]),
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                intermediate=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                tied=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"train.base_model: config.json lacks {exc} for a memory plan"
            ) from None

    @property
    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def lora_params(self, rank: int) -> int:
        """An adapter of ``rank`` on every linear layer of the decoder (PEFT's all-linear)."""
        return self.layers * sum(rank * (a + b) for a, b in self.linears)

    def activation_bytes(self, half: bool) -> int:
        """What autograd keeps per token and layer: the norms' float32 inputs and their
        outputs, q/k/v before and after the rotary embedding, attention's output, the MLP's
        gate, up, activation and product. ``half``: under bf16 autocast (2-byte copies)."""
        e = 2 if half else 4
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return 2 * (4 * h + e * h) + 2 * e * (q + 2 * kv) + e * q + 4 * e * i

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass
class Stage:
    """One stage's peak on one GPU: its terms (name, bytes), largest first."""

    name: str
    terms: list[tuple[str, float]] = field(default_factory=list)
    gpu: bool = True  # held against a GPU (else it runs on CPU: shown, not held)
    limit: float | None = None  # the stage's own cap (vLLM's utilization), bytes
    # Terms that never peak together: only the largest of them counts.
    apart: tuple[str, ...] = ()

    @property
    def peak(self) -> float:
        together = sum(b for n, b in self.terms if n not in self.apart)
        return together + max((b for n, b in self.terms if n in self.apart), default=0.0)

    def largest(self) -> tuple[str, float]:
        return max(self.terms, key=lambda t: t[1])


def training(cfg: PipelineConfig, shape: Shape) -> Stage:
    train = cfg.train
    on_gpu = train.use_gpu
    half = on_gpu  # bf16 autocast on the GPU (fp32 on CPU)
    stage = Stage("train", gpu=on_gpu)
    if train.lora:
        base_bytes = 2 if on_gpu else 4
        trainable = shape.lora_params(train.lora_rank)
        stage.terms.append(("weights (frozen base)", shape.params * base_bytes))
        stage.terms.append(("weights (adapter)", trainable * 4))
    else:
        trainable = shape.params
        stage.terms.append(("weights (float32)", trainable * 4))
    stage.terms.append(("gradients", trainable * 4))
    stage.terms.append(("AdamW state", trainable * 8))
    if train.num_workers > 1:
        stage.terms.append(("DDP gradient buckets", trainable * 4))
    tokens = train.batch_size * cfg.data.max_tokens
    per_layer = shape.activation_bytes(half)
    if train.gradient_checkpointing:
        kept = tokens * shape.layers * shape.hidden * 4 + tokens * per_layer
        stage.terms.append(("activations (checkpointed)", kept))
    else:
        stage.terms.append(("activations", tokens * shape.layers * per_layer))
    if train.attn_implementation == "eager":
        # Eager attention builds each layer's batch x heads x T x T scores: their float32
        # softmax is kept for the backward pass (and its half copy under autocast), and the
        # masked scores (the softmax's input) exist beside it while a layer runs. sdpa and
        # flash attention keep none of it. Measured on CPU: tests/unit/test_plan.py.
        scores = train.batch_size * shape.heads * cfg.data.max_tokens**2
        e = 2 if half else 4
        kept = scores * (4 + (2 if half else 0))
        layers = 1 if train.gradient_checkpointing else shape.layers
        stage.terms.append(("attention scores (eager)", layers * kept + scores * e))
    stage.terms.append(("logits at reply positions (at most)", tokens * shape.vocab * 12))
    # The loss's logits and their gradient are freed once the backward pass leaves the output
    # layer, before most gradients exist: measured on CPU, summing both overshot by up to 24%.
    stage.apart = ("gradients", "logits at reply positions (at most)")
    return stage


def eval_loss(shape: Shape, dtype_bytes: int) -> Stage:
    """The evaluate stage's loss pass: its own actor, the model in its checkpoint's dtype."""
    from llmflow.engines.losses import LOGITS_BUDGET

    stage = Stage("eval loss")
    stage.terms.append(("weights", shape.params * dtype_bytes))
    stage.terms.append(("logits of one pass (budget)", LOGITS_BUDGET * 12))
    return stage


def vllm_engine(section, name: str, shape: Shape, gpu_bytes: float | None) -> Stage:
    kwargs = dict(section.vllm_engine_kwargs)
    max_len = int(kwargs.get("max_model_len") or 2048)
    stage = Stage(name)
    stage.terms.append(("weights (bf16)", shape.params * 2))
    stage.terms.append(
        (f"KV cache of one {max_len}-token sequence", max_len * shape.kv_bytes_per_token())
    )
    if gpu_bytes:
        stage.limit = float(kwargs.get("gpu_memory_utilization", VLLM_UTILIZATION)) * gpu_bytes
    return stage


def plan(cfg: PipelineConfig, model_config: Mapping[str, Any], gpu_gb: float | None) -> list[Stage]:
    """Every stage of ``cfg`` that runs on a GPU, and training on CPU too (shown, not held)."""
    shape = Shape.from_config(model_config)
    gpu = gpu_gb * GB if gpu_gb else None
    dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    stages = [training(cfg, shape)]
    if cfg.train.use_gpu:  # a cluster with GPUs gives the loss actor one
        stages.append(eval_loss(shape, 2 if dtype in ("bfloat16", "float16") else 4))
    for key, section in (("eval", cfg.eval), ("serve", cfg.serve)):
        if _vllm_on_gpu(section):
            stages.append(vllm_engine(section, f"{key} (vLLM)", shape, gpu))
    return stages


def _vllm_on_gpu(section) -> bool:
    return section.engine == "vllm" and any(
        "GPU" in b for b in (section.vllm_placement or [{"GPU": 1}])
    )


def plan_uses_gpu(cfg: PipelineConfig) -> bool:
    """Whether some stage of the plan is held against a GPU (without reading config.json)."""
    return cfg.train.use_gpu or any(_vllm_on_gpu(s) for s in (cfg.eval, cfg.serve))


def lines(stages: Iterable[Stage], gpu_gb: float | None) -> list[str]:
    out = []
    for stage in stages:
        where = "per GPU" if stage.gpu else "on CPU"
        out.append(f"{stage.name} ({where}): {stage.peak / GB:.1f} GB")
        for name, b in sorted(stage.terms, key=lambda t: -t[1]):
            out.append(f"  {name:<40} {b / GB:8.2f} GB")
        if stage.limit:
            out.append(f"  {'vLLM takes (gpu_memory_utilization)':<40} {stage.limit / GB:8.2f} GB")
        if stage.apart:
            out.append(f"  (only the larger of {' and '.join(stage.apart)} counts: never together)")
    return out


# What makes each term smaller, as a config change to name in the refusal.
FIXES = {
    "activations": "train.gradient_checkpointing: true",
    "attention scores (eager)": "train.attn_implementation: sdpa",
    "logits at reply positions (at most)": "a smaller train.batch_size (with train.grad_accum)",
    "weights (float32)": "train.lora: true",
    "AdamW state": "train.lora: true",
    "gradients": "train.lora: true",
}


def verdict(stages: list[Stage], gpu_gb: float | None, cfg: PipelineConfig) -> tuple[bool, str]:
    """(fits, the plan's last line): the largest per-GPU peak against the GPU's memory."""
    held = [s for s in stages if s.gpu]
    if not held:
        return True, "plan: no stage runs on a GPU"

    def share(stage: Stage) -> float:  # of what the stage may use
        return stage.peak / (stage.limit or (gpu_gb or 1) * GB)

    worst = max(held, key=share)
    if not gpu_gb:
        return True, (
            f"plan: {worst.name} peak {worst.peak / GB:.1f} GB per GPU (no GPU memory to hold it "
            "against: set cluster.gpu_memory_gb, or run it on the cluster)"
        )
    room = worst.limit or gpu_gb * GB
    fits = worst.peak <= room
    share = " (vLLM's gpu_memory_utilization share)" if worst.limit else ""
    line = (
        f"plan: {worst.name} peak {worst.peak / GB:.1f} GB of {room / GB:.1f} GB{share} per "
        "GPU: " + ("fits" if fits else "does not fit")
    )
    if not fits:
        name, b = worst.largest()
        fix = FIXES.get(name, "")
        if worst.limit:
            fix = f"{worst.name.split()[0]}.vllm_engine_kwargs.max_model_len or gpu_memory_utilization"
        elif name == "logits at reply positions (at most)":
            fix = f"train.batch_size {cfg.train.batch_size} -> {max(1, cfg.train.batch_size // 4)}"
        line += f"; largest: {name} {b / GB:.1f} GB" + (f" ({fix})" if fix else "")
    return fits, line


def read_model_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The base model's config.json: the tiny model's (built once), a local directory's, or
    the hub's config file alone."""
    from pathlib import Path

    from llmflow.basemodels import base_model_config, resolve_base_model
    from llmflow.engines import loadable_path

    train = cfg.train
    where = resolve_base_model(train) if train.base_model == "tiny" else base_model_config(train)
    path = Path(loadable_path(where)) / "config.json"
    return json.loads(path.read_text())


def report(cfg: PipelineConfig, gpu_gb: float | None = None) -> tuple[list[str], bool]:
    """The plan's lines, its verdict last, and whether every GPU stage fits."""
    gpu_gb = gpu_gb or cfg.cluster.gpu_memory_gb
    stages = plan(cfg, read_model_config(cfg), gpu_gb)
    fits, last = verdict(stages, gpu_gb, cfg)
    return [*lines(stages, gpu_gb), last], fits


def gpu_memory_here() -> list[float]:
    """The memory of each GPU of this machine, GB, as ``nvidia-smi`` reports it (it sees every
    GPU whatever CUDA_VISIBLE_DEVICES says, so a task holding none can ask); [] without it."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [float(line) * 2**20 / GB for line in out.split() if line.strip()]  # MiB
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def gpu_memory_on_nodes(nodes: list[dict[str, Any]]) -> float | None:
    """The smallest GPU of the alive nodes that have GPUs (``ray.nodes()`` entries), GB, asked
    of a task that holds no CPU and no GPU, pinned to each such node; None when no node
    could say (no GPU nodes, no nvidia-smi)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gpu_nodes = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    if not gpu_nodes:
        return None
    task = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(gpu_memory_here)
    refs = [
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in gpu_nodes
    ]
    sizes = [gb for answer in ray.get(refs, timeout=60) for gb in answer]
    return min(sizes) if sizes else None


def check_memory(cfg: PipelineConfig, gpu_gb: float | None = None) -> list[str]:
    """The plan's lines; ConfigError (its last line) when a GPU stage cannot fit."""
    out, fits = report(cfg, gpu_gb)
    if not fits:
        raise ConfigError(out[-1])
    return out
