"""The served champions in a KubeRay RayService manifest: its serveConfigV2 (a YAML string
inside the YAML manifest) gets the applications `llmflow up` restores
(``serving.serve_applications``), so the cluster KubeRay owns serves what the local stack
serves. Only that block scalar is rewritten: the manifest's comments and every other key stay
as they are; its other Serve settings (proxy_location, http_options) are kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from llmflow.errors import ConfigError
from llmflow.store import atomic_write

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)serveConfigV2:[ \t]*\|[-+]?[ \t]*\n", re.MULTILINE)


def serve_config(manifest: str) -> dict[str, Any]:
    """The Serve config a RayService manifest carries (its parsed serveConfigV2)."""
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    for doc in docs:
        if doc.get("kind") == "RayService":
            return yaml.safe_load(doc["spec"]["serveConfigV2"]) or {}
    raise ConfigError("no RayService with a spec.serveConfigV2 in the manifest")


def set_applications(path: Path, applications: list[dict[str, Any]]) -> None:
    """Replace the applications of ``path``'s serveConfigV2 (written atomically)."""
    text = path.read_text()
    match = _BLOCK.search(text)
    if match is None:
        raise ConfigError(f"{path}: no 'serveConfigV2: |' block to write the applications into")
    config = serve_config(text)
    config["applications"] = applications
    body_indent = match.group("indent") + "  "
    start = match.end()
    end = start
    for line in text[start:].splitlines(keepends=True):
        if line.strip() and not line.startswith(body_indent):
            break
        end += len(line)
    # Keep the blank lines that separated the block from what follows.
    block = text[start:end]
    trailing = block[len(block.rstrip("\n")) + 1 :] if block.endswith("\n\n") else ""
    body = yaml.safe_dump(config, sort_keys=False, width=100)
    rendered = "".join(f"{body_indent}{line}\n" for line in body.splitlines())
    atomic_write(path, (text[:start] + rendered + trailing + text[end:]).encode())
