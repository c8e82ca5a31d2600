#!/usr/bin/env python3
"""What a video costs against its frames sent as photos (make bench-video).

    python scripts/bench-video.py --bin target/release/visionserve --repo models

A 640 x 480 H.264 clip of 100 frames (the project's photos moving, 10 fps; made with ffmpeg)
through the default SSD as shipped: one video request (every frame; with ByteTrack; with
ByteTrack detecting every 2nd frame), against the same 100 frames decoded to PNG and sent as
photos by one client, and by 4 clients at once (a video keeps 4 frames in flight). Wall time of
each, as frames per second; medians of 3 runs. The frame-to-line latency is the time from a
frame's line to the next one's, which is what a client watching the lines sees. Prints a table,
appends it to BENCHMARKS.md, draws docs/bench/video.png.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import requests
from PIL import Image

from benchkit import bar_chart, cpu_name, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "ssd_mobilenet_v2_coco"
FRAMES, SIZE, RUNS = 100, (640, 480), 3


def make_clip(folder):
    """The test's clip (tests/python/test_video.py): the cat moving right, the cup left."""
    samples = os.path.join(ROOT, "assets", "samples")
    cat, cup = (Image.open(os.path.join(samples, n)).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg"))
    cat = cat.resize((260, round(cat.height * 260 / cat.width)))
    cup = cup.crop((160, 0, 430, 260)).resize((220, 212))
    raw = bytearray()
    for i in range(FRAMES):
        canvas = Image.new("RGB", SIZE, (120, 120, 120))
        canvas.paste(cup, (420 - 4 * i, 255))
        canvas.paste(cat, (10 + 5 * i, 10))
        raw += np.asarray(canvas).tobytes()
    path = os.path.join(folder, "clip.mp4")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "%dx%d" % SIZE,
                    "-r", "10", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", path], input=bytes(raw), check=True)
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", path, "-pix_fmt", "rgb24", os.path.join(folder, "%04d.png")], check=True)
    pngs = [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")]
    return open(path, "rb").read(), pngs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "bench", "video.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        video, pngs = make_clip(folder)
    process, base = start_server("bench-video", args.bin, args.repo, MODEL)
    predict = base + f"/v1/models/{MODEL}/predict"
    session = requests.Session()

    def video_run(params):
        started = time.monotonic()
        arrivals = []
        with session.post(predict, data=video, params=params, headers={"Content-Type": "video/mp4"}, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line and json.loads(line)["event"] == "frame":
                    arrivals.append(time.monotonic())
        assert len(arrivals) == params.get("max_frames", FRAMES), len(arrivals)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return time.monotonic() - started, statistics.quantiles(gaps, n=20)[18] if len(gaps) > 1 else None

    def photos_run(clients):
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            def send(png):
                with requests.Session() as s:
                    r = s.post(predict, data=png, timeout=600)
                    r.raise_for_status()
            list(pool.map(send, pngs))
        return time.monotonic() - started, None

    rows = [("video, every frame", lambda: video_run({})),
            ("video, ByteTrack", lambda: video_run({"track": "bytetrack"})),
            ("video, ByteTrack, detect every 2nd frame", lambda: video_run({"track": "bytetrack", "detect_every": 2})),
            ("the frames as PNG photos, 1 client", lambda: photos_run(1)),
            ("the frames as PNG photos, 4 clients", lambda: photos_run(4))]
    results = {}
    try:
        video_run({"max_frames": 5})  # warm
        for run in range(RUNS):
            for i, (name, call) in enumerate(rows):
                print(f"[bench-video] run {run + 1}/{RUNS}, ({i + 1}/{len(rows)}) {name} ...", file=sys.stderr, flush=True)
                results.setdefault(name, []).append(call())
    finally:
        process.terminate()
        process.wait(timeout=30)

    fps = {name: FRAMES / statistics.median(s for s, _ in runs) for name, runs in results.items()}
    gap = {name: statistics.median(g for _, g in runs) for name, runs in results.items() if runs[0][1] is not None}
    reference = fps["the frames as PNG photos, 4 clients"]
    header = (f"### Video files ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} vCPUs)\n\n"
              f"{MODEL} as shipped; a {SIZE[0]}×{SIZE[1]} H.264 clip of {FRAMES} frames, one request, against the same "
              f"frames decoded to PNG and sent as photos; medians of {RUNS} runs. `make bench-video`.\n\n")
    lines = ["| what | frames/s | ÷ photos at 4 clients | p95 gap between frame lines, ms |", "|---|---|---|---|"]
    for name, _ in rows:
        g = f"{gap[name] * 1000:.0f}" if name in gap else "–"
        lines.append(f"| {name} | {fps[name]:.1f} | {fps[name] / reference:.2f} | {g} |")
    table = header + "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "a") as f:
        f.write("\n" + table)
    bar_chart(args.chart, f"Video, 640 x 480 H.264, {MODEL}: frames per second ({cpu_name()})",
              [(name, fps[name]) for name, _ in rows], width=900, height=320)



if __name__ == "__main__":
    main()
