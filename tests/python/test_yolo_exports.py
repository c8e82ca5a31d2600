"""ultralytics exports beyond -pose and -seg, against ultralytics' predictor on the same file.

NMS-free end-to-end heads (convention = "yolo_end2end"): ultralytics' YOLO26n built from its
yaml with random weights and exported with `nms=False` (models/export_tasks.py), whose answer is
`[N, 300, 6]`, the one-to-one head's own picks. The server answers them without NMS, as
ultralytics' predictor does (it reads `end2end` from the export's metadata and only applies the
confidence threshold and `max_det`).

Classifiers: `yolov8n_cls`, YOLOv8n-cls with random weights, whose export answers softmax
probabilities (convention = "logits", softmax = false), preprocessed as ultralytics' classify
transforms do (shorter side resized, centre crop, 0..1).

Runs in the ultralytics environment (`make test-python` starts it there).
"""
import io
import os

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from skimage import data as skdata

os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO  # noqa: E402

import conftest  # noqa: E402

MODEL = "yolo26n_end2end"
SIZE = 320
PHOTOS = {
    "astronaut-320.png": Image.fromarray(skdata.astronaut()).resize((SIZE, SIZE), Image.BILINEAR),
    # 320 x 191: padded above and below, not resized.
    "page-crop.png": Image.fromarray(skdata.page()).convert("RGB").crop((0, 0, SIZE, 191)),
}


@pytest.fixture(scope="module")
def server(task_server):
    return task_server


def model_file(model=MODEL):
    return os.path.join(os.environ["VISIONSERVE_TASK_MODELS"], model, "model.torchscript")


def ours(server, photo, model=MODEL, **params):
    params = {"score_threshold": "0.25", "max_detections": "300", **params}
    response = requests.post(server.url(f"/v1/models/{model}/predict"), params=params,
                             data=conftest.encode(PHOTOS[photo], "PNG"), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["detections"]


def as_arrays(detections):
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections]).reshape(-1, 4)
    return boxes, np.array([d["score"] for d in detections]), np.array([d["index"] for d in detections])


def test_the_export_is_end_to_end():
    with torch.no_grad():
        out = torch.jit.load(model_file())(torch.zeros(1, 3, SIZE, SIZE))
    assert tuple(out.shape) == (1, 300, 6)


@pytest.mark.parametrize("photo", list(PHOTOS))
def test_picks_match_ultralytics_without_nms(server, photo):
    reference = YOLO(model_file(), task="detect")
    bgr = np.asarray(PHOTOS[photo].convert("RGB"))[:, :, ::-1].copy()
    r = reference.predict(bgr, imgsz=SIZE, conf=0.25, max_det=300, verbose=False)[0]
    ref_boxes, ref_scores, ref_classes = r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), r.boxes.cls.numpy().astype(int)
    assert len(ref_scores) >= 5, "the test model should pick boxes"
    boxes, scores, classes = as_arrays(ours(server, photo))
    assert len(scores) == len(ref_scores)
    # Best first on both sides, but picks of equal score (the random head has ties) may come in
    # either order: each reference pick has its own twin, the same box, score and class. Scores
    # differed by up to 1.2e-4 (float rounding of the input, amplified by the random weights).
    np.testing.assert_allclose(scores, ref_scores, atol=5e-4)
    twins = set()
    for box, score, cls in zip(ref_boxes, ref_scores, ref_classes):
        distance = np.abs(boxes - box).max(axis=1) + np.abs(scores - score) * 1000 + (classes != cls) * 1000
        j = int(distance.argmin())
        assert np.abs(boxes[j] - box).max() <= 0.05 and abs(scores[j] - score) <= 5e-4 and classes[j] == cls, (box, score, cls)
        twins.add(j)
    assert len(twins) == len(ref_scores)


@pytest.mark.parametrize("model,task", [("yolo26n_seg_end2end", "segment"), ("yolo26n_pose_end2end", "pose")])
def test_seg_and_pose_picks_carry_ultralytics_masks_and_points(server, model, task):
    """The -seg and -pose end-to-end heads on a photo the model sees unresized: the same picks,
    each with its mask (made from the prototypes as for `yolov8n_seg`) or its points."""
    from pycocotools import mask as coco_mask
    photo = "astronaut-320.png"
    bgr = np.asarray(PHOTOS[photo].convert("RGB"))[:, :, ::-1].copy()
    r = YOLO(model_file(model), task=task).predict(bgr, imgsz=SIZE, conf=0.25, max_det=300, verbose=False)[0]
    ref_boxes, ref_scores = r.boxes.xyxy.numpy(), r.boxes.conf.numpy()
    assert len(ref_scores) >= 5, "the test model should pick boxes"
    detections = ours(server, photo, model)
    boxes, scores, _ = as_arrays(detections)
    assert len(scores) == len(ref_scores)
    np.testing.assert_allclose(scores, ref_scores, atol=5e-4)
    for box, i in zip(ref_boxes, range(len(ref_boxes))):
        j = int(np.abs(boxes - box).max(axis=1).argmin())
        assert np.abs(boxes[j] - box).max() <= 0.05
        if task == "segment":
            rle = detections[j]["mask"]
            mask = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            ref = r.masks.data.numpy()[i].astype(np.uint8)
            assert int((mask != ref).sum()) <= max(5, 0.001 * ref.sum()), f"{int((mask != ref).sum())} pixels differ"
        else:
            points = np.array(detections[j]["keypoints"]).reshape(17, 3)
            np.testing.assert_allclose(points, r.keypoints.data.numpy()[i], atol=0.05)


def test_overlapping_picks_are_kept_whatever_the_iou_threshold(server):
    """The head's picks overlap (random weights); NMS at 0.1 would drop most of them. No NMS runs,
    so iou_threshold changes nothing."""
    loose = ours(server, "astronaut-320.png")
    strict = ours(server, "astronaut-320.png", iou_threshold="0.1")
    assert loose == strict
    boxes, _, classes = as_arrays(loose)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    overlapping = sum(1 for i in range(len(boxes)) for j in range(i) if classes[i] == classes[j] and iou(boxes[i], boxes[j]) > 0.1)
    assert overlapping > 0, "no same-class picks overlap: the check would not tell NMS from none"
    assert len(ours(server, "astronaut-320.png", max_detections="3")) == 3


def test_an_overlay_is_drawn(server):
    png = requests.post(server.url(f"/v1/models/{MODEL}/predict"), params={"render": "png", "score_threshold": "0.25"},
                        data=conftest.encode(PHOTOS["astronaut-320.png"], "PNG"), timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    assert (np.abs(drawn - np.asarray(PHOTOS["astronaut-320.png"]).astype(int)).sum(2) > 30).mean() > 0.005


@pytest.mark.parametrize("photo", ["astronaut-320.png", "coffee.png"])
def test_a_classifier_export_matches_ultralytics(server, photo):
    """On a 320 x 320 photo neither side resizes: the same probabilities. On coffee.png (600 x
    400) ours and torchvision's PIL bilinear resize differ a little: the same top-1, four of the
    top five, a close top score."""
    photos = dict(PHOTOS, **{"coffee.png": Image.fromarray(skdata.coffee())})
    bgr = np.asarray(photos[photo].convert("RGB"))[:, :, ::-1].copy()
    r = YOLO(model_file("yolov8n_cls"), task="classify").predict(bgr, imgsz=SIZE, verbose=False)[0]
    reference = r.probs.data.numpy()
    response = requests.post(server.url("/v1/models/yolov8n_cls/predict"), params={"top_k": "5"},
                             data=conftest.encode(photos[photo], "PNG"), timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    top5 = np.argsort(-reference)[:5]
    assert reference[top5[0]] > 2 * reference[top5[4]], "the test classifier's softmax should have a clear top"
    if photo == "astronaut-320.png":
        assert [p["index"] for p in predictions] == top5.tolist()
        np.testing.assert_allclose([p["score"] for p in predictions], reference[top5], rtol=1e-3, atol=1e-6)
    else:
        assert predictions[0]["index"] == top5[0]
        assert len({p["index"] for p in predictions} & set(top5.tolist())) >= 4
        np.testing.assert_allclose(predictions[0]["score"], reference[top5[0]], rtol=0.1)


@pytest.mark.parametrize("photo", list(PHOTOS))
def test_rotated_boxes_match_ultralytics(server, photo):
    """yolov8n_obb (random weights): the same rotated boxes after ultralytics' ProbIoU fast NMS,
    in the photo's pixels, with the same corners (not clipped: a rotated box may reach past the
    photo); `box` is their axis-aligned bound."""
    bgr = np.asarray(PHOTOS[photo].convert("RGB"))[:, :, ::-1].copy()
    r = YOLO(model_file("yolov8n_obb"), task="obb").predict(bgr, imgsz=SIZE, conf=0.25, iou=0.7, max_det=300, verbose=False)[0]
    ref_rotated, ref_scores, ref_classes = r.obb.xywhr.numpy(), r.obb.conf.numpy(), r.obb.cls.numpy().astype(int)
    ref_corners = r.obb.xyxyxyxy.numpy()
    assert len(ref_scores) >= 3, "the test model should find rotated boxes"
    detections = ours(server, photo, "yolov8n_obb", iou_threshold="0.7")
    assert len(detections) == len(ref_scores)
    np.testing.assert_allclose([d["score"] for d in detections], ref_scores, atol=5e-4)
    assert [d["index"] for d in detections] == ref_classes.tolist()
    rotated = np.array([[d["rotated_box"][k] for k in ("cx", "cy", "w", "h", "angle")] for d in detections])
    np.testing.assert_allclose(rotated[:, :4], ref_rotated[:, :4], atol=0.05)
    np.testing.assert_allclose(rotated[:, 4], ref_rotated[:, 4], atol=1e-4)
    corners = np.array([d["corners"] for d in detections])
    np.testing.assert_allclose(corners, ref_corners, atol=0.05)
    # The bound of the corners, clipped to the photo as every answer's boxes are.
    width, height = PHOTOS[photo].size
    bounds = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections])
    low, high = corners.min(axis=1), corners.max(axis=1)
    np.testing.assert_allclose(bounds, np.stack([low[:, 0].clip(0, width), low[:, 1].clip(0, height),
                                                 high[:, 0].clip(0, width), high[:, 1].clip(0, height)], 1), atol=1e-3)


def test_rotated_boxes_over_v2_torchserve_and_an_overlay(server):
    import tritonclient.http as httpclient
    blob = conftest.encode(PHOTOS["astronaut-320.png"], "PNG")
    v1 = ours(server, "astronaut-320.png", "yolov8n_obb", max_detections="10")
    http = httpclient.InferenceServerClient(url=server.base.removeprefix("http://"))
    meta = {o["name"]: o for o in http.get_model_metadata("yolov8n_obb")["outputs"]}
    assert meta["rotated_boxes"]["shape"] == [-1, -1, 5] and meta["corners"]["shape"] == [-1, -1, 4, 2]
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)
    names = ("num_detections", "rotated_boxes", "corners")
    result = http.infer("yolov8n_obb", [image], outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in names],
                        parameters={"score_threshold": 0.25, "max_detections": 10})
    count = int(result.as_numpy("num_detections")[0])
    assert count == len(v1) > 0
    np.testing.assert_allclose(result.as_numpy("corners")[0][:count], [d["corners"] for d in v1], atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("rotated_boxes")[0][:count, 4], [d["rotated_box"]["angle"] for d in v1], atol=1e-6)
    answer = requests.post(server.url("/predictions/yolov8n_obb"), data=blob, timeout=60).json()
    assert answer and all(len(o["corners"]) == 4 and "score" in o for o in answer)
    png = requests.post(server.url("/v1/models/yolov8n_obb/predict"), params={"render": "png", "score_threshold": "0.25"}, data=blob, timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    assert (np.abs(drawn - np.asarray(PHOTOS["astronaut-320.png"]).astype(int)).sum(2) > 30).mean() > 0.005
