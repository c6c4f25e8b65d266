"""Hugging Face hub revisions: a repo id plus a commit, branch or tag, resolved to the commit
when a stage runs, so the cache keys and the lineage name exactly what was read.

Online, the hub answers (``HfApi.repo_info``). Offline (HF_HUB_OFFLINE=1, the default here),
the local HF cache does: ``<cache>/<type>s--<org>--<name>/refs/<revision>`` holds the commit
a branch or tag pointed at when it was downloaded. What neither knows is one clear line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from llmflow.errors import LlmflowError

RepoType = Literal["model", "dataset"]
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(LlmflowError):
    """A hub repo or revision that cannot be resolved here."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_revision(repo_id: str, revision: str | None, repo_type: RepoType, key: str) -> str:
    """The commit ``revision`` (default: main) of ``repo_id`` points at.

    Args:
        key: the config key to name in an error (data.source, train.base_model).

    Raises:
        HubError: offline and not in the HF cache, or the hub does not know it.
    """
    rev = revision or "main"
    if _COMMIT.fullmatch(rev):
        return rev
    where = f"{key}: {repo_id}@{rev}"
    if offline():
        ref = _cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / rev
        if ref.is_file():
            return ref.read_text().strip()
        raise HubError(
            f"{where}: cannot resolve the revision offline (HF_HUB_OFFLINE=1) and it "
            f"is not in the HF cache ({_cache_dir()}); set HF_HUB_OFFLINE=0 where the "
            "hub is reachable, or give a commit"
        )
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=rev).sha
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise HubError(f"{where}: cannot resolve the revision on the hub: {first}") from exc


# What a check of a model reads: its config and tokenizer, never its weights.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json")


def snapshot(
    repo_id: str, revision: str | None, key: str, files: tuple[str, ...] | None = None
) -> tuple[str, str]:
    """(local directory, commit) of a model repo at ``revision``: downloaded once, or taken
    from the HF cache offline; only the ``files`` patterns when given (CONFIG_FILES for a
    check). Everything downstream then reads a local, pinned directory."""
    from huggingface_hub import snapshot_download

    commit = resolve_revision(repo_id, revision, "model", key)
    try:
        path = snapshot_download(
            repo_id,
            revision=commit,
            local_files_only=offline(),
            allow_patterns=list(files) if files else None,
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        hint = " (HF_HUB_OFFLINE=1: only models already in the HF cache load)" if offline() else ""
        raise HubError(f"{key}: {repo_id}@{commit}: cannot load the model{hint}: {first}") from exc
    return path, commit
