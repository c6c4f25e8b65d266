#!/usr/bin/env bash
# Stop what infra/local/up.sh (llmflow up) started, by recorded pid.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/llmflow down "$@"
