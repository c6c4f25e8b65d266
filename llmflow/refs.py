"""The small typed references that cross task boundaries; heavy data stays in the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    return datetime.now(UTC)


class Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(Ref):
    """A prepared, validated, content-addressed dataset: datasets/<sha16>/ in the store."""

    uri: str = Field(description="Directory holding train.parquet, eval.parquet, manifest.json.")
    sha256: str = Field(description="sha256 of the normalised rows and the prep config.")
    num_train: int = Field(ge=0)
    num_eval: int = Field(ge=0)
    num_quarantined: int = Field(0, ge=0)
    num_duplicates: int = Field(0, ge=0, description="Rows dropped as repeats of a kept row.")
    num_truncated: int = Field(0, ge=0, description="Rows cut to data.max_tokens.")
    validation_uri: str | None = None
    source: str = ""
    created_at: datetime = Field(default_factory=utcnow)

    @property
    def short_sha(self) -> str:
        return self.sha256[:16]


class ModelRef(Ref):
    """A registered model version: models/<name>/<version>/ in the store."""

    uri: str
    name: str
    version: str
    base_model: str
    dataset_sha256: str | None = None
    train_metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)


class TrainRun(Ref):
    """Where a Ray Train run ended: its directory, final checkpoint, loss history and metrics."""

    uri: str = Field(description="The run's directory (Ray Train storage: checkpoints).")
    checkpoint_uri: str = Field(description="The latest checkpoint (the last step trained).")
    metrics: dict[str, float] = Field(default_factory=dict)
    history: dict[str, list] = Field(
        default_factory=dict, description="train: [step, loss, lr] rows; eval: [step, loss]."
    )
    device: str = ""
    precision: str = Field("fp32", description="bf16 (autocast on a GPU that has it) or fp32.")
    backend: str = Field(
        "none",
        description="torch.distributed backend of the workers: nccl "
        "(GPUs), gloo (CPUs); none without a process group.",
    )
    node_id: str = ""
    world_size: int = 1
    reused: bool = Field(False, description="A finished run of the same inputs, not trained again.")


class EvalReport(Ref):
    """Scores of one model on one eval split."""

    model_uri: str
    model_version: str
    dataset_sha256: str
    engine: str
    metrics: dict[str, float]
    num_examples: int = Field(ge=0)
    device: str | None = Field(None, description="Where the engine generated: cpu, cuda.")
    predictions_uri: str | None = None
    throughput: dict[str, float] = Field(
        default_factory=dict, description="examples_per_s, tokens_per_s, latency percentiles."
    )
    benchmarks_uri: str | None = Field(
        None, description="eval.benchmarks: one row per task document, <task>/<metric> columns."
    )
    directions: dict[str, str] = Field(
        default_factory=dict, description="higher/lower of its metrics beyond the built-in ones."
    )


class MetricComparison(Ref):
    """One metric of a candidate against the champion on the same rows
    (llmflow/evaluate/paired.py). ``improvement``, ``low`` and ``high`` are candidate minus
    champion in the metric's better direction (positive: the candidate is better)."""

    metric: str
    lower_is_better: bool = False
    num_pairs: int = Field(ge=0)
    candidate: float
    champion: float
    improvement: float
    low: float | None = Field(None, description="The interval's bounds; None below 2 rows.")
    high: float | None = None
    wins: int = Field(0, ge=0)
    losses: int = Field(0, ge=0)
    ties: int = Field(0, ge=0)
    mcnemar_p: float | None = Field(None, description="McNemar's exact test, 0/1 metrics.")

    def interval(self, confidence: float) -> str:
        """``+0.003 (95% interval -0.008..+0.013; 4 won, 3 lost, 384 tied)``."""
        if self.low is None or self.high is None:
            bounds = "no interval: fewer than 2 rows"
        else:
            bounds = f"{confidence:.0%} interval {self.low:+.3g}..{self.high:+.3g}"
        return (
            f"{self.improvement:+.3g} ({bounds}; {self.wins} won, {self.losses} lost, "
            f"{self.ties} tied)"
        )


class Comparison(Ref):
    """Every metric both models score per row, compared pair by pair."""

    candidate_version: str = ""
    champion_version: str = ""
    confidence: float = 0.95
    num_pairs: int = Field(0, ge=0)
    metrics: dict[str, MetricComparison] = Field(default_factory=dict)


class GateRule(Ref):
    name: str
    passed: bool
    reason: str


class GateDecision(Ref):
    passed: bool
    rules: list[GateRule] = Field(default_factory=list)
    approved_by: str | None = None
    comment: str | None = None

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.rules]


class SmokeTest(Ref):
    passed: bool
    checks: list[dict[str, Any]] = Field(default_factory=list)


class CanaryStep(Ref):
    """One canary step: the candidate's share, what each version's requests did, the verdict."""

    weight: int
    seconds: float
    champion: dict[str, float] = Field(default_factory=dict)
    candidate: dict[str, float] = Field(default_factory=dict)
    decision: str = ""
    reason: str = ""


class Rollout(Ref):
    """What promotion did: the version now served and the one it replaced."""

    served_version: str | None
    previous_version: str | None
    endpoint: str | None = None
    smoke_test: SmokeTest | None = None
    rolled_back: bool = False
    message: str = ""
    strategy: str = "all-at-once"
    canary_steps: list[CanaryStep] = Field(default_factory=list)
