"""Generation engines: one interface, two implementations (hf, and vllm in its own engine
environment: llmflow.engine_env), each on CPUs or GPUs.

An engine is a Ray Data transform. It takes rows with a ``prompt_messages`` column (the chat
up to, not including, the reply to generate: a list of ``{role, content}``) and returns them
with the columns of ``OUTPUT_COLUMNS`` added. Engines are composed from small parts (a class
UDF, a processor) rather than derived from a base class; ``Engine`` is the whole contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llmflow.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

    from llmflow.config import ClusterConfig, EvalConfig, PipelineConfig

ENGINES = ("hf", "vllm")

# What every engine adds to a row, and what scoring reads.
OUTPUT_COLUMNS = {
    "generation": "the generated text, special tokens removed",
    "num_prompt_tokens": "prompt tokens the model saw (after truncation)",
    "num_generated_tokens": "tokens generated, the closing end token included",
    "prompt_truncated": "the prompt was cut from the left to fit the model's context",
    "empty_generation": "the generation is empty or only whitespace",
    "batch_id": "which generate call produced the row (hf) or its batch (vllm)",
    "latency_s": "seconds of that generate call (hf) or of the row's request (vllm)",
}


@runtime_checkable
class Engine(Protocol):
    """Batch generation over a Ray Dataset; see the module docstring for the columns."""

    name: str

    def generate(self, ds: ray.data.Dataset) -> ray.data.Dataset: ...


def vllm_available(
    cluster: ClusterConfig | None = None, placement: list[dict[str, float]] | None = None
) -> bool:
    """Whether the vLLM engine environment is present and healthy (llmflow.engine_env); vllm
    never lives in this venv."""
    from llmflow import engine_env

    return engine_env.available(cluster, placement)


def cuda_available() -> bool:
    """A GPU for vLLM: in the connected Ray cluster's resources, else torch's view here."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception as exc:  # noqa: BLE001 - no cluster to ask: fall back to this machine
        import logging

        logging.getLogger(__name__).debug("no GPU count from Ray (%s): asking torch", exc)
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - a broken torch means no GPU here
        import logging

        logging.getLogger(__name__).warning("torch cannot say whether CUDA works (%s): no GPU", exc)
        return False


def placeable(bundles: list[dict[str, float]] | None) -> bool:
    """Whether a vLLM replica of these bundles can be placed: CPU-only bundles always, GPU
    ones (the default: one GPU) only where a GPU is."""
    wants_gpu = bundles is None or any(b.get("GPU", 0) > 0 for b in bundles)
    return not wants_gpu or cuda_available()


def select_engine(
    name: str,
    cluster: ClusterConfig | None = None,
    placement: list[dict[str, float]] | None = None,
    key: str = "eval.engine",
) -> str:
    """The engine to use: 'hf' or 'vllm'.

    'auto' picks vllm when its engine environment is healthy and a replica of ``placement``
    can be placed (so it never waits for a GPU that is not there), else hf. An explicit 'vllm'
    with a missing or mismatched environment is one clear error here, before cluster work.
    """
    if name == "auto":
        return "vllm" if placeable(placement) and vllm_available(cluster, placement) else "hf"
    if name not in ENGINES:
        raise ConfigError(f"{key}: unknown engine {name!r} (expected auto, hf or vllm)")
    if name == "vllm":
        from llmflow import engine_env

        engine_env.check(cluster, key=key, placement=placement)
    return name


def make_engine(
    name: str,
    eval_cfg: EvalConfig,
    model_path: str,
    cluster: ClusterConfig | None = None,
    **options: Any,
) -> Engine:
    """The engine ``select_engine(name)`` picks, set up from ``eval_cfg`` for ``model_path``.

    Args:
        name: 'auto', 'hf' or 'vllm'.
        eval_cfg: batch size, concurrency, max_new_tokens, temperature, vllm_engine_kwargs,
            vllm_placement.
        model_path: a Hugging Face model directory (a local path or a store URI).
        cluster: where the vLLM engine environment is (cluster.vllm_python) and its env_vars.
        options: engine-specific knobs (hf: num_cpus, num_gpus, torch_threads, seed).
    """
    chosen = select_engine(name, cluster, eval_cfg.vllm_placement)
    if chosen == "vllm":
        from llmflow.engines.vllm import VLLMEngine

        return VLLMEngine(eval_cfg, model_path, cluster=cluster, **options)
    from llmflow.engines.hf import HFEngine

    return HFEngine(eval_cfg, model_path, **options)


def check_engines(
    config: PipelineConfig, stages: tuple[str, ...] = ("eval", "serve")
) -> dict[str, str]:
    """The engine each stage of ``config`` will use ({"eval": "hf", "serve": "vllm"}); one
    clear ConfigError line when an explicit vllm cannot run (its engine environment missing,
    broken, or not matching the cluster). Flows call it before any cluster work."""
    chosen = {}
    for stage in stages:
        section = getattr(config, stage)
        chosen[stage] = select_engine(
            section.engine, config.cluster, section.vllm_placement, key=f"{stage}.engine"
        )
    return chosen


def check_model_dir(model_uri: str) -> None:
    """Fail early, with one line, when ``model_uri`` is not a loadable model directory.

    It must hold config.json, a tokenizer (tokenizer.json or tokenizer_config.json) and
    safetensors weights. Raises ModelError naming the directory and what is missing.
    """
    import fsspec

    from llmflow.basemodels import ModelError

    fs, path = fsspec.core.url_to_fs(model_uri)
    if not fs.isdir(path):
        raise ModelError(f"{model_uri}: no such model directory")
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        missing.append("a tokenizer (tokenizer.json)")
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        missing.append("safetensors weights (model.safetensors)")
    if missing:
        raise ModelError(f"{model_uri}: model directory is missing {', '.join(missing)}")


def loadable_path(model: str) -> str:
    """What transformers can load: a store URI (s3://...) copied to a local directory
    (``local_model_dir``); a local path or a hub id (org/name) as it is."""
    return local_model_dir(model) if "://" in model else model


def local_model_dir(model_uri: str) -> str:
    """A local directory holding the model: the path itself, or a copy of a remote one.

    Remote copies go to a per-URI folder under the temp directory, once per machine.
    """
    import hashlib
    import os
    import tempfile

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(model_uri)
    if isinstance(fs, LocalFileSystem):
        return path
    dest = os.path.join(
        tempfile.gettempdir(), "llmflow-models", hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    )
    if not os.path.exists(os.path.join(dest, "config.json")):
        tmp = f"{dest}.tmp-{os.getpid()}"
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another actor on this machine finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest
