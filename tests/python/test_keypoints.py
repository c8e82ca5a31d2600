"""Keypoints (task = "keypoints") against the reference implementations, on the real binary:

- `yolov8n_pose`: ultralytics' own YOLOv8n-pose export (random weights, see
  models/export_tasks.py), dropped into a folder with a config.toml, against ultralytics' own
  predictor (`YOLO(file).predict`: its letterbox, NMS and `scale_coords`) on the same file.
  Where the photo needs no resizing (320 x 320, or a 320 x 208 crop that is only padded) both
  sides feed the network the same floats and the answers agree to float rounding: the letterbox's
  padding and the mapping back to the photo's pixels are checked exactly. Where it is resized,
  our cv2-style bilinear (`resize_filter = "opencv_linear"`) and cv2's fixed-point one differ by
  a grey level here and there; a random-weight network amplifies that (on skimage's 512 x 512
  astronaut the poses part ways), so the resized case is checked on a photo where they agree
  closely, by matching poses rather than comparing them in order.
- `keypoint_rcnn_small`: torchvision's KeypointRCNN against the same TorchScript file run here.
- The answer is COCO's result layout: pycocotools' COCOeval reads it as it comes.

Runs in the ultralytics environment (`make test-python` starts it there).
"""
import copy
import io
import json
import os

import numpy as np
import pytest
import requests
import torch
import torchvision  # noqa: F401  (registers torchvision's operators for the scripted model)
import tritonclient.http as httpclient
from PIL import Image
from skimage import data as skdata

os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO  # noqa: E402

import conftest  # noqa: E402

POSE = "yolov8n_pose"
RCNN = "keypoint_rcnn_small"


def encode(image, fmt="PNG"):
    return conftest.encode(image, fmt)


ASTRONAUT = Image.fromarray(skdata.astronaut())
PHOTOS = {
    # The pose model's own input size: no resize, no padding.
    "astronaut-320.png": ASTRONAUT.resize((320, 320), Image.BILINEAR),
    "astronaut.png": ASTRONAUT,
    # Fits the input's width: padded above and below, not resized.
    "astronaut-crop.png": ASTRONAUT.crop((96, 40, 416, 248)),
    "coffee.png": Image.fromarray(skdata.coffee()),
    "chelsea-wide.png": Image.fromarray(skdata.chelsea()).resize((520, 240), Image.BILINEAR),
}
PARAMS = {"score_threshold": "0.25", "iou_threshold": "0.7", "max_detections": "300"}  # ultralytics' defaults


@pytest.fixture(scope="module")
def server(task_server):
    return task_server


@pytest.fixture(scope="module")
def ultralytics_model():
    path = os.path.join(os.environ["VISIONSERVE_TASK_MODELS"], POSE, "model.torchscript")
    return YOLO(path, task="pose")


def ours(server, model, photo, params=PARAMS):
    response = requests.post(server.url(f"/v1/models/{model}/predict"), params=params, data=encode(PHOTOS[photo]), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def reference(model, photo):
    bgr = np.asarray(PHOTOS[photo].convert("RGB"))[:, :, ::-1].copy()
    r = model.predict(bgr, imgsz=320, conf=0.25, iou=0.7, max_det=300, verbose=False)[0]
    return r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), r.keypoints.data.numpy()


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def as_arrays(result):
    detections = result["detections"]
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections]).reshape(-1, 4)
    scores = np.array([d["score"] for d in detections])
    points = np.array([d["keypoints"] for d in detections]).reshape(-1, 17, 3)
    return boxes, scores, points


@pytest.mark.parametrize("photo", ["astronaut-320.png", "astronaut-crop.png"])
def test_pose_matches_ultralytics_exactly_when_the_photo_is_not_resized(server, ultralytics_model, photo):
    result = ours(server, POSE, photo)
    boxes, scores, points = as_arrays(result)
    ref_boxes, ref_scores, ref_points = reference(ultralytics_model, photo)
    assert len(ref_scores) >= 3, "the test model should find people"
    assert len(scores) == len(ref_scores)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(boxes, ref_boxes, atol=0.05)
    np.testing.assert_allclose(points, ref_points, atol=0.05)
    assert result["keypoint_names"][:3] == ["nose", "left_eye", "right_eye"]
    assert [15, 13] in result["skeleton"]


def test_pose_matches_ultralytics_through_the_resizing_letterbox(server, ultralytics_model):
    photo = "chelsea-wide.png"  # 520 x 240, shrunk to 320 x 148 and padded
    boxes, scores, points = as_arrays(ours(server, POSE, photo))
    ref_boxes, ref_scores, ref_points = reference(ultralytics_model, photo)
    assert len(ref_scores) >= 1
    # Every confident reference pose has its twin: the same box, a close score, the same points
    # (the random model's boxes overlap a lot, so the twin is the closest in points among them).
    confident = [i for i in range(len(ref_scores)) if ref_scores[i] >= 0.35]
    matched = 0
    for i in confident:
        near = [j for j in range(len(scores)) if iou(ref_boxes[i], boxes[j]) >= 0.95 and abs(scores[j] - ref_scores[i]) < 0.02]
        if near and min(np.abs(points[j, :, :2] - ref_points[i, :, :2]).max() for j in near) < 4.0:
            matched += 1
    assert matched >= 0.9 * len(confident), f"{photo}: {matched} of {len(confident)} confident poses matched"
    width, height = PHOTOS[photo].size
    assert (points[..., 0] >= 0).all() and (points[..., 0] <= width).all()
    assert (points[..., 1] >= 0).all() and (points[..., 1] <= height).all()


def test_cocoeval_reads_the_answer_as_it_comes(server, ultralytics_model):
    """Ground truth from ultralytics' poses, results straight from our /v1 answer: OKS-based AP
    is 1.0 only if every point sits where it should, in COCO's order and layout. Both sides keep
    the top 20, COCOeval's maxDets for keypoints."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ref_boxes, ref_scores, ref_points = (a[:20] for a in reference(ultralytics_model, "astronaut-320.png"))
    top20 = dict(PARAMS, max_detections="20")
    annotations = []
    for i, (b, p) in enumerate(zip(ref_boxes, ref_points)):
        keypoints = np.concatenate([p[:, :2], np.full((17, 1), 2.0)], axis=1).flatten().tolist()
        w, h = float(b[2] - b[0]), float(b[3] - b[1])
        annotations.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": w * h,
                            "bbox": [float(b[0]), float(b[1]), w, h], "keypoints": keypoints, "num_keypoints": 17})
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 320, "height": 320}], "annotations": annotations,
                  "categories": [{"id": 1, "name": "person", "keypoints": ours(server, POSE, "astronaut-320.png")["keypoint_names"]}]}
    gt.createIndex()
    results = [{"image_id": 1, "category_id": 1, "keypoints": d["keypoints"], "score": d["score"]}
               for d in ours(server, POSE, "astronaut-320.png", top20)["detections"]]
    evaluation = COCOeval(gt, gt.loadRes(results), "keypoints")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] > 0.99
    # The same points shifted by one keypoint's place no longer match: the check can fail.
    shuffled = copy.deepcopy(results)
    for r in shuffled:
        r["keypoints"] = r["keypoints"][3:] + r["keypoints"][:3]
    evaluation = COCOeval(gt, gt.loadRes(shuffled), "keypoints")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] < 0.5


def test_keypoint_rcnn_matches_torchvision(server):
    path = os.path.join(os.environ["VISIONSERVE_TASK_MODELS"], RCNN, "model.pt")
    model = torch.jit.load(path).eval()
    for photo in ["astronaut.png", "chelsea-wide.png"]:
        image = torch.from_numpy(np.asarray(PHOTOS[photo].convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            _, (found,) = model([image])
        result = ours(server, RCNN, photo, {"score_threshold": "0.0", "iou_threshold": "1.0", "max_detections": "100"})
        boxes, scores, points = as_arrays(result)
        keep = found["scores"].numpy() >= 0.0
        assert len(scores) == int(keep.sum()) > 0, photo
        # torchvision's own order is by score; ours too.
        np.testing.assert_allclose(scores, found["scores"].numpy(), atol=1e-4)
        np.testing.assert_allclose(boxes, found["boxes"].numpy(), atol=1.0)
        np.testing.assert_allclose(points[..., :2], found["keypoints"].numpy()[..., :2], atol=1.0)
        np.testing.assert_allclose(points[..., 2], found["keypoints_scores"].numpy(), atol=1e-3)


def test_v2_keypoints_tensor_holds_the_same_points(server):
    client = httpclient.InferenceServerClient(server.base.replace("http://", ""))
    metadata = client.get_model_metadata(POSE)
    spec = next(o for o in metadata["outputs"] if o["name"] == "keypoints")
    assert (spec["datatype"], spec["shape"]) == ("FP32", [-1, -1, 17, 3])
    blob = encode(PHOTOS["astronaut-320.png"])
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([blob], dtype=object))
    outputs = [httpclient.InferRequestedOutput(name) for name in ("keypoints", "num_detections", "boxes")]
    answer = client.infer(POSE, [image], outputs=outputs, parameters={"score_threshold": 0.25, "iou_threshold": 0.7, "max_detections": 300})
    count = int(answer.as_numpy("num_detections")[0])
    points = answer.as_numpy("keypoints")
    assert points.shape == (1, count, 17, 3)
    _, _, v1_points = as_arrays(ours(server, POSE, "astronaut-320.png"))
    np.testing.assert_allclose(points[0], v1_points, atol=1e-5)


def test_torchserve_answer_and_overlay(server):
    answer = requests.post(server.url(f"/predictions/{POSE}"), data=encode(PHOTOS["astronaut-320.png"]), timeout=60).json()
    assert answer and all(set(o) == {"person", "score", "keypoints"} and len(o["keypoints"]) == 51 for o in answer)
    png = requests.post(server.url(f"/v1/models/{POSE}/predict"), params={"render": "png", "max_detections": "3"},
                        data=encode(PHOTOS["astronaut.png"]), timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    assert drawn.shape == (512, 512, 3)
    assert (np.abs(drawn - np.asarray(ASTRONAUT)).sum(axis=2) > 60).mean() > 0.005, "something is drawn"


def test_a_mask_format_is_refused_for_keypoints(server):
    response = requests.post(server.url(f"/v1/models/{POSE}/predict"), params={"mask_format": "rle"},
                             data=encode(PHOTOS["coffee.png"]), timeout=60)
    assert response.status_code == 400 or response.status_code == 422, response.text
    assert "mask_format" in response.text
