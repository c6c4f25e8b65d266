#!/usr/bin/env bash
# Debian's chromium for the chat's browser test (tests/integration/test_chat.py), which drives
# it with Playwright (executable_path; `playwright install` and its browser downloads are
# never used). Run by `make install`:
#   bash infra/local/chromium.sh
# Installs it only when it is missing and apt can run without a prompt (root, or sudo without
# a password). Never fails: without chromium the browser test skips and says why.
set -u
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no chromium and no apt-get: the chat's browser test will skip"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "note: no chromium (install it: apt-get install chromium): the chat's browser test will skip"
  exit 0
fi
echo "installing chromium (apt-get) for the chat's browser test..."
apt_install() {
  DEBIAN_FRONTEND=noninteractive timeout 240 "${sudo[@]}" apt-get install -y -q \
    --no-install-recommends chromium >/dev/null 2>&1
}
# An image with empty package lists needs an update first.
if apt_install || { timeout 90 "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && apt_install; }; then
  echo "chromium: $(command -v chromium)"
else
  echo "note: apt-get could not install chromium: the chat's browser test will skip"
fi
exit 0
