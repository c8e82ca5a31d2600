#!/usr/bin/env bash
# Triton's perf_analyzer, for the drop-in client tests and the bench, into $1 (a cache folder):
# the PyPI `perf-analyzer` package is a placeholder without a binary, but the tritonclient
# wheels up to 2.51 ship bin/perf_analyzer, built for glibc of Debian 12's age. It links
# Debian's libb64 and CUDA's runtime library (which it loads even on a CPU-only machine); the
# latter comes from PyPI's nvidia-cuda-runtime-cu12 wheel, unpacked beside it. Nothing runs
# from the wheels but these two files. Usage: ensure-perf-analyzer.sh DIR PYTHON
set -eu
dir=$1
python=$2
if [ -x "$dir/perf_analyzer" ] && [ -f "$dir/lib/libcudart.so.12" ] && ldconfig -p | grep -q libb64.so.0d; then exit 0; fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's libb64-0d for perf_analyzer"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q libb64-0d || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libb64-0d; }; } >/dev/null
  else
    echo "visionserve setup: perf_analyzer needs libb64; install it (Debian: sudo apt-get install libb64-0d)." >&2
    exit 1
  fi
fi
echo "[setup] perf_analyzer from the tritonclient 2.51.0 wheel into $dir"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$python" -m pip download --no-deps -q -d "$wheels" tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
mkdir -p "$dir/lib"
"$python" - "$wheels" "$dir" <<'PY'
import pathlib, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
client = zipfile.ZipFile(next(wheels.glob("tritonclient-2.51.0-*.whl")))
(out / "perf_analyzer").write_bytes(client.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
runtime = zipfile.ZipFile(next(wheels.glob("nvidia_cuda_runtime_cu12-*.whl")))
(out / "lib" / "libcudart.so.12").write_bytes(runtime.read("nvidia/cuda_runtime/lib/libcudart.so.12"))
PY
chmod 755 "$dir/perf_analyzer"
# A wrapper that finds the CUDA runtime beside it.
cat > "$dir/run" <<SH
#!/usr/bin/env bash
LD_LIBRARY_PATH="$dir/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$dir/perf_analyzer" "\$@"
SH
chmod 755 "$dir/run"
if ! "$dir/run" --version 2>&1 | grep -q "Perf Analyzer Version 2.51.0"; then
  "$dir/run" --version >&2 || true
  echo "visionserve setup: perf_analyzer does not start here" >&2
  exit 1
fi
