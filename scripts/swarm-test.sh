#!/usr/bin/env bash
# make swarm-test: docker/swarm/stack.yml on a real orchestrator (Docker swarm mode, one node),
# under steady load through its proxy:
#  1. a network namespace of its own, and a Docker engine started inside it (nsenter), so
#     swarm's bridges, overlay network and iptables rules touch nothing outside it;
#  2. the images: the server's (docker/Dockerfile, tagged swarm-1 and, with another label,
#     swarm-2: a new image), the proxy's (Debian's haproxy, docker/swarm/Dockerfile.proxy);
#  3. a single-node swarm, the stack deployed: two replicas, the start-to-healthy time of each;
#  4. the load generator (`bench --swarm`, loopback only, in the namespace) at half of the
#     measured capacity; then a rolling update to swarm-2, then one replica killed (SIGKILL);
#  5. judged: no request failed or was refused during the rolling update; after the kill,
#     the client's failures are at most the requests the killed replica held (read from the
#     proxy's log: sent to it, not finished at the kill; plus those the proxy closed unanswered
#     without a log line, which only the client saw); back to two healthy replicas within
#     two minutes (the time is reported against health-check interval + start time);
#     the proxy's retries (connections no replica accepted, retried on another) are reported
#     beside the client's failures.
# Usage: scripts/swarm-test.sh CACHE [REPORT.md] [CHART_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${1:?cache folder}
report=${2:-test-output/swarm.md}
chart_dir=${3:-test-output}
docker=/usr/bin/docker   # Debian's client (see docker-test.sh)
bench=${CARGO_TARGET_DIR:-target}/release/examples/bench
rest_port=18180 grpc_port=18181
ns=visionserve-swarm-$$
root=$cache/docker-swarm   # the engine's images survive between runs; its swarm does not
work=$(mktemp -d)
engine_pid="" load_pid=""
mkdir -p "$(dirname "$report")" "$chart_dir"
say() { echo "[swarm-test] $*"; }
in_ns() { nsenter --net=/var/run/netns/$ns "$@"; }
event() { echo "$(date +%s.%N) $1" >>"$work/events"; say "phase: $1"; }

cleanup() {
  set +e
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null
  if [ -n "$engine_pid" ]; then
    $docker stack rm vs >/dev/null 2>&1
    $docker swarm leave --force >/dev/null 2>&1
    kill "$engine_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$engine_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$engine_pid" 2>/dev/null
  fi
  ip netns del "$ns" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v curl >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "visionserve swarm-test: needs docker.io, mmdebstrap and curl (apt-get install docker.io mmdebstrap curl)." >&2; exit 1; }
  say "installing docker.io, mmdebstrap and curl"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io mmdebstrap curl >/dev/null
fi
[ "$(id -u)" = 0 ] || { echo "visionserve swarm-test: needs root (a network namespace and a Docker engine of its own)." >&2; exit 1; }

# 1. The namespace and the engine in it. An engine left running by an interrupted run goes first.
mkdir -p "$root"
if [ -f "$root/dockerd.pid" ] && kill -0 "$(cat "$root/dockerd.pid")" 2>/dev/null; then
  say "stopping an engine left by an earlier run"
  kill "$(cat "$root/dockerd.pid")"; sleep 3
fi
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
export DOCKER_HOST=unix://$root/docker.sock
say "starting a Docker engine in network namespace $ns"
# nsenter, not `ip netns exec`: the latter remounts /sys and dockerd then finds no cgroups.
# (Called directly, not through in_ns: $! is then dockerd itself, which nsenter becomes.)
nsenter --net=/var/run/netns/$ns dockerd --storage-driver=overlay2 --data-root "$root/data" --exec-root "$root/exec" \
  --pidfile "$root/dockerd.pid" -H "$DOCKER_HOST" >"$root/dockerd.log" 2>&1 &
engine_pid=$!
for _ in $(seq 150); do $docker version >/dev/null 2>&1 && break; sleep 0.2; done
$docker version >/dev/null || { tail -20 "$root/dockerd.log"; exit 1; }
[ "$($docker info -f '{{.Swarm.LocalNodeState}}')" = inactive ] || $docker swarm leave --force >/dev/null

# 2. Images. The base file systems come from Debian's mirror (no registry is reachable).
if ! $docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  say "making debian:bookworm-slim with mmdebstrap (about 30 s)"
  mmdebstrap --quiet --variant=minbase --format=tar bookworm - http://deb.debian.org/debian | $docker import - debian:bookworm-slim >/dev/null
fi
if ! $docker image inspect visionserve-haproxy-base:bookworm >/dev/null 2>&1; then
  say "making visionserve-haproxy-base:bookworm (Debian's haproxy) with mmdebstrap (about 30 s)"
  mmdebstrap --quiet --variant=minbase --include=haproxy --format=tar bookworm - http://deb.debian.org/debian \
    | $docker import - visionserve-haproxy-base:bookworm >/dev/null
fi
scripts/docker-context.sh >/dev/null
say "building visionserve:swarm-1, visionserve:swarm-2 (the same build, another label: a new image) and the proxy"
$docker build -q --network host -t visionserve:swarm-1 --label org.visionserve.swarm-test=1 -f docker/Dockerfile docker >/dev/null
$docker build -q --network host -t visionserve:swarm-2 --label org.visionserve.swarm-test=2 -f docker/Dockerfile docker >/dev/null
$docker build -q --network host -t visionserve-proxy:latest -f docker/swarm/Dockerfile.proxy docker/swarm >/dev/null
[ "$($docker image inspect -f '{{.Id}}' visionserve:swarm-1)" != "$($docker image inspect -f '{{.Id}}' visionserve:swarm-2)" ]

# 3. The swarm and the stack.
$docker swarm init --advertise-addr 127.0.0.1 >/dev/null
say "deploying docker/swarm/stack.yml (2 replicas of visionserve:swarm-1 behind HAProxy)"
deployed=$(date +%s.%N)
VISIONSERVE_IMAGE=visionserve:swarm-1 VISIONSERVE_PUBLISHED_REST=$rest_port VISIONSERVE_PUBLISHED_GRPC=$grpc_port \
  $docker stack deploy -c docker/swarm/stack.yml vs >/dev/null

# The service's containers that are running and healthy, one "ID STARTED_AT" per line.
healthy() {
  for c in $($docker ps -q --filter label=com.docker.swarm.service.name=vs_visionserve); do
    $docker inspect -f '{{if eq .State.Health.Status "healthy"}}{{.Id}} {{.State.StartedAt}}{{end}}' "$c" 2>/dev/null
  done | grep -v '^$' || true
}
# Waits until N healthy replicas (at most $2 s); prints the seconds it took.
wait_healthy() {
  local want=$1 limit=$2 t0 now
  t0=$(date +%s.%N)
  while [ "$(healthy | wc -l)" -lt "$want" ]; do
    now=$(date +%s.%N)
    python3 -c "import sys; sys.exit(0 if $now - $t0 < $limit else 1)" || {
      $docker service ps --no-trunc vs_visionserve >&2; return 1; }
    sleep 0.25
  done
  python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')"
}
wait_healthy 2 300 >/dev/null || { say "the two replicas never became healthy"; exit 1; }
# Start to healthy, per replica: the container's start to the moment this loop saw it healthy
# (the health check runs every 2 s, so this is within 2 s above the true figure).
start_s=$(healthy | python3 -c "
import sys, datetime, time
now = time.time()
def started(s):
    day, frac = s.rstrip('Z').split('.') if '.' in s else (s.rstrip('Z'), '0')
    return datetime.datetime.strptime(day, '%Y-%m-%dT%H:%M:%S').replace(tzinfo=datetime.timezone.utc).timestamp() + float('0.' + frac)
print(f'{max(now - started(l.split()[1]) for l in sys.stdin):.1f}')")
say "two replicas healthy; start to healthy at most ${start_s} s"
for _ in $(seq 120); do
  [ "$(in_ns curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$rest_port/health/ready)" = 200 ] && break
  sleep 0.5
done
[ "$(in_ns curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$rest_port/health/ready)" = 200 ] || {
  $docker service logs vs_proxy 2>&1 | tail -20; say "the proxy never answered ready"; exit 1; }
threads=$($docker service logs --raw vs_visionserve 2>&1 | grep -m1 -o '"inference_threads":[0-9]*' | cut -d: -f2 || true)

# 4. Load, a rolling update, a killed replica.
say "load through the proxy (bench --swarm, in the namespace)"
in_ns "$bench" --swarm "http://127.0.0.1:$rest_port/v1/models/mobilenet_v2/predict" --swarm-events "$work/events" \
  --swarm-summary "$work/summary.json" --swarm-limit-secs 600 --seconds 5 --out "$report" --chart-dir "$chart_dir" \
  >"$work/load.log" 2>&1 &
load_pid=$!
for _ in $(seq 120); do grep -q steady "$work/events" 2>/dev/null && break; sleep 0.5; done
grep -q steady "$work/events" || { cat "$work/load.log"; say "the load never started"; exit 1; }
sleep 10
event "rolling update"
update_t0=$(date +%s.%N)
$docker service update --quiet --detach=false --image visionserve:swarm-2 vs_visionserve >/dev/null
update_s=$(python3 -c "print(f'{$(date +%s.%N) - $update_t0:.1f}')")
images=$($docker service ps --filter desired-state=running --format '{{.Image}}' vs_visionserve | sort | uniq -c | tr '\n' ' ')
event "after the update"
say "rolling update done in ${update_s} s; running: $images"
sleep 8
victim=$(healthy | head -1 | cut -d' ' -f1)
victim_ip=$($docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$victim" | tr ' ' '\n' | grep -v '^$' | head -1)
event "kill"
kill_at=$(date +%s.%N)
$docker kill "$victim" >/dev/null
say "killed replica ${victim:0:12} ($victim_ip) with SIGKILL"
sleep 1   # until swarm has seen the task die: before that, the survivor alone counts as "healthy"
recovery_s=$(wait_healthy 2 120) || { say "the service did not get back to two healthy replicas within 120 s"; exit 1; }
recovery_s=$(python3 -c "print(f'{$recovery_s + 1:.1f}')")
event "recovered"
say "two healthy replicas again ${recovery_s} s after the kill"
sleep 8
event "done"
wait "$load_pid" || { cat "$work/load.log"; say "the load generator failed"; exit 1; }
load_pid=""
sed -n '/^## Swarm/,$p' "$work/load.log"

# One gRPC call through the proxy (h2 to the replicas), as a client would make it.
grpc_ok=$(in_ns python3 - "$grpc_port" <<'PY' || true
import sys
import numpy as np
import tritonclient.grpc as grpcclient
image = grpcclient.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([open("assets/samples/chelsea.jpg", "rb").read()], dtype=np.object_))
result = grpcclient.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}").infer("mobilenet_v2", [image])
print("ok" if result.as_numpy("scores") is not None else "no scores")
PY
)

# 5. The proxy's log, and the verdict.
$docker service logs --raw vs_proxy >"$chart_dir/swarm-proxy.log" 2>&1 || true
$docker service logs --raw vs_visionserve >"$chart_dir/swarm-replicas.log" 2>&1 || true
python3 - "$work/summary.json" "$chart_dir/swarm-proxy.log" "$kill_at" "$victim_ip" "$start_s" "$recovery_s" "$update_s" "$report" \
  "${threads:-?}" "$grpc_ok" <<'PY'
import json, re, sys
summary, log, kill_at, victim, start_s, recovery_s, update_s, report, threads, grpc_ok = sys.argv[1:]
kill_at, start_s, recovery_s = float(kill_at), float(start_s), float(recovery_s)
loaded = json.load(open(summary))
phases = {p["label"]: p for p in loaded["phases"]}
# Lines: accept-time backend server:port status termination retries total-ms method path
requests = []
for line in open(log):
    f = line.split()
    if len(f) >= 9 and f[1].startswith("replicas-") and f[0].replace(".", "", 1).isdigit():
        requests.append({"at": float(f[0]), "server": f[2].split(":")[0], "status": f[3], "term": f[4],
                         "retries": int(f[5].lstrip("+")) if f[5].lstrip("+").isdigit() else 0,
                         "took": float(f[6]) / 1000 if f[6].lstrip("-").isdigit() else 0.0, "path": f[8]})
predicts = [r for r in requests if "/predict" in r["path"]]
# What the killed replica held: requests the proxy had sent it that were not finished when
# the kill was ordered, and any it left unanswered (a 5xx of the proxy's or a server abort).
held = [r for r in predicts if r["server"] == victim and
        ((r["at"] <= kill_at and r["at"] + max(r["took"], 0) >= kill_at) or r["term"].startswith("S") or r["status"] in ("502", "504", "-1"))]
# And what the proxy itself counted: the sessions open on the victim's slot when its health
# check marked it down (a request cut by the kill may never get a log line of its own).
slot, at_down = None, 0
for line in open(log):
    m = re.search(r"replicas-rest/(replica\d+) changed its IP from \S+ to (\S+?) ", line)
    if m:
        slot = m.group(1) if m.group(2) == victim else (None if m.group(1) == slot else slot)
        continue
    m = re.search(r"Server replicas-rest/(replica\d+) is DOWN\..* (\d+) sessions active", line)
    if m and slot and m.group(1) == slot:
        at_down = max(at_down, int(m.group(2)))
# And the requests the proxy closed without an answer and without a log line: when a replica's
# connection breaks under a request that is not the first on its client connection, HAProxy
# closes that client connection silently and logs nothing (http_ana.c, abort_keep_alive: it
# expects the client to retry, as browsers do). Only the client saw them: the open loop's
# requests the log lacks, counted where the client got no answer between the kill and the
# return to two replicas (the only replica whose connections broke then is the killed one).
open_loop = [r for r in predicts if r["at"] >= loaded["started"]]
unlogged = max(0, loaded["sent"] - len(open_loop))
no_answer_after_kill = sum(1 for at, status in loaded["not_answered"]
                           if status == 0 and kill_at <= at < kill_at + recovery_s)
silent = min(unlogged, no_answer_after_kill)
held_count = max(len(held) + silent, at_down)
retried = [r for r in predicts if r["retries"] > 0]
def during(label):
    return phases.get(label, {"sent": 0, "failed": 0, "refused": 0})
update, kill, recovered = during("rolling update"), during("kill"), during("recovered")
after_kill_failed = kill["failed"] + recovered["failed"]
after_kill_refused = kill["refused"] + recovered["refused"]
not_answered = ", ".join(f"{at - kill_at:+.2f} s: {status or 'no answer'}" for at, status in loaded["not_answered"])
target_s = 2 + start_s
lines = [
    f"Rolling update of two replicas to a new image: {update_s} s; client failures {update['failed']}, refused {update['refused']} "
    f"of {update['sent']} sent (target 0).",
    f"Killed replica (SIGKILL): the proxy's log shows it held {held_count} requests at the kill "
    f"({len(held)} logged in flight, {silent} closed by the proxy unanswered and unlogged, {at_down} sessions open "
    f"when its check marked it down); the client saw "
    f"{after_kill_failed} fail after it (target: at most {held_count}) and {after_kill_refused} refused with 503 "
    f"(the surviving replica's admission control while it carried the load alone and the replacement warmed up "
    f"on the same cores).",
    f"Requests not answered 200, sent at (relative to the kill): {not_answered or 'none'}.",
    f"Back to two healthy replicas {recovery_s:.1f} s after the kill; health-check interval 2 s + start to healthy "
    f"{start_s:.1f} s = {target_s:.1f} s ({'met' if recovery_s <= target_s else 'missed'}; swarm's restart delay of 1 s is in it).",
    f"Proxy retries (a connection no replica accepted, retried on another; the request had not reached a replica): "
    f"{len(retried)} of {len(predicts)} predicts. Inference threads per replica (1-CPU limit): {threads}. "
    f"gRPC through the proxy: {grpc_ok or 'failed'}.",
]
print("\n".join("[swarm-test] " + l for l in lines))
with open(report, "a") as out:
    out.write("\n" + "\n".join(f"- {l}" for l in lines) + "\n")
failures = []
if update["failed"] or update["refused"]:
    failures.append("requests failed during the rolling update")
if after_kill_failed > held_count:
    failures.append("more requests failed after the kill than the killed replica held")
if grpc_ok != "ok":
    failures.append("the gRPC call through the proxy failed")
if not update["sent"] or not kill["sent"]:
    failures.append("a phase had no load: the run proves nothing")
for f in failures:
    print(f"[swarm-test] FAILED: {f}")
print("0 passed, 1 failed" if failures else "1 passed, 0 failed")
sys.exit(1 if failures else 0)
PY
