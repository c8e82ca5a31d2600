"""TorchServe's inference API, called the way TorchServe's documentation shows
(`curl -T kitten.jpg`, `requests.post(url, data=...)`, multipart field `data`), against the
default models."""
import base64
import io

import requests
from PIL import Image

from test_default_models import CAT_CLASSES, photo
from conftest import encode


def test_ping_says_healthy(default_server):
    response = requests.get(default_server.url("/ping"))
    assert response.status_code == 200
    assert response.json() == {"status": "Healthy"}


def test_classifier_answers_label_probabilities_top5(default_server):
    image = encode(photo("chelsea"), "JPEG")
    # requests.post(url, data=open("kitten.jpg", "rb")), as in TorchServe's examples.
    answer = requests.post(default_server.url("/predictions/mobilenet_v2"), data=image).json()
    assert isinstance(answer, dict) and len(answer) == 5
    labels = list(answer)
    assert labels[0] in CAT_CLASSES
    scores = list(answer.values())
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    # The same through multipart field "data", a versioned URL, and base64 text.
    multipart = requests.post(default_server.url("/predictions/mobilenet_v2/1.0"), files={"data": ("kitten.jpg", image)}).json()
    assert list(multipart) == labels
    text = requests.post(default_server.url("/predictions/mobilenet_v2"), data=base64.b64encode(image),
                         headers={"content-type": "text/plain"}).json()
    assert list(text) == labels
    # `curl -T kitten.jpg URL` sends a PUT.
    put = requests.put(default_server.url("/predictions/mobilenet_v2"), data=image).json()
    assert list(put) == labels


def test_detector_answers_label_box_score_objects(default_server):
    answer = requests.post(default_server.url("/predictions/ssd_mobilenet_v2_coco"), data=encode(photo("coffee"), "PNG")).json()
    assert isinstance(answer, list) and answer
    for detection in answer:
        assert set(detection) - {"score"} and detection["score"] >= 0.5
        (label, box), = [(k, v) for k, v in detection.items() if k != "score"]
        assert len(box) == 4 and box[0] <= box[2] and box[1] <= box[3]
    assert any("cup" in d for d in answer)


def test_segmenter_answers_class_and_probability_per_pixel(default_server):
    page = photo("page")
    answer = requests.post(default_server.url("/predictions/text_detector_ppocr_v4"), data=encode(page, "PNG")).json()
    assert len(answer) == page.height and len(answer[0]) == page.width
    classes = {pixel[0] for row in answer for pixel in row}
    assert classes == {0, 1}
    assert all(0.0 <= pixel[1] <= 1.0 for row in answer for pixel in row)
    # The probability is that of the pixel's own class: text where p >= 0.3 (the model's
    # threshold), background where p < 0.3, whose own probability 1 - p is then above 0.7.
    assert all(pixel[1] >= 0.3 - 1e-6 for row in answer for pixel in row if pixel[0] == 1)
    assert all(pixel[1] > 0.7 - 1e-6 for row in answer for pixel in row if pixel[0] == 0)


def test_unknown_model_and_bad_version_are_404(default_server):
    assert requests.post(default_server.url("/predictions/nope"), data=b"x").status_code == 404
    assert requests.post(default_server.url("/predictions/mobilenet_v2/7.0"), data=b"x").status_code == 404
