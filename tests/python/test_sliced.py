"""Sliced detection (`slice=...`) on the default SSD, against `sahi` 0.12 itself: its tiling
(`get_slice_bboxes`) and its merges (`GreedyNMMPostprocess`, `NMSPostprocess`) on the same
per-tile predictions. Runs in the ultralytics environment, which holds sahi."""
import base64
import io

import pytest
import requests
from PIL import Image
from sahi.postprocess.combine import GreedyNMMPostprocess, NMSPostprocess
from sahi.prediction import ObjectPrediction
from sahi.slicing import get_slice_bboxes
from skimage import data as skdata

from conftest import encode, metric

MODEL = "ssd_mobilenet_v2_coco"
# The boxes test_default_models.py holds the SSD to on the photos at their own size.
OBJECTS = {
    "astronaut": ("person", (11, 8, 371, 511)),
    "chelsea": ("cat", (9, 2, 405, 297)),
    "coffee": ("cup", (173, 12, 411, 242)),
    "motorcycle_left": ("motorcycle", (100, 66, 684, 447)),
}
# The SSD's input is 300 × 300, so `slice=auto` cuts 300² tiles stepping 240 px (0.2 overlap).
TILE, STEP = 300, 240


def photo(name):
    array = skdata.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skdata, name)()
    return Image.fromarray(array).convert("RGB")


def big_picture():
    """2400 × 1600 grey with the four photos shrunk to 230 px on their long side, each placed
    inside one tile: a tenth of the SSD's input once the whole picture is squeezed to 300²."""
    canvas = Image.new("RGB", (2400, 1600), (128, 128, 128))
    expected = []
    for (name, (label, box)), (kx, ky) in zip(OBJECTS.items(), [(1, 1), (5, 2), (2, 4), (7, 5)]):
        image = photo(name)
        scale = 230 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        x, y = kx * STEP + 35, ky * STEP + 35
        canvas.paste(image, (x, y))
        expected.append((label, [box[0] * scale + x, box[1] * scale + y, box[2] * scale + x, box[3] * scale + y]))
    return canvas, expected


def mosaic():
    """1920 × 1080 (the issue's photo size) covered with the four photos at 0.55 of their size,
    laid without regard to the tiles: objects cut by tile edges, for the merges to join."""
    canvas = Image.new("RGB", (1920, 1080), (128, 128, 128))
    images = [photo(name) for name in OBJECTS]
    images = [image.resize((round(image.width * 0.55), round(image.height * 0.55)), Image.BILINEAR) for image in images]
    y, row = 0, 0
    while y < canvas.height:
        x, i = -97 * row, row
        while x < canvas.width:
            image = images[i % len(images)]
            canvas.paste(image, (x, y))
            x, i = x + image.width, i + 1
        y, row = y + 230, row + 1
    return canvas


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def xyxy(detection):
    return [detection["box"][k] for k in ("x1", "y1", "x2", "y2")]


def predict(server, blob, **params):
    response = requests.post(server.url(f"/v1/models/{MODEL}/predict"), params=params, data=blob,
                             headers={"content-type": "application/octet-stream"}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["detections"], response.headers


def found(detections, expected):
    return [label for label, box in expected
            if any(d["label"] == label and iou(xyxy(d), box) >= 0.5 for d in detections)]


def test_slices_find_the_small_objects_the_whole_picture_loses(default_server):
    canvas, expected = big_picture()
    blob = encode(canvas, "PNG")
    whole, _ = predict(default_server, blob)
    assert len(found(whole, expected)) <= 1, [(d["label"], round(d["score"], 2)) for d in whole]
    images_before = metric(default_server, "visionserve_batch_size_sum", f'model="{MODEL}"')
    sliced, headers = predict(default_server, blob, slice="auto")
    assert sorted(found(sliced, expected)) == sorted(label for label, _ in expected), \
        [(d["label"], round(d["score"], 2), [round(v) for v in xyxy(d)]) for d in sliced]
    # One decode, one job: the forward the request ran in held every tile.
    tiles = get_slice_bboxes(canvas.height, canvas.width, TILE, TILE, overlap_height_ratio=0.2, overlap_width_ratio=0.2)
    assert int(headers["x-batch-size"]) >= len(tiles) == 70
    # Each tile went through the model once (in forwards of up to the model's batch bound).
    forwarded = metric(default_server, "visionserve_batch_size_sum", f'model="{MODEL}"') - images_before
    assert forwarded == len(tiles), forwarded
    # With the whole picture merged in, its boxes join the tiles' (and every object stays found).
    with_whole, headers = predict(default_server, blob, slice="auto", full_image="true")
    assert int(headers["x-batch-size"]) >= len(tiles) + 1
    assert sorted(found(with_whole, expected)) == sorted(label for label, _ in expected)


def tile_predictions(server, canvas, threshold):
    """Each of sahi's tiles cut here and sent on its own, its boxes shifted into the picture: the
    predictions sahi's own loop would merge."""
    predictions = []
    for x1, y1, x2, y2 in get_slice_bboxes(canvas.height, canvas.width, TILE, TILE, overlap_height_ratio=0.2, overlap_width_ratio=0.2):
        tile = canvas.crop((x1, y1, x2, y2))
        detections, _ = predict(server, encode(tile, "PNG"), score_threshold=threshold)
        for d in detections:
            box = xyxy(d)
            predictions.append(ObjectPrediction(bbox=[box[0] + x1, box[1] + y1, box[2] + x1, box[3] + y1],
                                                category_id=d["index"], category_name=d["label"], score=d["score"]))
    return predictions


@pytest.mark.parametrize("merge,match,threshold", [("nmm", "ios", 0.5), ("nms", "iou", 0.5), ("nmm", "iou", 0.3)])
def test_the_merge_is_sahis(default_server, merge, match, threshold):
    canvas = mosaic()
    score = 0.05  # low, for many overlapping boxes to merge
    raw = tile_predictions(default_server, canvas, score)
    assert len(raw) >= 150, len(raw)
    postprocess = (GreedyNMMPostprocess if merge == "nmm" else NMSPostprocess)(
        match_threshold=threshold, match_metric=match.upper(), class_agnostic=False)
    # A copy: sahi's merge writes the merged boxes back into the list it is given.
    reference = [(p.category.id, p.bbox.to_xyxy()) for p in postprocess(list(raw))]
    served, _ = predict(default_server, encode(canvas, "PNG"), slice="auto", score_threshold=score, merge=merge,
                        match=match, match_threshold=threshold, max_detections=10000)
    served = [(d["index"], xyxy(d)) for d in served]
    assert len(reference) < len(raw), "nothing was merged: the test would not tell merges apart"

    def matched(ours, theirs):
        return sum(any(c == k and iou(box, other) >= 0.9 for k, other in theirs) for c, box in ours)

    # Each way round: the tiles' forwards ran batched on the server and one by one here, so a
    # box near a threshold may fall either side; 99 % must match.
    assert matched(served, reference) >= 0.99 * len(served), (len(served), len(reference), matched(served, reference))
    assert matched(reference, served) >= 0.99 * len(reference), (len(served), len(reference), matched(reference, served))


def test_v2_slices_with_the_same_parameters(default_server):
    canvas, expected = big_picture()
    blob = encode(canvas, "PNG")
    v1, _ = predict(default_server, blob, slice="auto")
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(blob).decode()]}],
            "parameters": {"slice": "auto", "binary_data_output": False}}
    response = requests.post(default_server.url(f"/v2/models/{MODEL}/infer"), json=body, timeout=300)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["num_detections"]["data"] == [len(v1)]
    boxes = outputs["boxes"]["data"]
    for i, d in enumerate(v1):
        assert iou(boxes[4 * i:4 * i + 4], xyxy(d)) > 0.99


@pytest.mark.parametrize("model,params,status,words", [
    (MODEL, {"slice": "7"}, 422, "parameter 'slice'"),
    (MODEL, {"slice": "auto", "overlap": "0.95"}, 422, "parameter 'overlap'"),
    (MODEL, {"slice": "auto", "merge": "wbf"}, 422, "parameter 'merge'"),
    (MODEL, {"overlap": "0.3"}, 422, "applies only with 'slice'"),
    (MODEL, {"slice": "32", "overlap": "0.9"}, 400, "tiles"),  # 2400 × 1600 in steps of 4 px
    ("mobilenet_v2", {"slice": "auto"}, 422, "does not apply"),
])
def test_bad_slicing_is_a_clear_client_error(default_server, model, params, status, words):
    canvas, _ = big_picture()
    response = requests.post(default_server.url(f"/v1/models/{model}/predict"), params=params, data=encode(canvas, "JPEG"),
                             headers={"content-type": "application/octet-stream"}, timeout=120)
    assert response.status_code == status, response.text
    assert words in response.text, response.text


@pytest.fixture(scope="module")
def sliced_pipeline(tmp_path_factory):
    """The default detector and classifier, and a pipeline that slices before it classifies."""
    import os

    from conftest import Server
    models = os.environ["VISIONSERVE_DEFAULT_MODELS"]
    repository = tmp_path_factory.mktemp("sliced-pipeline")
    for name in (MODEL, "mobilenet_v2"):
        (repository / name).symlink_to(os.path.join(models, name), target_is_directory=True)
    (repository / "sliced_detect_then_classify").mkdir()
    (repository / "sliced_detect_then_classify" / "pipeline.toml").write_text(
        f'[detect]\nmodel = "{MODEL}"\nslice = "auto"\nclasses = ["cat", "cup"]\n[classify]\nmodel = "mobilenet_v2"\n')
    server = Server(str(repository))
    yield server
    server.stop()


def test_a_pipeline_slices_then_classifies_the_crops(sliced_pipeline):
    canvas, expected = big_picture()
    response = requests.post(sliced_pipeline.url("/v1/models/sliced_detect_then_classify/predict"), data=encode(canvas, "PNG"),
                             headers={"content-type": "application/octet-stream"}, timeout=300)
    assert response.status_code == 200, response.text
    detections = response.json()["results"][0]["detections"]
    assert sorted(found(detections, expected)) == ["cat", "cup"], detections
    # The classifier saw each crop at the photo's full resolution: the cat is a cat to ImageNet.
    cat = next(d for d in detections if d["label"] == "cat")
    top = [p["label"] for p in cat["classification"]["predictions"]]
    assert {"Egyptian cat", "tabby", "tiger cat"} & set(top[:3]), top
    assert int(response.headers["x-step1-batch-size"]) >= 70
