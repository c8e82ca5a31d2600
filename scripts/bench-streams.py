#!/usr/bin/env python3
"""Live streams under load (make bench-streams).

    python scripts/bench-streams.py --bin target/release/visionserve --repo models [--soak-seconds 600]

A local RTSP camera (GStreamer's RTSP server, tests/python/rtsp_server.py) serves a 640 × 480
H.264 clip at 10 fps (the project's photos moving, as in test_video.py). The server, with the
default SSD as shipped and only `--streams-allow` set (streams are off by default), reads it as
live streams with ByteTrack detecting every 2nd frame, the default drop policy (drop_oldest,
buffer 2) and frame deadline (1 s):

1. 3 streams, then a 4th added, then the 4th removed (each phase `--phase-seconds`): per
   phase, the frame-to-result p95 of the 3 streams that run throughout (the server's own
   latency, frame read off the decoder to its answer published, from each frame's SSE event),
   and the share of the frames the camera sent that were processed or counted as dropped.
2. The camera is killed and started again, 3 times: from its restart to the stream's next
   frame (polled at 20 Hz), and the server's own `last_outage_ms`.
3. A soak of 4 streams for `--soak-seconds`: the server's resident memory, threads and file
   descriptors every 5 s; growth after the first minute.

Prints a table, appends it to BENCHMARKS.md, draws docs/bench/streams.png.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
from PIL import Image

from benchkit import bar_chart, cpu_name, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "ssd_mobilenet_v2_coco"
SIZE, FPS = (640, 480), 10
OPTIONS = {"max_fps": FPS, "parameters": {"track": "bytetrack", "detect_every": 2}}


def log(text):
    print(f"[bench-streams] {text}", file=sys.stderr, flush=True)


def make_clip(folder, seconds):
    """The test's motion (the cat moving right, the cup left), 2 s of it looped for `seconds`."""
    samples = os.path.join(ROOT, "assets", "samples")
    cat, cup = (Image.open(os.path.join(samples, n)).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg"))
    cat = cat.resize((260, round(cat.height * 260 / cat.width)))
    cup = cup.crop((160, 0, 430, 260)).resize((220, 212))
    frames = []
    for i in range(2 * FPS):
        canvas = Image.new("RGB", SIZE, (120, 120, 120))
        canvas.paste(cup, (400 - 9 * i, 255))
        canvas.paste(cat, (10 + 9 * i, 10))
        frames.append(np.asarray(canvas).tobytes())
    raw = b"".join(frames) * max(1, seconds // 2)
    path = os.path.join(folder, "camera.mp4")
    subprocess.run(["ffmpeg", "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{SIZE[0]}x{SIZE[1]}", "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-g", str(FPS), "-bf", "0", "-preset", "veryfast", path], input=raw, check=True)
    return path


class Camera:
    def __init__(self, port, clip):
        self.port, self.clip, self.process = port, clip, None
        self.url = f"rtsp://127.0.0.1:{port}/live"

    def start(self):
        self.process = subprocess.Popen(["/usr/bin/python3", os.path.join(ROOT, "tests", "python", "rtsp_server.py"),
                                         str(self.port), "/live", self.clip], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        return time.monotonic()

    def kill(self):
        self.process.kill()
        self.process.wait(10)


class Watcher(threading.Thread):
    """Follows one stream's SSE events: (arrival time, latency_ms) per frame answered."""

    def __init__(self, base, stream_id):
        super().__init__(daemon=True)
        self.base, self.id, self.frames, self.stopped = base, stream_id, [], False

    def run(self):
        with requests.get(f"{self.base}/v1/streams/{self.id}/events", stream=True, timeout=3600) as response:
            kind = None
            for line in response.iter_lines(decode_unicode=True):
                if self.stopped:
                    return
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind == "frame":
                    self.frames.append((time.monotonic(), json.loads(line[5:])["latency_ms"]))
                elif kind == "end":
                    return

    def latencies(self, since, until):
        return [l for t, l in self.frames if since <= t < until]


def p95(values):
    return float(np.percentile(values, 95)) if values else float("nan")


def start_stream(base, camera):
    response = requests.post(f"{base}/v1/streams", json={"source": camera.url, "model": MODEL, **OPTIONS}, timeout=60)
    response.raise_for_status()
    watcher = Watcher(base, response.json()["id"])
    watcher.start()
    return watcher


def status(base, stream_id):
    return requests.get(f"{base}/v1/streams/{stream_id}", timeout=10).json()


def process_stats(pid):
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--phase-seconds", type=int, default=30)
    parser.add_argument("--soak-seconds", type=int, default=600)
    parser.add_argument("--server-arg", action="append", default=[], help="a flag for the server beyond --streams-allow (repeat it); the recorded runs use none")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "bench", "streams.png"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-streams-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    camera = Camera(port, make_clip(work, 120))
    camera.start()
    process, base = start_server("bench-streams", args.bin, args.repo, MODEL, extra=["--streams-allow", f"rtsp://127.0.0.1:{port}", *args.server_arg])
    rows, phases = [], {}
    try:
        # 1. 3 streams, a 4th added, then removed.
        steady = [start_stream(base, camera) for _ in range(3)]
        time.sleep(5)  # warm-up: the model's first batches, the tracks' first frames
        marks = [time.monotonic()]
        log(f"3 streams, {args.phase_seconds} s ...")
        time.sleep(args.phase_seconds)
        marks.append(time.monotonic())
        log(f"a 4th stream, {args.phase_seconds} s ...")
        extra = start_stream(base, camera)
        time.sleep(args.phase_seconds)
        marks.append(time.monotonic())
        extra.stopped = True
        gone = requests.delete(f"{base}/v1/streams/{extra.id}", timeout=30).json()
        log(f"the 4th removed, {args.phase_seconds} s ...")
        time.sleep(args.phase_seconds)
        marks.append(time.monotonic())
        for name, (since, until) in zip(["3 streams", "4 streams (one added)", "3 streams (one removed)"], zip(marks, marks[1:])):
            latencies = [l for w in steady for l in w.latencies(since, until)]
            phases[name] = p95(latencies)
            per_stream = [p95(w.latencies(since, until)) for w in steady]
            rows.append((name, len(latencies) / (until - since), phases[name], max(per_stream)))
        if extra.frames:
            extra_latencies = extra.latencies(marks[1], marks[2])
            rows.append(("the added stream, while it ran", len(extra_latencies) / (marks[2] - marks[1]), p95(extra_latencies), p95(extra_latencies)))
        accounted = []
        for w in steady:
            frames = status(base, w.id)["frames"]
            accounted.append((frames["processed"] + frames["dropped"] + frames["failed"]) / max(1, frames["read"] - frames["skipped"]))
        accounted.append((gone["frames"]["processed"] + gone["frames"]["dropped"]) / max(1, gone["frames"]["read"] - gone["frames"]["skipped"]))
        dropped = sum(status(base, w.id)["frames"]["dropped"] for w in steady)

        # 2. The camera restarted.
        reconnects = []
        for attempt in range(3):
            log(f"camera restart {attempt + 1}/3 ...")
            before = status(base, steady[0].id)
            camera.kill()
            while status(base, steady[0].id)["state"] != "reconnecting":
                time.sleep(0.05)
            time.sleep(1)
            read = status(base, steady[0].id)["frames"]["read"]
            back = camera.start()
            while True:
                now = status(base, steady[0].id)
                if now["frames"]["read"] > read:
                    break
                time.sleep(0.05)
            reconnects.append(time.monotonic() - back)
            assert now["reconnects"] > before["reconnects"], now
            time.sleep(5)

        # 3. The soak: 4 streams.
        soak = steady + [start_stream(base, camera)]
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < args.soak_seconds:
            samples.append((time.monotonic() - started, *process_stats(process.pid)))
            if len(samples) % 12 == 0:
                log(f"soak {samples[-1][0]:.0f}/{args.soak_seconds} s: {samples[-1][1]:.0f} MiB, {samples[-1][2]} threads, {samples[-1][3]} fds")
            time.sleep(5)
        after_warmup = [s for s in samples if s[0] >= 60] or samples
        soak_statuses = [status(base, w.id) for w in soak]
        soak_frames = [s["frames"] for s in soak_statuses]
        soak_accounted = min((f["processed"] + f["dropped"] + f["failed"]) / max(1, f["read"] - f["skipped"]) for f in soak_frames)
        soak_p95 = max(s["latency_ms"]["p95"] for s in soak_statuses if s["latency_ms"])
    finally:
        process.terminate()
        process.wait(timeout=30)
        if camera.process.poll() is None:
            camera.kill()

    rss = [s[1] for s in after_warmup]
    threads = [s[2] for s in after_warmup]
    fds = [s[3] for s in after_warmup]
    growth = (rss[-1] - rss[0]) / rss[0]
    base_p95 = phases["3 streams"]
    header = (f"### Live streams ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} vCPUs)\n\n"
              f"{MODEL} as shipped (`--streams-allow` only{''.join(' ' + a for a in args.server_arg)}); an RTSP camera (GStreamer's RTSP server, here) at {SIZE[0]}×{SIZE[1]} "
              f"H.264 {FPS} fps; ByteTrack, detection every 2nd frame, drop_oldest, buffer 2, 1 s frame deadline. "
              f"Latency: frame read off the decoder to its answer published. `make bench-streams`.\n\n")
    lines = ["| phase (the 3 streams that run throughout) | frames/s answered | p95 ms, all 3 | worst stream's p95 ms | p95 ÷ 3 streams |",
             "|---|---|---|---|---|"]
    for name, rate, all_p95, worst in rows:
        lines.append(f"| {name} | {rate:.1f} | {all_p95:.0f} | {worst:.0f} | {all_p95 / base_p95:.2f} |")
    lines += ["", "| check | measured | target |", "|---|---|---|",
              f"| frames processed or counted as dropped, of those taken (the rest in flight when counted), phases 1–3 | {min(accounted) * 100:.1f} % (worst stream; {dropped} dropped) | ≥ 95 % |",
              f"| the same over the soak, 4 streams | {soak_accounted * 100:.2f} % (worst stream) | ≥ 95 % |",
              f"| soak: p95 frame-to-result of the last 256 frames, worst stream | {soak_p95:.0f} ms | ≤ 250 ms |",
              f"| camera restart → next frame read, s (3 restarts) | {' / '.join(f'{r:.2f}' for r in reconnects)} | ≤ 2 |",
              f"| soak {args.soak_seconds} s, 4 streams: resident memory after the first minute | {rss[0]:.0f} → {rss[-1]:.0f} MiB ({growth * 100:+.1f} %), max {max(rss):.0f} | < 5 % growth |",
              f"| soak: threads, file descriptors (min–max after the first minute) | {min(threads)}–{max(threads)}, {min(fds)}–{max(fds)} | flat |",
              f"| soak: frames processed / dropped / failed (4 streams) | {sum(f['processed'] for f in soak_frames)} / {sum(f['dropped'] for f in soak_frames)} / {sum(f['failed'] for f in soak_frames)} | |"]
    table = header + "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "a") as f:
        f.write("\n" + table)
    bar_chart(args.chart, f"Live streams, {MODEL}, 640 x 480 at 10 fps: p95 frame-to-result, ms ({cpu_name()})",
              [(name, p) for name, _, p, _ in rows], width=900, height=320)


if __name__ == "__main__":
    main()
