"""The Open Inference Protocol (V2) REST endpoints through an unmodified real client:
tritonclient[http] from PyPI, with JSON tensors and with the binary tensor data extension."""
import base64

import numpy as np
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from PIL import Image

from conftest import encode
from test_default_models import CAT_CLASSES, photo


def client_for(server):
    return httpclient.InferenceServerClient(url=server.base.removeprefix("http://"))


def test_readiness_and_metadata(default_server):
    client = client_for(default_server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mobilenet_v2")
    assert not client.is_model_ready("mobilenet_v2", model_version="9")
    meta = client.get_model_metadata("mobilenet_v2")
    # Pixels at the model's input size (what Triton's image clients send); BYTES is the
    # recommended input, listed with the others it accepts.
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["scores"]
    assert meta["parameters"]["also_accepts"][0]["datatype"] == "BYTES"
    extensions = client.get_server_metadata()["extensions"]
    assert "classification" in extensions and "binary_tensor_data" in extensions


def v1_top(server, image_bytes):
    return requests.post(server.url("/v1/models/mobilenet_v2/predict"), data=image_bytes).json()["results"][0]["predictions"]


def test_bytes_image_input_matches_v1_and_classification_extension(default_server):
    client = client_for(default_server)
    image = encode(photo("chelsea"), "JPEG")
    expected = v1_top(default_server, image)
    image_input = httpclient.InferInput("image", [1], "BYTES")
    image_input.set_data_from_numpy(np.array([base64.b64encode(image).decode()], dtype=object), binary_data=False)
    result = client.infer("mobilenet_v2", [image_input],
                          outputs=[httpclient.InferRequestedOutput("scores", binary_data=False)])
    scores = result.as_numpy("scores")
    assert scores.shape == (1, 1000)
    assert int(scores[0].argmax()) == expected[0]["index"]
    assert abs(float(scores[0].max()) - expected[0]["score"]) < 1e-5

    result = client.infer("mobilenet_v2", [image_input],
                          outputs=[httpclient.InferRequestedOutput("scores", binary_data=False, class_count=3)])
    top = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("scores")[0]]
    score, index, label = top[0].split(":", 2)
    assert int(index) == expected[0]["index"] and label in CAT_CLASSES


def test_uint8_pixels_and_fp32_tensors(default_server):
    client = client_for(default_server)
    picture = photo("coffee")
    expected = v1_top(default_server, encode(picture, "PNG"))
    pixels = httpclient.InferInput("pixels", [1, picture.height, picture.width, 3], "UINT8")
    pixels.set_data_from_numpy(np.asarray(picture, dtype=np.uint8)[None], binary_data=False)
    scores = client.infer("mobilenet_v2", [pixels]).as_numpy("scores")
    assert int(scores[0].argmax()) == expected[0]["index"]

    # A preprocessed tensor goes straight to the model: here, the detector's 300×300 0..255 input.
    resized = np.asarray(picture.resize((300, 300), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)[None]
    tensor = httpclient.InferInput("input", list(resized.shape), "FP32")
    tensor.set_data_from_numpy(resized, binary_data=False)
    result = client.infer("ssd_mobilenet_v2_coco", [tensor])
    count = int(result.as_numpy("num_detections")[0])
    classes = result.as_numpy("classes")[0][:count].tolist()
    assert 47 in classes  # COCO's "cup"


def test_binary_tensor_extension_matches_json(default_server):
    client = client_for(default_server)
    image = encode(photo("chelsea"), "JPEG")
    expected = v1_top(default_server, image)
    # Raw encoded bytes, no base64: the binary BYTES layout (length-prefixed elements).
    raw = httpclient.InferInput("image", [1], "BYTES")
    raw.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    result = client.infer("mobilenet_v2", [raw], outputs=[httpclient.InferRequestedOutput("scores", binary_data=True)])
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (1, 1000)
    assert int(scores[0].argmax()) == expected[0]["index"]
    assert abs(float(scores[0].max()) - expected[0]["score"]) < 1e-5
    assert result.get_output("scores")["parameters"]["binary_data_size"] == 4000

    result = client.infer("mobilenet_v2", [raw],
                          outputs=[httpclient.InferRequestedOutput("scores", binary_data=True, class_count=2)])
    top = result.as_numpy("scores")[0]
    assert len(top) == 2 and int(top[0].decode().split(":")[1]) == expected[0]["index"]

    # Raw pixels in binary, every detector output back in binary, equal to the JSON answer.
    picture = np.asarray(photo("coffee"), dtype=np.uint8)[None]
    answers = []
    for binary in (False, True):
        pixels = httpclient.InferInput("pixels", list(picture.shape), "UINT8")
        pixels.set_data_from_numpy(picture, binary_data=binary)
        names = ["boxes", "scores", "classes", "num_detections"]
        result = client.infer("ssd_mobilenet_v2_coco", [pixels],
                              outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in names])
        answers.append({n: result.as_numpy(n) for n in names})
    json_answer, binary_answer = answers
    assert int(binary_answer["num_detections"][0]) == int(json_answer["num_detections"][0]) > 0
    assert binary_answer["classes"].dtype == np.int64 and binary_answer["num_detections"].dtype == np.int32
    np.testing.assert_array_equal(binary_answer["classes"], json_answer["classes"])
    np.testing.assert_allclose(binary_answer["boxes"], json_answer["boxes"], atol=1e-3)


def test_binary_requests_that_do_not_add_up_are_400(default_server):
    head = b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 100}}]}'
    response = requests.post(default_server.url("/v2/models/mobilenet_v2/infer"), data=head + b"\x05\x00",
                             headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 400 and "ends first" in response.json()["error"]
    response = requests.post(default_server.url("/v2/models/mobilenet_v2/infer"), data=head,
                             headers={"Inference-Header-Content-Length": "9999"})
    assert response.status_code == 400 and "error" in response.json()


def test_raw_model_outputs_on_request(default_server):
    client = client_for(default_server)
    meta = client.get_model_metadata("mobilenet_v2")
    raw_specs = {o["name"]: o for o in meta["parameters"]["raw_outputs"]}
    assert raw_specs["raw_output"] == {"name": "raw_output", "datatype": "FP32", "shape": [-1, 1000]}
    image = encode(photo("chelsea"), "JPEG")
    raw = httpclient.InferInput("image", [1], "BYTES")
    raw.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    result = client.infer("mobilenet_v2", [raw], outputs=[httpclient.InferRequestedOutput("raw_output", binary_data=True),
                                                          httpclient.InferRequestedOutput("scores", binary_data=True)])
    logits, scores = result.as_numpy("raw_output"), result.as_numpy("scores")
    assert logits.shape == (1, 1000) and logits.dtype == np.float32
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(softmax, scores, atol=1e-5)
    # A two-tensor model: the SSD's raw boxes and class scores, named by position.
    meta = client.get_model_metadata("ssd_mobilenet_v2_coco")
    names = [o["name"] for o in meta["parameters"]["raw_outputs"]]
    assert names == ["raw_output_0", "raw_output_1"]
    pixels = httpclient.InferInput("pixels", [1, 120, 160, 3], "UINT8")
    pixels.set_data_from_numpy(np.asarray(photo("coffee").resize((160, 120)), dtype=np.uint8)[None], binary_data=True)
    result = client.infer("ssd_mobilenet_v2_coco", [pixels], outputs=[httpclient.InferRequestedOutput(n) for n in names])
    assert result.as_numpy("raw_output_0").shape[:2] == result.as_numpy("raw_output_1").shape[:2] == (1, 1917)


def bytes_image(picture, binary):
    image_input = httpclient.InferInput("image", [1], "BYTES")
    image_input.set_data_from_numpy(np.array([encode(picture, "JPEG")], dtype=object), binary_data=binary)
    return image_input


def test_model_configuration_statistics_and_gzip_both_ways(default_server):
    client = client_for(default_server)
    config = client.get_model_config("mobilenet_v2")
    assert config["name"] == "mobilenet_v2" and config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [224, 224, 3], "format": "FORMAT_NHWC"}]
    assert config["output"][0]["name"] == "scores" and config["output"][0]["dims"] == [1000]
    assert config["dynamic_batching"]["preferred_batch_size"][0] >= 1
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert "model_configuration" in client.get_server_metadata()["extensions"]

    def counted():
        rows = client.get_inference_statistics("mobilenet_v2")["model_stats"]  # every version
        return (sum(r["inference_stats"]["success"]["count"] for r in rows), sum(r["inference_count"] for r in rows))

    before = counted()
    image_input = bytes_image(photo("chelsea"), binary=True)
    plain = client.infer("mobilenet_v2", [image_input]).as_numpy("scores")
    for algorithm in ("gzip", "deflate"):
        result = client.infer("mobilenet_v2", [image_input],
                              request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
        # The same forward up to float noise (a forward's result varies in the 7th digit with
        # the batch it ran in).
        np.testing.assert_allclose(result.as_numpy("scores"), plain, rtol=1e-4, atol=1e-6)
    after = counted()
    assert after[0] >= before[0] + 3 and after[1] >= before[1] + 3, (before, after)
    names = {row["name"] for row in client.get_inference_statistics()["model_stats"]}
    assert {"mobilenet_v2", "ssd_mobilenet_v2_coco"} <= names

    # The answer really is compressed when asked for, and plain when not.
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(encode(photo("chelsea"), "JPEG")).decode()]}]}
    url = default_server.url("/v2/models/mobilenet_v2/infer")
    assert requests.post(url, json=body, headers={"Accept-Encoding": "gzip"}).headers.get("Content-Encoding") == "gzip"
    assert "Content-Encoding" not in requests.post(url, json=body, headers={"Accept-Encoding": "identity"}).headers


def test_every_v2_error_reaches_tritonclient_as_a_message(default_server):
    """tritonclient formats `error` as a string; the service's own error object made it raise
    TypeError instead of InferenceServerException."""
    client = client_for(default_server)
    for call, expected in [
        (lambda: client.get_model_repository_index(), "--admin-token"),  # 403: management is off
        (lambda: client.load_model("mobilenet_v2"), "--admin-token"),
        (lambda: client.get_model_config("no_such_model"), "no_such_model"),
        (lambda: client.get_inference_statistics("no_such_model"), "no_such_model"),
    ]:
        try:
            call()
        except InferenceServerException as error:
            assert expected in error.message(), error.message()
        else:
            raise AssertionError("no error")
    unknown = requests.get(default_server.url("/v2/no/such/route"))
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
