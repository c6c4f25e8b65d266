#!/usr/bin/env bash
# `uv pip install` into the venv of PYTHON, from the sources pip is configured with:
#   UV=.venv/bin/uv bash infra/local/uv-pip.sh .venv/bin/python -c constraints.txt -e ".[dev]"
# make install builds every environment with it: uv installs in parallel and keeps a cache
# (UV_CACHE_DIR, default ~/.cache/uv) that the environments share and later builds reuse, so
# what they have in common (torch, ray, transformers, ...) downloads once; pip keeps no cache
# where the registry's proxy marks responses uncacheable (this machine's). uv reads no
# pip.conf, so pip's find-links (where the CPU torch build lies) and http(s) indexes are
# handed over here.
set -euo pipefail
uv=${UV:?UV: the uv binary}
python=${1:?usage: uv-pip.sh PYTHON ARGS...}
shift
sources=()
while IFS= read -r line; do
  key=${line%%=*} value=${line#*=}
  value=${value#\'} value=${value%\'}
  for v in $value; do
    case "$key" in
      *find-links) [ -e "${v#file://}" ] && sources+=(--find-links "${v#file://}") ;;
      *extra-index-url) [[ $v == http* ]] && sources+=(--extra-index-url "$v") ;;
      *index-url) [[ $v == http* ]] && sources+=(--index-url "$v") ;;
    esac
  done
done < <("$python" -m pip config list 2>/dev/null)
# --compile-bytecode: as pip does, the .pyc files are written at install (uv compiles in
# parallel), not by the first processes that import each module (the Ray workers of a cold
# venv, started side by side, each compile what none has written yet).
exec "$uv" pip install -q --compile-bytecode --python "$python" "${sources[@]}" "$@"
