"""Generation engines: one interface, two implementations (hf on CPU or GPU, vllm on GPUs).

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

    from llmflow.config import EvalConfig

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


def vllm_available() -> bool:
    """Whether vllm can be imported, without importing it (it is a heavy optional extra)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch means no GPU here
        return False


def select_engine(name: str) -> str:
    """The engine to use: 'hf' or 'vllm'.

    'auto' picks vllm when it is importable and a CUDA GPU is present, else hf. An explicit
    'vllm' without vllm installed is an error here, before any cluster work starts.
    """
    if name == "auto":
        return "vllm" if vllm_available() and cuda_available() else "hf"
    if name not in ENGINES:
        raise ConfigError(f"eval.engine: unknown engine {name!r} (expected auto, hf or vllm)")
    if name == "vllm" and not vllm_available():
        raise ConfigError(
            "eval.engine: 'vllm' is not installed here (pip install 'llmflow[vllm]', or use hf)"
        )
    return name


def make_engine(name: str, eval_cfg: EvalConfig, model_path: str, **options: Any) -> Engine:
    """The engine ``select_engine(name)`` picks, set up from ``eval_cfg`` for ``model_path``.

    Args:
        name: 'auto', 'hf' or 'vllm'.
        eval_cfg: batch size, concurrency, max_new_tokens, temperature, vllm_engine_kwargs.
        model_path: a Hugging Face model directory (a local path or a store URI).
        options: engine-specific knobs (hf: num_cpus, num_gpus, torch_threads, seed).
    """
    chosen = select_engine(name)
    if chosen == "vllm":
        from llmflow.engines.vllm import VLLMEngine

        return VLLMEngine(eval_cfg, model_path, **options)
    from llmflow.engines.hf import HFEngine

    return HFEngine(eval_cfg, model_path, **options)


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
