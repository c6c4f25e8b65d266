#!/usr/bin/env bash
# Start the local stack (Prefect server, Ray head + Serve, Prefect worker) bound to 127.0.0.1.
#   infra/local/up.sh            same as: .venv/bin/llmflow up
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/llmflow up "$@"
