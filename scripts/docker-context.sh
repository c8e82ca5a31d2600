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
