"""The Serve API key: from a file (a mounted secret) or an environment variable, by name.

Only the file's path or the variable's name travels in configs, Serve application args and
Prefect parameters. Do not pass the key in a Ray runtime_env: Ray's runtime_env agent writes
runtime_env env_vars into its log (runtime_env_agent.log), in clear.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_api_key(api_key_env: str | None = None, api_key_file: str | None = None) -> str | None:
    """The key, or None when neither source is configured.

    Raises:
        ValueError: a source is configured but holds no key (names the source, never a value).
    """
    if api_key_file:
        try:
            key = Path(api_key_file).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"serve.api_key_file: cannot read {api_key_file}: {exc.strerror}"
            ) from exc
        if not key:
            raise ValueError(f"serve.api_key_file: {api_key_file} is empty")
        return key
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise ValueError(f"serve.api_key_env: environment variable {api_key_env} is not set")
        return key
    return None


def bearer_problem(authorization: str, key: str) -> tuple[str, str] | None:
    """What is wrong with an ``Authorization`` header against ``key``: (OpenAI error code,
    message), or None when it carries the key. Compared in constant time. Both Serve apps
    (hf and vllm) answer with it, so their 401s say the same."""
    import secrets

    if not authorization.startswith("Bearer "):
        return "missing_api_key", "Missing API key: send 'Authorization: Bearer <key>'."
    given = authorization.removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), key.encode()):
        return "invalid_api_key", "Incorrect API key provided."
    return None
