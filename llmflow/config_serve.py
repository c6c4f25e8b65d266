"""The serve section of the pipeline configuration (llmflow/config.py): the Serve app, its
replicas and autoscaling, and how a gated version takes over the traffic (serve.rollout)."""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmflow.sections import Bundles, Section


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
