#!/usr/bin/env python3
"""Instance masks on the wire: response size and server-side time per mask format for 1, 20 and
100 instances on an 800 x 800 photo (make bench-masks).

    python scripts/bench-masks.py --bin target/release/visionserve --repo <test models>

Serves the test set's mask_rcnn_small (random weights, so its masks are blobs of the sizes a
detector finds, not objects) and asks for exactly N instances with score_threshold=0 and
max_detections=N. Per format and count: the JSON body's bytes, and the median over 7 calls of
x-postprocess-time-ms, the server's time after the forward pass (suppression, masks mapped to
the photo, encoding). `none` is the baseline without masks. Prints a table, appends it to
BENCHMARKS.md and draws docs/bench/masks.png (instances on the x axis: 1, 20, 100).
"""
import argparse
import io
import os
import statistics
import sys
import time

import requests
from PIL import Image
from skimage import data as skdata

from benchkit import cpu_name, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ["rle", "polygon", "png", "none"]
COUNTS = [1, 20, 100]
CALLS = 7


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "bench", "masks.png"))
    args = parser.parse_args()
    photo = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((800, 800), Image.BILINEAR).save(photo, "PNG")
    blob = photo.getvalue()
    process, base = start_server("bench-masks", args.bin, args.repo, "mask_rcnn_small")
    rows = {}
    try:
        total = len(FORMATS) * len(COUNTS)
        for i, (count, fmt) in enumerate(((c, f) for c in COUNTS for f in FORMATS), 1):
            print(f"[bench-masks] ({i}/{total}) {count} instances, mask_format={fmt} ...", file=sys.stderr, flush=True)
            times, size, found = [], 0, 0
            for _ in range(CALLS):
                response = requests.post(base + "/v1/models/mask_rcnn_small/predict", data=blob, timeout=600, params={
                    "score_threshold": 0, "iou_threshold": 1, "max_detections": count, "mask_format": fmt})
                response.raise_for_status()
                times.append(float(response.headers["x-postprocess-time-ms"]))
                size = len(response.content)
                found = len(response.json()["results"][0]["detections"])
            rows[(count, fmt)] = {"instances": found, "bytes": size, "ms": statistics.median(times)}
    finally:
        process.terminate()
        process.wait(timeout=30)
    header = (f"### Instance masks on the wire ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} vCPUs)\n\n"
              "mask_rcnn_small (random weights) on an 800 × 800 photo, `max_detections` = N; body bytes and the median "
              f"of {CALLS} calls' `x-postprocess-time-ms` (suppression, masks onto the photo, encoding; `none` has no masks). "
              "`make bench-masks`.\n\n")
    lines = ["| instances | " + " | ".join(f"{f} KB / ms" for f in FORMATS) + " |", "|---|" + "---|" * len(FORMATS)]
    for count in COUNTS:
        cells = [f"{rows[(count, f)]['bytes'] / 1000:.1f} / {rows[(count, f)]['ms']:.2f}" for f in FORMATS]
        lines.append(f"| {rows[(count, FORMATS[0])]['instances']} | " + " | ".join(cells) + " |")
    table = header + "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "a") as f:
        f.write("\n" + table)
    draw(rows, args.chart)


def draw(rows, path):
    """Two line charts (size, time) with Pillow: the server's environment has no plotting library."""
    from PIL import ImageDraw
    colours = {"rle": (31, 119, 180), "polygon": (255, 127, 14), "png": (44, 160, 44), "none": (127, 127, 127)}
    width, height, margin = 520, 360, 60
    chart = Image.new("RGB", (2 * width, height + 40), "white")
    pen = ImageDraw.Draw(chart)
    pen.text((margin, 8), f"Instance masks, 800 x 800 photo, {cpu_name()} (make bench-masks)", fill="black")
    for panel, (key, title, scale) in enumerate((("bytes", "response KB", 1000), ("ms", "ms after the forward", 1))):
        x0 = panel * width + margin
        top, bottom, right = 40, height - 10, panel * width + width - 20
        peak = max(v[key] for v in rows.values()) / scale * 1.1
        pen.line([(x0, top), (x0, bottom), (right, bottom)], fill="black")
        pen.text((x0 + 4, top), f"{title} (max {peak / 1.1:.1f})", fill="black")
        for i, count in enumerate(COUNTS):
            x = x0 + (right - x0) * (i + 0.5) / len(COUNTS)
            pen.text((x - 10, bottom + 4), f"{count}", fill="black")
        for n, fmt in enumerate(FORMATS):
            points = [(x0 + (right - x0) * (i + 0.5) / len(COUNTS), bottom - (bottom - top) * rows[(c, fmt)][key] / scale / peak)
                      for i, c in enumerate(COUNTS)]
            pen.line(points, fill=colours[fmt], width=3)
            for p in points:
                pen.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=colours[fmt])
            pen.text((right - 70, top + 16 + 14 * n), fmt, fill=colours[fmt])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chart.save(path)

if __name__ == "__main__":
    main()
