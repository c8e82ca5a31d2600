#!/usr/bin/env python3
"""Sliced detection's cost on the default SSD (make bench-sliced).

    python scripts/bench-sliced.py --bin target/release/visionserve --repo models

A 1920 x 1080 JPEG (the project's photos laid as a mosaic) in 15 tiles of 512 x 512 with 0.2
overlap, against what slicing cannot avoid: one 15-image forward (the same 15 tiles sent as one
V2 batch of PNGs, its x-inference-time-ms) plus one decode (the photo sent as a single tile:
x-preprocess-time-ms, the decode and one resize). The sliced cost is the server's own time for
the request: preprocess + queue + inference + postprocess. Then the merge on many raw boxes: the
mosaic in 300 x 300 tiles at score_threshold 0.05 and 0.01, its x-postprocess-time-ms (every tile's NMS,
the merge and the JSON), with the raw count counted by sending each tile alone. Medians of 7 calls, one
client. Prints a table, appends it to BENCHMARKS.md, draws docs/bench/sliced.png.
"""
import argparse
import base64
import io
import os
import statistics
import sys
import time

import requests
from PIL import Image
from skimage import data as skdata

from benchkit import bar_chart, cpu_name, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "ssd_mobilenet_v2_coco"
CALLS = 7
# Score thresholds for the merge rows: about 1,300 and 20,000 boxes out of the tiles.
MERGE_SCORES = [0.05, 0.01]


def mosaic():
    """The test's mosaic (tests/python/test_sliced.py): four photos at 0.55, rows of 230 px."""
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.stereo_motorcycle()[0]]
    images = [Image.fromarray(p).convert("RGB") for p in photos]
    images = [i.resize((round(i.width * 0.55), round(i.height * 0.55)), Image.BILINEAR) for i in images]
    canvas = Image.new("RGB", (1920, 1080), (128, 128, 128))
    y, row = 0, 0
    while y < canvas.height:
        x, i = -97 * row, row
        while x < canvas.width:
            canvas.paste(images[i % 4], (x, y))
            x, i = x + images[i % 4].width, i + 1
        y, row = y + 230, row + 1
    return canvas


def headers_median(call, keys):
    samples = [call() for _ in range(CALLS)]
    return {k: statistics.median(float(s[k]) for s in samples) for k in keys}, samples[-1]


STAGES = ["x-preprocess-time-ms", "x-queue-time-ms", "x-inference-time-ms", "x-postprocess-time-ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "bench", "sliced.png"))
    args = parser.parse_args()
    canvas = mosaic()
    jpeg = io.BytesIO()
    canvas.save(jpeg, "JPEG", quality=90)
    jpeg = jpeg.getvalue()
    process, base = start_server("bench-sliced", args.bin, args.repo, MODEL)
    predict = base + f"/v1/models/{MODEL}/predict"

    def post(blob, **params):
        r = requests.post(predict, params=params, data=blob, timeout=600, headers={"content-type": "application/octet-stream"})
        r.raise_for_status()
        return r

    try:
        print("[bench-sliced] (1/4) 1920x1080 in 15 tiles of 512, sliced ...", file=sys.stderr, flush=True)
        sliced, last = headers_median(lambda: post(jpeg, slice=512).headers, STAGES + ["x-batch-size"])
        tiles = int(last["x-batch-size"])
        print("[bench-sliced] (2/4) the same 15 tiles as one 15-image forward ...", file=sys.stderr, flush=True)
        from sahi.slicing import get_slice_bboxes
        boxes = get_slice_bboxes(1080, 1920, 512, 512, overlap_height_ratio=0.2, overlap_width_ratio=0.2)
        encoded = []
        for x1, y1, x2, y2 in boxes:
            tile = io.BytesIO()
            canvas.crop((x1, y1, x2, y2)).save(tile, "PNG")
            encoded.append(base64.b64encode(tile.getvalue()).decode())
        body = {"inputs": [{"name": "image", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}],
                "parameters": {"binary_data_output": False}}

        def batched():
            r = requests.post(base + f"/v2/models/{MODEL}/infer", json=body, timeout=600)
            r.raise_for_status()
            return r.headers
        forward, _ = headers_median(batched, ["x-inference-time-ms"])
        print("[bench-sliced] (3/4) one decode (the photo as one tile) ...", file=sys.stderr, flush=True)
        decode, _ = headers_median(lambda: post(jpeg, slice=8192).headers, ["x-preprocess-time-ms"])
        merges = []
        png = io.BytesIO()
        canvas.save(png, "PNG")
        cuts = get_slice_bboxes(1080, 1920, 300, 300, overlap_height_ratio=0.2, overlap_width_ratio=0.2)
        for score in MERGE_SCORES:
            print(f"[bench-sliced] (4/4) the merge on many raw boxes (300 x 300 tiles, score {score}) ...", file=sys.stderr, flush=True)
            raw = 0
            for x1, y1, x2, y2 in cuts:
                tile = io.BytesIO()
                canvas.crop((x1, y1, x2, y2)).save(tile, "PNG")
                raw += len(post(tile.getvalue(), score_threshold=score, max_detections=10000).json()["results"][0]["detections"])
            params = {"slice": "auto", "score_threshold": score, "max_detections": 10000}
            merge, _ = headers_median(lambda: post(png.getvalue(), **params).headers, ["x-postprocess-time-ms"])
            kept = len(post(png.getvalue(), **params).json()["results"][0]["detections"])
            merges.append((score, len(cuts), raw, kept, merge["x-postprocess-time-ms"]))
    finally:
        process.terminate()
        process.wait(timeout=30)

    cost = sum(sliced[k] for k in STAGES)
    floor = forward["x-inference-time-ms"] + decode["x-preprocess-time-ms"]
    header = (f"### Sliced detection ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} vCPUs)\n\n"
              f"{MODEL} as shipped, a 1920 × 1080 JPEG in {tiles} tiles of 512² (overlap 0.2); medians of {CALLS} calls, "
              "one client, server-side times from the `x-*` headers. `make bench-sliced`.\n\n")
    lines = [
        "| what | ms |", "|---|---|",
        f"| sliced request: preprocess (decode, {tiles} crops and resizes) | {sliced['x-preprocess-time-ms']:.1f} |",
        f"| sliced request: queue | {sliced['x-queue-time-ms']:.1f} |",
        f"| sliced request: forward of the {tiles} tiles | {sliced['x-inference-time-ms']:.1f} |",
        f"| sliced request: postprocess (per-tile NMS, merge) | {sliced['x-postprocess-time-ms']:.2f} |",
        f"| **sliced request, total** | **{cost:.1f}** |",
        f"| one {len(boxes)}-image forward (V2 batch of the same tiles) | {forward['x-inference-time-ms']:.1f} |",
        f"| one decode (the photo as one tile: decode + one resize) | {decode['x-preprocess-time-ms']:.1f} |",
        f"| **ratio: sliced ÷ (forward + decode)** (target ≤ 1.25) | **{cost / floor:.3f}** |",
    ]
    lines += [f"| merge at score_threshold {score}: {raw} tile boxes from {n} tiles of 300² → {kept}; postprocess "
              f"(per-tile NMS, merge, JSON) (target: merge ≤ 5 ms for 2,000) | {ms:.2f} |" for score, n, raw, kept, ms in merges]
    table = header + "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "a") as f:
        f.write("\n" + table)
    bar_chart(args.chart, f"Sliced detection, 1920 x 1080 in 15 tiles of 512, ms ({cpu_name()})",
              [("sliced request", cost), ("15-image forward + decode", floor), ("1.25 x that (target)", 1.25 * floor)])



if __name__ == "__main__":
    main()
