#!/usr/bin/env bash
# Gathers docker/context/: the release binary (debug info stripped), the shared libraries it
# loads from the torch install (found with ldd, so nothing else of the 5 GB wheel ships), and
# the default model repository with the model files resolved from their cache links.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/visionserve
ctx=docker/context
rm -rf "$ctx" && mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/models"
strip --strip-debug -o "$ctx/bin/visionserve" "$bin"
# The load tool of `make bench`, for docker compose's load-test service.
bench=${CARGO_TARGET_DIR:-target}/release/examples/bench
[ -x "$bench" ] && strip --strip-debug -o "$ctx/bin/visionserve-bench" "$bench"
torch_lib=$(readelf -d "$bin" | sed -n 's/.*R.*PATH.*\[\(.*\)\]/\1/p' | tr ':' '\n' | head -1)
ldd "$bin" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$lib" in "$torch_lib"/*|*/site-packages/*) cp -L "$lib" "$ctx/lib/" ;; esac
done
# FFmpeg, for video uploads and live streams: the host's Debian build (the image's base is the
# same Debian release), with exactly the libraries it and ffprobe load (ldd) but glibc's,
# which the base carries. Debian's package with its dependencies would add ~0.7 GB; these are
# a third of that, and the image build needs no package registry (swarm-test builds it where
# none can be reached).
ffmpeg=$(command -v ffmpeg) || { echo "docker-context: the image carries the host's ffmpeg, and there is none (apt-get install ffmpeg)" >&2; exit 1; }
mkdir -p "$ctx/ffmpeg/bin" "$ctx/ffmpeg/lib"
cp -L "$ffmpeg" "$(dirname "$ffmpeg")/ffprobe" "$ctx/ffmpeg/bin/"
for tool in "$ctx"/ffmpeg/bin/*; do ldd "$tool"; done | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|ld-linux*) ;;
    *) cp -L "$lib" "$ctx/ffmpeg/lib/" ;;
  esac
done
# The image serves TorchScript: an AOTInductor package is machine code for the CPU that
# compiled it (and needs libtorch.so, which would pull the CUDA libraries into the image), so
# of a versioned model the newest TorchScript version is copied, as a flat folder.
for top in models/*/; do
  name=$(basename "$top")
  if [ -f "$top/pipeline.toml" ]; then   # a pipeline: its file names models of this folder
    mkdir -p "$ctx/models/$name" && cp "$top/pipeline.toml" "$ctx/models/$name/"
    continue
  fi
  dir=""
  if [ -f "$top/config.toml" ]; then
    dir=$top
  else
    for v in $(ls "$top" | grep -E '^[0-9]+$' | sort -n); do
      grep -q '^format = "aoti"' "$top/$v/config.toml" 2>/dev/null || dir=$top/$v
    done
  fi
  [ -n "$dir" ] || continue
  mkdir -p "$ctx/models/$name"
  cp "$dir/config.toml" "$ctx/models/$name/"
  [ -e "$dir/labels.txt" ] && cp -L "$dir/labels.txt" "$ctx/models/$name/"
  cp -L "$dir/model.pt" "$ctx/models/$name/model.pt"
done
du -sh "$ctx"/* | sed 's/^/[docker-context] /'
