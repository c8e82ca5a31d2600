"""Video files on /v1 (`Content-Type: video/*`): clips made here with Debian's ffmpeg from the
project's photos moving with known motion. Each frame's answer equals the same frame sent as
a photo; sampling, tracking, pipelines, SSE, streaming and the refusals."""
import json
import pathlib
import subprocess
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import Server, encode

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "assets" / "samples"
DETECTOR = "ssd_mobilenet_v2_coco"
SIZE = (640, 480)


def sprite(name, width, crop=None):
    image = Image.open(SAMPLES / name).convert("RGB")
    image = image.crop(crop) if crop else image
    return image.resize((width, round(image.height * width / image.width)), Image.BILINEAR)


# The cup cut from its photo, so it is large enough for the SSD's 300² input.
CAT, CUP = sprite("chelsea.jpg", 260), sprite("coffee.jpg", 220, crop=(160, 0, 430, 260))


def frames(count, cross=False):
    """The cat moving right and the cup moving left, 9 px a frame; `cross` puts them on one
    row, so they meet and the cat passes in front of the cup."""
    for i in range(count):
        canvas = Image.new("RGB", SIZE, (120, 120, 120))
        cup_y, cat_y = (150, 160) if cross else (255, 10)
        canvas.paste(CUP, (400 - 9 * i, cup_y))
        canvas.paste(CAT, (10 + 9 * i, cat_y))
        yield canvas


def clip(tmp_path, count, fps=10, codec=("libx264", "-pix_fmt", "yuv420p"), suffix=".mp4", cross=False):
    path = tmp_path / f"clip{suffix}"
    command = ["ffmpeg", "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{SIZE[0]}x{SIZE[1]}", "-r", str(fps), "-i", "-", "-c:v", *codec, str(path)]
    raw = b"".join(np.asarray(f).tobytes() for f in frames(count, cross))
    subprocess.run(command, input=raw, check=True)
    return path


def decoded_frames(path, tmp_path):
    """The clip's frames as ffmpeg decodes them (to PNG, losslessly): what the server sees."""
    out = tmp_path / "frames"
    out.mkdir(exist_ok=True)
    subprocess.run(["ffmpeg", "-y", "-hide_banner", "-loglevel", "error", "-i", str(path), "-pix_fmt", "rgb24",
                    str(out / "%04d.png")], check=True)
    return sorted(out.glob("*.png"))


def post_video(server, path, content_type="video/mp4", headers=None, stream=False, **params):
    with open(path, "rb") as f:
        body = f.read()
    return requests.post(server.url(f"/v1/models/{params.pop('model', DETECTOR)}/predict"), data=body, params=params,
                         headers={"Content-Type": content_type, **(headers or {})}, timeout=300, stream=stream)


def events(response):
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end", (lines[0], lines[-1])
    return lines[0], [l for l in lines[1:-1] if l["event"] == "frame"], lines[-1]


def same_detections(a, b):
    assert [d["label"] for d in a] == [d["label"] for d in b], (a, b)
    for x, y in zip(a, b):
        assert abs(x["score"] - y["score"]) < 1e-4, (x, y)
        for k in ("x1", "y1", "x2", "y2"):
            assert abs(x["box"][k] - y["box"][k]) < 0.01, (x, y)


def test_each_frame_is_answered_as_the_same_frame_sent_as_a_photo(default_server, tmp_path):
    path = clip(tmp_path, 12)
    start, answered, end = events(post_video(default_server, path))
    assert start["video"]["codec"] == "h264" and (start["video"]["width"], start["video"]["height"]) == SIZE
    assert start["video"]["frame_rate"] == 10 and start["model"] == DETECTOR and start["task"] == "detection"
    assert [f["frame"] for f in answered] == list(range(12))
    assert [round(f["timestamp"], 3) for f in answered] == [round(i / 10, 3) for i in range(12)]
    assert end["frames"] == 12 and end["failed"] == 0 and end["ended"] == "complete", end
    labels = set()
    for frame, png in zip(answered, decoded_frames(path, tmp_path)):
        photo = requests.post(default_server.url(f"/v1/models/{DETECTOR}/predict"), data=png.read_bytes(), timeout=60)
        assert photo.status_code == 200, photo.text
        same_detections(frame["detections"], photo.json()["results"][0]["detections"])
        labels |= {d["label"] for d in frame["detections"]}
    assert {"cat", "cup"} <= labels, labels


@pytest.mark.parametrize("codec,suffix,content_type", [
    (("libvpx-vp9", "-pix_fmt", "yuv420p", "-deadline", "realtime", "-cpu-used", "8"), ".webm", "video/webm"),
    (("mjpeg", "-q:v", "3"), ".mkv", "video/x-matroska"),
    (("libx265", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-x265-params", "log-level=error"), ".mp4", "video/mp4"),
])
def test_other_containers_and_codecs(default_server, tmp_path, codec, suffix, content_type):
    path = clip(tmp_path, 4, codec=codec, suffix=suffix)
    start, answered, end = events(post_video(default_server, path, content_type=content_type, model="mobilenet_v2"))
    assert len(answered) == 4 and end["ended"] == "complete", end
    assert all(f["predictions"] for f in answered), answered[0]
    assert start["video"]["codec"] in {"vp9", "mjpeg", "hevc"}


def test_sampling_fps_max_frames_start_end(default_server, tmp_path):
    path = clip(tmp_path, 30)  # 3 s at 10 fps
    _, answered, end = events(post_video(default_server, path, model="mobilenet_v2", fps=2))
    assert [round(f["timestamp"], 3) for f in answered] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5], answered
    _, answered, end = events(post_video(default_server, path, model="mobilenet_v2", max_frames=3))
    assert len(answered) == 3 and end["ended"] == "max_frames", end
    _, answered, end = events(post_video(default_server, path, model="mobilenet_v2", start=1, end=2))
    stamps = [round(f["timestamp"], 3) for f in answered]
    assert stamps[0] == pytest.approx(1.0, abs=0.051) and stamps[-1] < 2.0 and len(stamps) == 10, stamps


def test_tracking_keeps_one_id_per_moving_object(default_server, tmp_path):
    path = clip(tmp_path, 20)
    _, answered, _ = events(post_video(default_server, path, track="bytetrack"))
    ids = {"cat": set(), "cup": set()}
    for frame in answered:
        for d in frame["detections"]:
            if d["label"] in ids:
                ids[d["label"]].add(d["track_id"])
    assert len(ids["cat"]) == 1 and len(ids["cup"]) == 1 and ids["cat"] != ids["cup"], ids
    assert None not in ids["cat"] | ids["cup"]


def test_detect_every_second_frame_coasts_between(default_server, tmp_path):
    path = clip(tmp_path, 12)
    _, every, _ = events(post_video(default_server, path, track="bytetrack"))
    _, second, _ = events(post_video(default_server, path, track="bytetrack", detect_every=2))
    assert [f["detected"] for f in second] == [i % 2 == 0 for i in range(12)]
    for i in range(3, 12, 2):
        # A coasted frame's cat is where the detector puts it on that frame, near enough.
        truth = next(d for d in every[i]["detections"] if d["label"] == "cat")
        moved = next(d for d in second[i]["detections"] if d["label"] == "cat")
        assert moved["coasted"] is True and moved["track_id"] == truth["track_id"]
        assert iou(truth["box"], moved["box"]) > 0.8, (truth, moved)


def iou(a, b):
    w = max(0, min(a["x2"], b["x2"]) - max(a["x1"], b["x1"]))
    h = max(0, min(a["y2"], b["y2"]) - max(a["y1"], b["y1"]))
    union = (a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]) - w * h
    return w * h / union


def test_a_pipeline_answers_each_frame(default_server, tmp_path):
    path = clip(tmp_path, 4)
    start, answered, end = events(post_video(default_server, path, model="detect_then_classify", track="bytetrack"))
    assert start["model"] == "detect_then_classify" and end["failed"] == 0, end
    cats = [d for f in answered for d in f["detections"] if d["label"] == "cat"]
    assert cats and all(d["classification"]["predictions"] for d in cats), answered[0]
    assert all(d["track_id"] == cats[0]["track_id"] for d in cats)


def test_frames_leave_as_they_are_done_and_as_server_sent_events(default_server, tmp_path):
    path = clip(tmp_path, 40)
    # requests asks for gzip: the lines must not wait in a compressor.
    response = post_video(default_server, path, stream=True)
    assert response.status_code == 200
    seen = []
    for line in response.iter_lines():
        if line:
            seen.append((time.monotonic(), json.loads(line)["event"]))
    first_frame = next(t for t, e in seen if e == "frame")
    assert seen[-1][1] == "end" and seen[-1][0] - first_frame > 0.3, "every line arrived at once"
    sse = post_video(default_server, clip(tmp_path, 2), headers={"Accept": "text/event-stream"}, model="mobilenet_v2")
    assert sse.headers["content-type"] == "text/event-stream"
    blocks = [b for b in sse.text.split("\n\n") if b]
    assert [b.split("\n")[0] for b in blocks] == ["event: start", "event: frame", "event: frame", "event: end"]
    assert json.loads(blocks[1].split("data: ", 1)[1])["frame"] == 0


def test_bad_clips_and_parameters_are_refused(default_server, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    response = post_video(default_server, garbage)
    assert response.status_code == 400 and "not a video" in response.json()["error"]["message"], response.text
    sound = tmp_path / "sound.mkv"
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=1", str(sound)], check=True)
    response = post_video(default_server, sound, content_type="video/x-matroska")
    assert response.status_code == 400 and "no video stream" in response.json()["error"]["message"], response.text
    cut = tmp_path / "cut.mp4"  # its index first, then half its frames: it probes, then breaks off
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(clip(tmp_path, 20)), "-c", "copy", "-movflags", "+faststart",
                    str(tmp_path / "whole.mp4")], check=True)
    whole = (tmp_path / "whole.mp4").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    response = post_video(default_server, cut)
    assert response.status_code == 400 and "decoding stopped" in response.json()["error"]["message"], response.text
    path = clip(tmp_path, 2)
    for params, word in [({"fps": 0}, "fps"), ({"max_frames": 10**9}, "max_frames"), ({"track": "sort"}, "track"),
                         ({"detect_every": 2}, "detect_every"), ({"colour": "red"}, "colour"),
                         ({"model": "mobilenet_v2", "track": "bytetrack"}, "track")]:
        response = post_video(default_server, path, **params)
        assert response.status_code == 422 and word in response.json()["error"]["message"], (params, response.text)
    assert post_video(default_server, path, model="no_such_model").status_code == 404
    assert requests.post(default_server.url(f"/v1/models/{DETECTOR}/predict"), headers={"Content-Type": "video/mp4"},
                         data=b"", timeout=30).status_code == 400


def test_a_server_without_ffmpeg_answers_501_and_serves_photos(tmp_path):
    import os
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"], extra_args=["--ffmpeg", str(tmp_path / "no-ffmpeg")])
    try:
        response = requests.post(server.url("/v1/models/resnet18/predict"), data=b"\x1aE\xdf\xa3" * 100,
                                 headers={"Content-Type": "video/webm"}, timeout=30)
        assert response.status_code == 501 and "FFmpeg" in response.json()["error"]["message"], response.text
        photo = encode(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG")
        assert requests.post(server.url("/v1/models/resnet18/predict"), data=photo, timeout=30).status_code == 200
    finally:
        server.stop()
