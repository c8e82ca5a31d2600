#!/usr/bin/env bash
# One clear sentence per missing prerequisite, before anything slow starts.
set -u
missing=0
need() { # need CMD "sentence"
  if ! command -v "$1" >/dev/null 2>&1; then echo "visionserve setup: $2" >&2; missing=1; fi
}
need python3 "python3 (3.10 or newer) is not installed; install it (Debian: apt-get install python3 python3-venv python3-dev)."
need c++ "no C++ compiler found; install one (Debian: apt-get install g++), torch-sys compiles a C++ wrapper."
need cc "no C compiler found; install one (Debian: apt-get install gcc)."
need cargo "cargo is not installed; install the Rust toolchain from https://rustup.rs."
# libjpeg-turbo (scaled JPEG decoding) is built from source inside turbojpeg-sys: cmake, and nasm
# for its SIMD code. Installed here when we may (root with apt), as the browser test's Chromium is.
for tool in cmake nasm; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "visionserve setup: installing $tool (Debian package) for the libjpeg-turbo build" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "$tool" || { apt-get update -q && apt-get install -y -q --no-install-recommends "$tool"; }; } >/dev/null 2>&1
  fi
  need "$tool" "$tool is not installed; libjpeg-turbo's build needs it (Debian: apt-get install $tool)."
done
# FFmpeg decodes uploaded videos (src/video): optional, the server serves photos without it
# and answers video requests 501. Installed here when we may, as cmake and nasm are.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "visionserve setup: installing ffmpeg (Debian package) for video input" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends ffmpeg || { apt-get update -q && apt-get install -y -q --no-install-recommends ffmpeg; }; } >/dev/null 2>&1
  fi
  command -v ffmpeg >/dev/null 2>&1 || echo "visionserve setup: ffmpeg is not installed; video requests will be answered 501 (Debian: apt-get install ffmpeg)." >&2
fi
if command -v python3 >/dev/null 2>&1; then
  if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "visionserve setup: python3 is $(python3 -V 2>&1 | cut -d' ' -f2); torch 2.13 needs 3.10 or newer." >&2; missing=1
  fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "visionserve setup: python3 cannot create virtual environments; install python3-venv." >&2; missing=1
  fi
  if [ "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" != "1" ]; then
    echo "visionserve setup: python3 was built without a shared libpython, which torchvision's operators need when loaded from Rust; use a python3 built with --enable-shared (Debian's is)." >&2; missing=1
  fi
fi
exit $missing
