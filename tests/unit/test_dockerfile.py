"""infra/docker/Dockerfile, read as text (no docker here): the essentials the Kubernetes
manifests and llmflow's defaults rely on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra/docker/Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    text = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def build_args() -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)


def env() -> dict[str, str]:
    out: dict[str, str] = {}
    for op, args in instructions():
        if op == "ENV":
            out.update(item.split("=", 1) for item in shlex.split(args))
    return out


def test_the_base_image_is_a_build_argument_defaulting_to_python_311_slim():
    ops = instructions()
    [frm] = [a for op, a in ops if op == "FROM"]
    assert frm == "${PYTHON_IMAGE}"
    first_from = [op for op, _ in ops].index("FROM")
    assert ("ARG", f"PYTHON_IMAGE={build_args()['PYTHON_IMAGE']}") in ops[:first_from]
    assert build_args()["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert build_args()["VARIANT"] == "cpu"


def test_the_project_is_installed_editable_at_the_pull_steps_directory_with_the_pins():
    k8s = yaml.safe_load((ROOT / "infra/k8s/prefect.yaml").read_text())
    [step] = k8s["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert ("WORKDIR", directory) in instructions() and directory == "/opt/llmflow"
    runs = " ".join(a for op, a in instructions() if op == "RUN")
    assert re.search(r"pip install -c \S*constraints\.txt -e \"\.\[\$\{extras\}\]\"", runs)
    # vLLM never joins the main venv (its fastapi pin clashes with Prefect's): the cuda
    # variant builds its engine environment from the lock, where the image says it is.
    assert "vllm" not in re.search(r'extras="([^"]*)"', runs).group(1)
    assert "make-env.sh /opt/venv-vllm cuda" in runs
    assert env()["LLMFLOW_VLLM_PYTHON"] == "/opt/venv-vllm/bin/python"
    # LLAMAFACTORY=1: its environment from the variant's lock, where llmflow looks by default.
    assert 'make-env.sh /opt/venv-llamafactory "$lock"' in runs
    assert "lock=llamafactory-cuda" in runs
    assert "ln -s /opt/venv-llamafactory /opt/llmflow/.venv-llamafactory" in runs
    assert any(op == "COPY" and a.startswith("constraints.txt") for op, a in instructions())


def test_it_runs_as_a_user_other_than_root():
    users = [a for op, a in instructions() if op == "USER"]
    user = users[-1]
    user = re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], user)
    assert user not in ("root", "0") and not user.startswith("0:")


def test_the_offline_switches_of_llmflow_are_set_and_the_hubs_follow_a_build_argument():
    from llmflow.settings import OFFLINE_ENV

    image = env()
    hub = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"}
    for key, value in OFFLINE_ENV.items():
        assert image.get(key) == ("${HF_HUB_OFFLINE}" if key in hub else value), key
    assert build_args()["HF_HUB_OFFLINE"] == "1"  # offline unless the build says otherwise


def test_the_build_context_leaves_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {
        ".git",
        ".venv",
        ".venv-vllm",
        ".venv-llamafactory",
        ".llmflow",
        "**/__pycache__",
        "*.egg-info",
    } <= set(ignored)
