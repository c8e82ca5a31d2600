#!/usr/bin/env bash
# make bench-torchserve: TorchServe 0.12 serving the same TorchScript file with its built-in
# image_classifier handler, at its best settings on this kind of machine (two workers of one
# OpenMP thread each, without and with batching; see shared/docs/torchserve-baseline.md), then
# the same load on visionserve and on it. Everything binds to 127.0.0.1 and is stopped after.
#
# With AOTI_DIR (the same model's AOTInductor package, a format = "aoti" folder), visionserve
# also serves that, beside TorchServe on the TorchScript file.
#
#   scripts/bench-torchserve.sh CACHE MODEL_DIR SERVER_BIN SECONDS [AOTI_DIR]
set -euo pipefail
cache=$1 model_dir=$2 server_bin=$3 seconds=$4 aoti_dir=${5:-}
torch_env=$(ls -d "$cache"/py-torch2.13.0-tv0.28.0)
ts_env=$cache/torchserve-0.12.0
if [ ! -x "$ts_env/bin/torchserve" ]; then
  echo "[bench-torchserve] installing torchserve 0.12.0 into $ts_env (reusing the torch install)"
  python3 -m venv "$ts_env"
  # torch comes from the project's environment instead of a second 5 GB install.
  echo "$torch_env/lib/python3.11/site-packages" > "$ts_env/lib/python3.11/site-packages/visionserve-torch.pth"
  "$ts_env/bin/pip" install -q torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml==6.0.4 captum==0.9.0
fi
command -v java >/dev/null || { echo "visionserve bench: TorchServe needs Java 17 (Debian: apt-get install openjdk-17-jre-headless)." >&2; exit 1; }

work=$(mktemp -d)
stop() {
  PATH=$ts_env/bin:$PATH torchserve --stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap stop EXIT
mkdir -p "$work/store"
"$ts_env/bin/python" - "$model_dir/labels.txt" "$work/index_to_name.json" <<'PY'
import json, sys
labels = [l.rstrip("\n") for l in open(sys.argv[1])]
json.dump({str(i): l for i, l in enumerate(labels)}, open(sys.argv[2], "w"))
PY
"$ts_env/bin/torch-model-archiver" --model-name model --version 1.0 \
  --serialized-file "$(readlink -f "$model_dir/model.pt")" --handler image_classifier \
  --extra-files "$work/index_to_name.json" --export-path "$work/store"
cat > "$work/config.properties" <<CFG
inference_address=http://127.0.0.1:18080
management_address=http://127.0.0.1:18081
metrics_address=http://127.0.0.1:18082
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port=17070
grpc_management_port=17071
disable_token_authorization=true
install_py_dep_per_model=false
enable_model_api=true
model_store=$work/store
CFG
echo "[bench-torchserve] starting TorchServe (OMP_NUM_THREADS=1, its best setting here)"
(cd "$work" && OMP_NUM_THREADS=1 PATH=$ts_env/bin:$PATH torchserve --start --ncs --ts-config "$work/config.properties" >"$work/ts.log" 2>&1)
for _ in $(seq 120); do curl -sf http://127.0.0.1:18080/ping >/dev/null && break; sleep 1; done
register() { # name query
  curl -sf -X POST "http://127.0.0.1:18081/models?url=model.mar&model_name=$1&$2&synchronous=true" >/dev/null
}
register ts_w2 "initial_workers=2&batch_size=1"
register ts_w2_b8 "initial_workers=2&batch_size=8&max_batch_delay=10"
jpeg=$(mktemp --suffix=.jpg) && cp assets/samples/coffee.jpg "$jpeg"
for m in ts_w2 ts_w2_b8; do
  for _ in $(seq 5); do curl -sf -T "$jpeg" "http://127.0.0.1:18080/predictions/$m" >/dev/null; done
done
rm -f "$jpeg"
cargo run --release --locked --example bench -- --server "$server_bin" --seconds "$seconds" --models "$model_dir${aoti_dir:+,$aoti_dir}" \
  --compare "TorchServe 0.12 image_classifier, 2 workers × 1 thread, batch 1=http://127.0.0.1:18080/predictions/ts_w2" \
  --compare "TorchServe 0.12 image_classifier, 2 workers × 1 thread, batch 8 / 10 ms=http://127.0.0.1:18080/predictions/ts_w2_b8"
