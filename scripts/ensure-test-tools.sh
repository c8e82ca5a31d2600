#!/usr/bin/env bash
# Command-line tools the Python suite calls as users do (test_tls.py: openssl makes the
# certificates, curl is the client under test; test_video.py: ffmpeg makes the clips, and the
# server decodes with it). Installed from Debian when we may (root with apt), else one clear
# sentence each.
set -u
missing=0
for tool in "$@"; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "visionserve setup: installing $tool (Debian package) for the test suite" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "$tool" || { apt-get update -q && apt-get install -y -q --no-install-recommends "$tool"; }; } >/dev/null 2>&1
  fi
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "visionserve setup: $tool is not installed; the test suite needs it (Debian: apt-get install $tool)." >&2
    missing=1
  fi
done
exit $missing
