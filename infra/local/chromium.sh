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
exec bash "$(dirname "$0")/apt-optional.sh" chromium "the chat's browser test" \
  "the chat's browser test"
