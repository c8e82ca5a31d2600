#!/usr/bin/env bash
# The browser test drives Debian's Chromium (never a browser downloaded by a test tool).
# Installs it when missing and this user may (root, as in CI); otherwise says what to do.
set -eu
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the browser test"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
else
  echo "visionserve setup: the browser test needs Chromium; install it (Debian: sudo apt-get install chromium)." >&2
  exit 1
fi
