"""The default, really pretrained models on real photos (scikit-image's sample data), through
HTTP: the answers a user would check by eye."""
import os
import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data as skdata

from conftest import encode

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
COFFEE_CLASSES = {"espresso", "cup"}


def photo(name):
    if name == "motorcycle_left":
        array = skdata.stereo_motorcycle()[0]
    else:
        array = getattr(skdata, name)()
    image = Image.fromarray(array)
    return image.convert("RGB")


def post(server, model, blob, **params):
    response = requests.post(server.url(f"/v1/models/{model}/predict"), params=params, data=blob,
                             headers={"content-type": "application/octet-stream"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def top1(server, blob):
    return post(server, "mobilenet_v2", blob)["predictions"][0]["label"]


def test_mobilenet_recognises_the_cat_and_the_coffee(default_server):
    assert top1(default_server, encode(photo("chelsea"), "PNG")) in CAT_CLASSES
    assert top1(default_server, encode(photo("coffee"), "PNG")) in COFFEE_CLASSES


@pytest.mark.parametrize("name,expected", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_classification_survives_reencode_resize_and_exif_rotation(default_server, name, expected):
    image = photo(name)
    assert top1(default_server, encode(image, "JPEG", quality=75)) in expected
    half = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)
    assert top1(default_server, encode(half, "PNG")) in expected
    # Stored rotated a quarter turn counter-clockwise, with EXIF orientation 6 telling viewers
    # (and the server) to turn it back clockwise.
    rotated = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert top1(default_server, encode(rotated, "JPEG", quality=90, exif=exif.tobytes())) in expected
    # Without the tag the same pixels are a sideways photo: the tag is what makes it upright.
    sideways = post(default_server, "mobilenet_v2", encode(rotated, "JPEG", quality=90))
    upright = post(default_server, "mobilenet_v2", encode(rotated, "JPEG", quality=90, exif=exif.tobytes()))
    # By more than float noise (a forward's scores vary in the 7th digit between runs): some
    # label of either top 5 moves by over a hundredth.
    def scores(result):
        return {p["label"]: p["score"] for p in result["predictions"]}

    moved = max(abs(scores(sideways).get(label, 0.0) - scores(upright).get(label, 0.0)) for label in scores(sideways).keys() | scores(upright).keys())
    assert moved > 0.01, (sideways["predictions"], upright["predictions"])


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# Boxes recorded from the server and checked by eye against the photos (x1, y1, x2, y2 in
# original pixels); the test requires IoU >= 0.5 against them.
SSD_EXPECTED = {
    "astronaut": ("person", (11, 8, 371, 511)),
    "chelsea": ("cat", (9, 2, 405, 297)),
    "coffee": ("cup", (173, 12, 411, 242)),
    "motorcycle_left": ("motorcycle", (100, 66, 684, 447)),
}


@pytest.mark.parametrize("name", list(SSD_EXPECTED))
def test_ssd_finds_the_object_where_it_is(default_server, name):
    label, recorded = SSD_EXPECTED[name]
    detections = post(default_server, "ssd_mobilenet_v2_coco", encode(photo(name), "PNG"))["detections"]
    matching = [d for d in detections if d["label"] == label]
    assert matching, f"no {label} in {[(d['label'], round(d['score'], 2)) for d in detections]}"
    best = max(matching, key=lambda d: d["score"])
    box = [best["box"][k] for k in ("x1", "y1", "x2", "y2")]
    assert recorded is not None, f"record this box after checking it by eye: {box}"
    assert iou(box, recorded) >= 0.5, f"{label} box {box} vs recorded {recorded}"


def test_text_detector_masks_the_lines_of_the_page(default_server):
    page = photo("page")
    result = post(default_server, "text_detector_ppocr_v4", encode(page, "PNG"))
    assert (result["width"], result["height"]) == page.size
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(result["mask"]["data"]))))
    assert mask.shape == (page.height, page.width)
    text = next(c for c in result["classes"] if c["label"] == "text")
    assert 0.05 <= text["fraction"] <= 0.6, text
    # Rows of the mask line up with rows of ink: the per-row profiles correlate, and most text
    # pixels sit on rows that hold dark ink.
    grey = np.array(page.convert("L")).astype(float)
    ink_rows = (grey < grey.mean() - 2 * grey.std()).mean(1)
    mask_rows = (mask == 1).mean(1)
    correlation = np.corrcoef(ink_rows, mask_rows)[0, 1]
    assert correlation >= 0.5, f"row profiles correlate at {correlation:.2f}"


def test_the_detail_shows_the_shared_pool_as_it_serves_now(default_server):
    detail = requests.get(default_server.url("/v1/models/mobilenet_v2")).json()
    cores = os.cpu_count() or 1
    # Idle between requests: no executor on it, nothing queued; it may use every executor.
    assert detail["executors_now"] == 0 and detail["queued_requests"] == 0
    assert detail["executors_max"] == min(cores, detail["workers"]) >= 1
