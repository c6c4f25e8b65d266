#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the test of the Prefect server on PostgreSQL
# (tests/integration/test_postgres.py starts its own cluster from them, on a loopback port).
# Run by `make install`:
#   bash infra/local/postgres.sh
# Installs them only when they are missing and apt can run without a prompt (root, or sudo
# without a password). Never fails: without them that test skips and says why.
set -u
if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no PostgreSQL and no apt-get: the PostgreSQL test will skip"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "note: no PostgreSQL (install it: apt-get install postgresql): the PostgreSQL test will skip"
  exit 0
fi
echo "installing postgresql (apt-get) for the PostgreSQL test..."
apt_install() {
  DEBIAN_FRONTEND=noninteractive timeout 240 "${sudo[@]}" apt-get install -y -q \
    --no-install-recommends postgresql >/dev/null 2>&1
}
if apt_install || { timeout 90 "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && apt_install; }; then
  echo "postgresql: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
else
  echo "note: apt-get could not install postgresql: the PostgreSQL test will skip"
fi
exit 0
