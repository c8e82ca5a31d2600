"""The response cache (--response-cache-bytes): hits are byte-identical to misses on every
protocol, parameters and reloads miss, errors are never cached, the byte budget holds."""
import io
import os

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from PIL import Image

from conftest import Server, encode, metric

ADMIN = "cache-admin-token-0123456789"


def picture(seed, size=(96, 72)):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture(scope="module")
def cached_server():
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"],
                    extra_args=["--models", "resnet18,yolo_tiny,tiny_text_map", "--response-cache-bytes", "4000000",
                                "--admin-token", ADMIN])
    yield server
    server.stop()



def twice(send):
    first, second = send(), send()
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.content == second.content, "a hit must answer byte for byte what the miss did"
    return first, second


def test_hits_are_byte_identical_on_every_protocol(cached_server):
    image = picture(1)
    for model in ("resnet18", "yolo_tiny", "tiny_text_map"):
        _, hit = twice(lambda: requests.post(cached_server.url(f"/v1/models/{model}/predict"), data=image))
        assert "x-inference-time-ms" not in hit.headers, "nothing ran for a hit"
    twice(lambda: requests.post(cached_server.url("/predictions/resnet18"), data=picture(2)))
    # The overlay is cached apart from JSON: its first request misses although the JSON is cached.
    _, png = twice(lambda: requests.post(cached_server.url("/v1/models/yolo_tiny/predict?render=png"), data=image))
    assert Image.open(io.BytesIO(png.content)).size == (96, 72)
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [__import__("base64").b64encode(picture(3)).decode()]}]}
    twice(lambda: requests.post(cached_server.url("/v2/models/resnet18/infer"), json=body))
    # gRPC goes through the same path; the outcome comes back as metadata.
    client = grpcclient.InferenceServerClient(cached_server.grpc)
    element = grpcclient.InferInput("image", [1], "BYTES")
    element.set_data_from_numpy(np.array([picture(4)], dtype=np.object_))
    answers = [client.infer("resnet18", [element]) for _ in range(2)]
    np.testing.assert_array_equal(answers[0].as_numpy("scores"), answers[1].as_numpy("scores"))
    hits = metric(cached_server, "visionserve_response_cache_hits_total")
    client.infer("resnet18", [element])
    assert metric(cached_server, "visionserve_response_cache_hits_total") == hits + 1


def test_parameters_miss_and_images_hit_one_by_one(cached_server):
    image, other = picture(10), picture(11)
    url = cached_server.url("/v1/models/resnet18/predict")
    assert requests.post(url, data=image).headers["x-cache"] == "miss"
    assert requests.post(url, data=image, params={"top_k": 3}).headers["x-cache"] == "miss"
    assert requests.post(url, data=image, params={"top_k": 3}).headers["x-cache"] == "hit"
    assert requests.post(url, data=other).headers["x-cache"] == "miss"
    # Both images cached one by one: a request with both of them hits.
    files = [("image", ("a.jpg", image, "image/jpeg")), ("image", ("b.jpg", other, "image/jpeg"))]
    both = requests.post(url, files=files)
    assert both.status_code == 200 and both.headers["x-cache"] == "hit" and len(both.json()["results"]) == 2


def test_errors_are_never_cached_and_a_reload_invalidates(cached_server):
    url = cached_server.url("/v1/models/resnet18/predict")
    for _ in range(2):
        bad = requests.post(url, data=b"not an image")
        assert bad.status_code == 400 and "x-cache" not in bad.headers
    image = picture(20)
    assert requests.post(url, data=image).headers["x-cache"] == "miss"
    assert requests.post(url, data=image).headers["x-cache"] == "hit"
    token = {"Authorization": f"Bearer {ADMIN}"}
    assert requests.post(cached_server.url("/v2/repository/models/resnet18/load"), headers=token).status_code == 200
    assert requests.post(url, data=image).headers["x-cache"] == "miss", "a reloaded model must not answer from before"
    assert requests.post(url, data=image).headers["x-cache"] == "hit"


def test_the_byte_budget_holds_under_distinct_images():
    budget = 60_000
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"],
                    extra_args=["--models", "resnet18", "--response-cache-bytes", str(budget)])
    try:
        url = server.url("/v1/models/resnet18/predict")
        for seed in range(100, 160):
            assert requests.post(url, data=picture(seed, (32, 32))).status_code == 200
            assert metric(server, "visionserve_response_cache_bytes") <= budget
        assert metric(server, "visionserve_response_cache_evictions_total") > 0
        assert metric(server, "visionserve_response_cache_misses_total") == 60
        assert 0 < metric(server, "visionserve_response_cache_bytes") <= budget
    finally:
        server.stop()
