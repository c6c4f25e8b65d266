"""What the finetune stage checks before any cluster work: the dataset exists, the base model
is a causal LM, the workers can be placed on the cluster's nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmflow.basemodels import ModelError
from llmflow.config import TrainConfig
from llmflow.errors import LlmflowError
from llmflow.refs import DatasetRef
from llmflow.store import MANIFEST


class TrainingError(LlmflowError):
    """Training could not start, or stopped before its last step."""


class DatasetNotFound(LlmflowError):
    """The DatasetRef handed to finetune names nothing in the store."""


class InsufficientResources(TrainingError):
    """The cluster could never place the requested training workers."""


class NonFiniteLoss(TrainingError):
    """The training loss became NaN or infinite."""


# -- input checks (run before any cluster work) ----------------------------------------------
def check_dataset(dataset: DatasetRef) -> None:
    """Fail with one line when ``dataset`` is not a prepared dataset directory."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(dataset.uri)
    for name in (MANIFEST, "train.parquet"):
        if not fs.exists(f"{path.rstrip('/')}/{name}"):
            raise DatasetNotFound(
                f"dataset {dataset.uri}: no {name} there (sha {dataset.short_sha}); prepare it "
                "with `llmflow run prepare` or pass a DatasetRef of this store"
            )


def check_causal_lm(model_uri: str) -> None:
    """Fail with one line when ``model_uri`` is not a causal language model transformers knows."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmflow.engines import loadable_path

    try:
        # transformers reads local paths and hub ids, not store URIs (s3://...): copy first.
        path = loadable_path(model_uri)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"train.base_model: {model_uri}: cannot read its config: {first}") from exc
    # A type with a causal head (bert has one) saved as another head (BertForMaskedLM) is
    # refused too: its checkpoint holds no trained causal head.
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal = {causal} if isinstance(causal, str) else set(causal or ())
    listed = list(getattr(config, "architectures", None) or [])
    if not causal or (listed and not causal & set(listed)):
        archs = ", ".join(listed) or "none listed"
        raise ModelError(
            f"train.base_model: {model_uri}: model type '{config.model_type}' is not a causal "
            f"language model (architectures: {archs})"
        )


def check_placeable(train: TrainConfig, nodes: Sequence[dict[str, Any]]) -> None:
    """Fail when the alive nodes could never hold ``train.num_workers`` workers at once.

    Each worker is one bundle (``worker_resources``) that must fit on a single node, so the
    count that fits is the sum over nodes of how many bundles each node's totals hold. Other
    jobs' usage is not counted: this catches what can never run, not what must wait.

    Args:
        train: the train config.
        nodes: ``ray.nodes()`` entries (``Alive`` and ``Resources`` are read).
    """
    from llmflow.preflight import bundles_on_node, describe_nodes

    need = worker_resources(train)
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    fits = sum(bundles_on_node(need, res) for res in alive)
    if fits >= train.num_workers:
        return
    total = {k: sum(r.get(k, 0.0) for r in alive) for k in need}
    per_node = describe_nodes(need, alive) or "no alive nodes"
    wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
    raise InsufficientResources(
        f"train.num_workers={train.num_workers} x ({wanted}) needs "
        + ", ".join(f"{train.num_workers * v:g} {k}" for k, v in need.items())
        + ", but the Ray cluster has "
        + ", ".join(f"{total[k]:g} {k}" for k in need)
        + f" in total and at most {fits} such worker(s) fit (nodes: {per_node})"
    )


def worker_resources(train: TrainConfig) -> dict[str, float]:
    """What each training worker reserves: its CPUs, one GPU when ``use_gpu``, and the
    custom resources of ``resources_per_worker`` (which place it on the nodes declaring them)."""
    res = {"CPU": float(train.cpus_per_worker)}
    if train.use_gpu:
        res["GPU"] = 1.0
    res.update(train.resources_per_worker)
    return res


def check_inputs(train: TrainConfig, dataset: DatasetRef | None) -> None:
    """What finetune can check before any cluster work: the base model and the dataset."""
    from llmflow.basemodels import base_model_config

    if train.base_model != "tiny":
        check_causal_lm(base_model_config(train))  # a missing local directory fails there
    if dataset is not None:
        check_dataset(dataset)
