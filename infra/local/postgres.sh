#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the test of the Prefect server on PostgreSQL
# (tests/integration/test_postgres.py starts its own cluster from them, on a loopback port).
# Run by `make install`:
#   bash infra/local/postgres.sh
# Installs them only when they are missing and apt can run without a prompt (root, or sudo
# without a password). Never fails: without them that test skips and says why.
set -u
if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then exit 0; fi
exec bash "$(dirname "$0")/apt-optional.sh" postgresql "the PostgreSQL test" \
  "the PostgreSQL test"
