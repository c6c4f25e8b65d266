#!/usr/bin/env bash
# Shared by chromium.sh and postgres.sh: install one Debian package that a test needs, only when
# apt can run without a prompt (root, or sudo without a password). Never fails: where it cannot
# install, it prints why and the test that needs the package skips and says why.
#   bash infra/local/apt-optional.sh PACKAGE "WHAT IT IS FOR" "THE TEST THAT SKIPS WITHOUT IT"
# The caller checks first whether the package is already there.
set -u
pkg=$1 for=$2 test=$3
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no $pkg and no apt-get: $test will skip"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "note: no $pkg (install it: apt-get install $pkg): $test will skip"
  exit 0
fi
echo "installing $pkg (apt-get) for $for..."
apt_install() {
  DEBIAN_FRONTEND=noninteractive timeout 240 "${sudo[@]}" apt-get install -y -q \
    --no-install-recommends "$pkg" >/dev/null 2>&1
}
# An image with empty package lists needs an update first.
if apt_install || { timeout 90 "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && apt_install; }; then
  echo "$pkg: installed"
else
  echo "note: apt-get could not install $pkg: $test will skip"
fi
exit 0
