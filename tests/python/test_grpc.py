"""The Open Inference Protocol over gRPC through unmodified real clients: tritonclient[grpc]
for every RPC, grpcio-health-checking for the health service, grpcio-reflection for server
reflection. Answers are compared with REST V2's for the same images."""
import os
import pathlib
import queue
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import Server, encode, metric
from test_default_models import CAT_CLASSES, photo

ROOT = pathlib.Path(__file__).resolve().parents[2]
API_KEY = "grpc-test-key-0123456789"
ADMIN_TOKEN = "grpc-admin-token-0123456789"
DETECTOR_OUTPUTS = ["boxes", "scores", "classes", "num_detections"]


def client_for(server):
    assert server.grpc, "the server did not report a gRPC address"
    return grpcclient.InferenceServerClient(url=server.grpc)


def bytes_input(*images):
    image = grpcclient.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return image


def code_of(error):
    """The gRPC status name tritonclient reports, e.g. 'StatusCode.NOT_FOUND'."""
    return error.status()


@pytest.fixture(scope="module")
def managed_server():
    """Test models behind an API key, with the management API on."""
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"],
                    extra_args=["--models", "resnet18,yolo_tiny", "--api-keys", API_KEY, "--admin-token", ADMIN_TOKEN])
    yield server
    server.stop()


def test_the_proto_matches_tritonclients_descriptors_field_by_field(default_server):
    """Our proto file, as the server's reflection serves it, against the descriptors tritonclient
    ships: every message we define and every RPC we serve has the same names, numbers and types."""
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(default_server.grpc))
    ours = database.FindFileContainingSymbol("inference.GRPCInferenceService")
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)

    def fields(message):
        shape = {f.number: (f.name, f.type, f.label, f.type_name, f.HasField("oneof_index")) for f in message.field}
        nested = {n.name: fields(n) for n in message.nested_type}
        return shape, nested

    their_messages = {m.name: m for m in theirs.message_type}
    assert len(ours.message_type) >= 20
    for message in ours.message_type:
        assert message.name in their_messages, message.name
        assert fields(message) == fields(their_messages[message.name]), message.name
    their_methods = {m.name: m for m in theirs.service[0].method}
    for method in ours.service[0].method:
        theirs_method = their_methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            theirs_method.input_type, theirs_method.output_type, theirs_method.client_streaming, theirs_method.server_streaming)


def test_our_model_config_proto_is_a_subset_of_tritons(default_server):
    """`proto/model_config.proto` writes only the part of Triton's ModelConfig we fill in: every
    message, field and enum value it has must be Triton's, with the same number and type."""
    from tritonclient.grpc import model_config_pb2
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(default_server.grpc))
    ours = database.FindFileByName("model_config.proto")
    theirs = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(theirs)

    def check(our_message, their_message):
        their_fields = {f.number: f for f in their_message.field}
        for field in our_message.field:
            other = their_fields[field.number]
            assert (field.name, field.type, field.label, field.type_name) == (other.name, other.type, other.label, other.type_name), field.name
        their_nested = {n.name: n for n in their_message.nested_type}
        for nested in our_message.nested_type:
            check(nested, their_nested[nested.name])
        their_enums = {e.name: {v.name: v.number for v in e.value} for e in their_message.enum_type}
        for enum in our_message.enum_type:
            assert {v.name: v.number for v in enum.value}.items() <= their_enums[enum.name].items(), enum.name

    their_messages = {m.name: m for m in theirs.message_type}
    assert {m.name for m in ours.message_type} >= {"ModelConfig", "ModelInput", "ModelOutput"}
    for message in ours.message_type:
        check(message, their_messages[message.name])
    their_enums = {e.name: {v.name: v.number for v in e.value} for e in theirs.enum_type}
    for enum in ours.enum_type:
        assert {v.name: v.number for v in enum.value} == their_enums[enum.name], enum.name


def test_model_config_statistics_and_gzip(default_server):
    client = client_for(default_server)
    config = client.get_model_config("mobilenet_v2").config
    rest = requests.get(default_server.url("/v2/models/mobilenet_v2/config")).json()
    assert config.name == rest["name"] and config.max_batch_size == rest["max_batch_size"]
    assert [(i.name, list(i.dims)) for i in config.input] == [(i["name"], i["dims"]) for i in rest["input"]]
    assert config.input[0].data_type == model_config_type("TYPE_UINT8")
    assert config.input[0].format == model_config_pb2_format("FORMAT_NHWC")
    assert [o.name for o in config.output] == [o["name"] for o in rest["output"]]
    assert config.instance_group[0].count == rest["instance_group"][0]["count"]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    as_json = client.get_model_config("mobilenet_v2", as_json=True)["config"]
    assert as_json["output"][0]["data_type"] == "TYPE_FP32"

    def successes():
        return sum(s.inference_stats.success.count for s in client.get_inference_statistics("mobilenet_v2").model_stats)

    before = successes()
    image = bytes_input(encode(photo("chelsea"), "JPEG"))
    plain = client.infer("mobilenet_v2", [image]).as_numpy("scores")
    compressed = client.infer("mobilenet_v2", [image], compression_algorithm="gzip").as_numpy("scores")
    np.testing.assert_allclose(plain, compressed, rtol=1e-4, atol=1e-6)
    assert successes() >= before + 2
    every = client.get_inference_statistics().model_stats
    assert {"mobilenet_v2", "ssd_mobilenet_v2_coco", "detect_then_classify"} <= {s.name for s in every}
    # Per batch size and the host memory, the same figures as REST's (read after it, so at least).
    served = [s for s in client.get_inference_statistics("mobilenet_v2").model_stats if s.execution_count > 0]
    assert served, "a version of mobilenet_v2 ran the requests above"
    rest_rows = {r["version"]: r for r in requests.get(default_server.url("/v2/models/mobilenet_v2/stats")).json()["model_stats"]}
    for row in served:
        assert sum(b.compute_infer.count for b in row.batch_stats) == row.execution_count
        assert all(b.batch_size >= 1 and b.compute_infer.ns > 0 for b in row.batch_stats)
        assert [(m.type, m.byte_size) for m in row.memory_usage] == [
            (m["type"], m["byte_size"]) for m in rest_rows[row.version]["memory_usage"]]
        assert row.memory_usage[0].byte_size > 1_000_000
    with pytest.raises(InferenceServerException) as error:
        client.get_model_config("no_such_model")
    assert code_of(error.value) == "StatusCode.NOT_FOUND"


def model_config_type(name):
    from tritonclient.grpc import model_config_pb2
    return model_config_pb2.DataType.Value(name)


def model_config_pb2_format(name):
    from tritonclient.grpc import model_config_pb2
    return model_config_pb2.ModelInput.Format.Value(name)


def test_health_service_and_reflection(default_server):
    channel = grpc.insecure_channel(default_server.grpc)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ["", "live", "inference.GRPCInferenceService"]:
        # The health service follows the readiness rule every 200 ms: allow it a moment.
        deadline = time.time() + 3
        while health.Check(health_pb2.HealthCheckRequest(service=service)).status != serving:
            assert time.time() < deadline, service
            time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_readiness_and_metadata(default_server):
    client = client_for(default_server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mobilenet_v2")
    assert not client.is_model_ready("mobilenet_v2", model_version="9")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("ssd_mobilenet_v2_coco")
    assert meta.inputs[0].name == "image" and meta.inputs[0].datatype == "UINT8"
    assert [o.name for o in meta.outputs][:4] == DETECTOR_OUTPUTS
    assert set(meta.versions) == {"1", "2", "3"}  # 3: its BF16 version, installed or not
    assert "classification" in client.get_server_metadata().extensions
    rest = requests.get(default_server.url("/v2/models/ssd_mobilenet_v2_coco")).json()
    assert [o.name for o in meta.outputs] == [o["name"] for o in rest["outputs"]]
    assert meta.platform == rest["platform"]


def rest_answer(server, model, image, outputs):
    client = httpclient.InferenceServerClient(url=server.base.removeprefix("http://"))
    raw = httpclient.InferInput("image", [1], "BYTES")
    raw.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    result = client.infer(model, [raw], outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


@pytest.mark.parametrize("model,outputs,picture", [
    ("mobilenet_v2", ["scores"], "chelsea"),
    ("ssd_mobilenet_v2_coco", DETECTOR_OUTPUTS, "coffee"),
    ("ssd_mobilenet_v2_coco", DETECTOR_OUTPUTS, "astronaut"),
    ("text_detector_ppocr_v4", ["mask"], "page"),
    ("mobilenet_v2_embedding", ["embedding"], "chelsea"),
])
def test_grpc_answers_equal_rest_v2(default_server, model, outputs, picture):
    image = (ROOT / "assets/samples/page.png").read_bytes() if picture == "page" else encode(photo(picture), "JPEG")
    client = client_for(default_server)
    result = client.infer(model, [bytes_input(image)], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    rest = rest_answer(default_server, model, image, outputs)
    for name in outputs:
        ours = result.as_numpy(name)
        assert ours.dtype == rest[name].dtype and ours.shape == rest[name].shape, name
        if ours.dtype == np.float32:
            # Equal up to the float noise of running in another batch.
            np.testing.assert_allclose(ours, rest[name], rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(ours, rest[name], err_msg=name)
    if model == "ssd_mobilenet_v2_coco":
        assert int(result.as_numpy("num_detections")[0]) > 0
        assert result.as_numpy("classes").dtype == np.int64 and result.as_numpy("num_detections").dtype == np.int32


def test_all_outputs_when_none_named_and_the_timing_metadata(default_server):
    client = client_for(default_server)
    result = client.infer("ssd_mobilenet_v2_coco", [bytes_input(encode(photo("coffee"), "JPEG"))])
    names = [o.name for o in result.get_response().outputs]
    assert names == DETECTOR_OUTPUTS
    classes = result.as_numpy("classes")[0][: int(result.as_numpy("num_detections")[0])].tolist()
    assert 47 in classes  # COCO's "cup"
    # The per-stage times REST puts in headers come as initial metadata.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(default_server.grpc))
    request = service_pb2.ModelInferRequest(model_name="mobilenet_v2", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])])
    request.raw_input_contents.append(len(img := encode(photo("chelsea"), "JPEG")).to_bytes(4, "little") + img)
    _, call = stub.ModelInfer.with_call(request)
    metadata = dict(call.initial_metadata())
    assert float(metadata["x-inference-time-ms"]) > 0 and int(metadata["x-batch-size"]) >= 1


def test_typed_contents_bytes_and_uint8_pixels(default_server):
    """BYTES in contents.bytes_contents and UINT8 in contents.uint_contents, as clients that do
    not use the raw layout send them, answer as the raw layout does."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(default_server.grpc))
    image = encode(photo("chelsea"), "JPEG")
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(image)
    answer = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="mobilenet_v2", inputs=[tensor], id="typed"))
    assert answer.id == "typed" and answer.outputs[0].name == "scores"
    typed = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
    raw = client_for(default_server).infer("mobilenet_v2", [bytes_input(image)]).as_numpy("scores")[0]
    # Equal up to the float noise of running in another batch.
    np.testing.assert_allclose(typed, raw, rtol=1e-4, atol=1e-6)

    small = np.asarray(photo("coffee").resize((64, 48)), dtype=np.uint8)
    pixels = service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 48, 64, 3])
    pixels.contents.uint_contents.extend(small.flatten().tolist())
    typed = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="mobilenet_v2", inputs=[pixels]))
    raw_pixels = grpcclient.InferInput("pixels", [1, 48, 64, 3], "UINT8")
    raw_pixels.set_data_from_numpy(small[None])
    raw = client_for(default_server).infer("mobilenet_v2", [raw_pixels]).as_numpy("scores")[0]
    np.testing.assert_allclose(np.frombuffer(typed.raw_output_contents[0], dtype=np.float32), raw, rtol=1e-4, atol=1e-6)


def test_uint8_pixels_fp32_tensors_and_the_classification_extension(default_server):
    client = client_for(default_server)
    picture = photo("chelsea")
    pixels = grpcclient.InferInput("pixels", [1, picture.height, picture.width, 3], "UINT8")
    pixels.set_data_from_numpy(np.asarray(picture, dtype=np.uint8)[None])
    result = client.infer("mobilenet_v2", [pixels], outputs=[grpcclient.InferRequestedOutput("scores", class_count=3)])
    top = [s.decode() for s in result.as_numpy("scores")[0]]
    assert len(top) == 3
    score, index, label = top[0].split(":", 2)
    assert label in CAT_CLASSES and 0 < float(score) <= 1
    rest = requests.post(default_server.url("/v1/models/mobilenet_v2/predict"), data=encode(picture, "PNG")).json()
    assert int(index) == rest["results"][0]["predictions"][0]["index"]

    resized = np.asarray(photo("coffee").resize((300, 300), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)[None]
    tensor = grpcclient.InferInput("input", list(resized.shape), "FP32")
    tensor.set_data_from_numpy(resized)
    result = client.infer("ssd_mobilenet_v2_coco", [tensor])
    assert 47 in result.as_numpy("classes")[0][: int(result.as_numpy("num_detections")[0])].tolist()


def test_a_30_frame_stream_is_answered_in_order_with_its_ids(default_server):
    client = client_for(default_server)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    frames = [encode(photo(name).resize((160, 120)), "JPEG") for name in ["chelsea", "coffee", "astronaut"]]
    try:
        for i in range(30):
            # Frame 13 is not an image: its error comes in its own answer and the stream goes on.
            image = b"not an image" if i == 13 else frames[i % 3]
            client.async_stream_infer("mobilenet_v2", [bytes_input(image)], request_id=f"frame-{i}",
                                      outputs=[grpcclient.InferRequestedOutput("scores", class_count=1)])
    finally:
        client.stop_stream()
    received = [answers.get(timeout=60) for _ in range(30)]
    assert answers.empty()
    for i, (result, error) in enumerate(received):
        if i == 13:
            assert result is None and "image" in str(error)
            continue
        assert error is None, (i, error)
        assert result.get_response().id == f"frame-{i}"
    labels = [received[i][0].as_numpy("scores")[0][0].decode().split(":", 2)[2] for i in (0, 3, 6)]
    assert all(label in CAT_CLASSES for label in labels)


def noise_png(megabytes):
    side = int((megabytes * 1024 * 1024 / 3) ** 0.5)
    pixels = np.random.default_rng(7).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", compress_level=0)


def test_a_12_mb_message_is_served_and_one_over_the_limit_is_resource_exhausted(default_server):
    client = client_for(default_server)
    big = noise_png(12)
    assert 12 * 1024 * 1024 <= len(big) < 20 * 1024 * 1024
    result = client.infer("mobilenet_v2", [bytes_input(big)], outputs=[grpcclient.InferRequestedOutput("scores")])
    assert result.as_numpy("scores").shape == (1, 1000)
    with pytest.raises(InferenceServerException) as over:
        client.infer("mobilenet_v2", [bytes_input(b"\xff" * (21 * 1024 * 1024))])
    assert code_of(over.value) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "limit" in over.value.message()
    assert client.is_server_ready(), "the refusal left the server serving"


def test_each_error_has_its_code(default_server):
    client = client_for(default_server)
    image = encode(photo("chelsea"), "JPEG")
    cases = [
        (lambda: client.infer("no_such_model", [bytes_input(image)]), "StatusCode.NOT_FOUND", "no_such_model"),
        (lambda: client.infer("mobilenet_v2", [bytes_input(image)], model_version="9"), "StatusCode.NOT_FOUND", "9"),
        (lambda: client.infer("mobilenet_v2", [bytes_input(b"GIF89a broken")]), "StatusCode.INVALID_ARGUMENT", "image"),
        (lambda: client.infer("mobilenet_v2", [bytes_input(image)], outputs=[grpcclient.InferRequestedOutput("nope")]),
         "StatusCode.INVALID_ARGUMENT", "no output 'nope'"),
        (lambda: client.infer("mobilenet_v2", [bytes_input(image)], parameters={"score_threshold": 2.0}),
         "StatusCode.INVALID_ARGUMENT", "score_threshold"),
        (lambda: client.get_model_config("no_such_model"), "StatusCode.NOT_FOUND", "no_such_model"),
        (lambda: client.get_inference_statistics("no_such_model"), "StatusCode.NOT_FOUND", "no_such_model"),
        (lambda: client.get_trace_settings(), "StatusCode.UNIMPLEMENTED", ""),
        (lambda: client.get_model_repository_index(), "StatusCode.PERMISSION_DENIED", "--admin-token"),
    ]
    for call, code, words in cases:
        with pytest.raises(InferenceServerException) as error:
            call()
        assert code_of(error.value) == code, (code, error.value)
        assert words in error.value.message(), error.value.message()
    wrong_type = grpcclient.InferInput("image", [1], "INT16")
    wrong_type.set_data_from_numpy(np.array([1], dtype=np.int16))
    with pytest.raises(InferenceServerException) as error:
        client.infer("mobilenet_v2", [wrong_type])
    assert code_of(error.value) == "StatusCode.INVALID_ARGUMENT" and "INT16" in error.value.message()



def test_a_deadline_is_answered_deadline_exceeded_and_counted(default_server):
    client = client_for(default_server)
    image = [bytes_input(encode(photo("astronaut"), "JPEG"))]
    # The client's own deadline (grpc-timeout) shorter than the SSD's forward pass.
    with pytest.raises(InferenceServerException) as error:
        client.infer("ssd_mobilenet_v2_coco", image, client_timeout=0.005)
    assert code_of(error.value) == "StatusCode.DEADLINE_EXCEEDED"
    # The server's answer, not the client's timer: a 5 ms deadline as metadata, a patient
    # client. The server answers DEADLINE_EXCEEDED itself and counts it as its 504.
    # The request the client gave up on may still be in the server (and be counted as a 504
    # too) on a busy machine: the count is taken once it has left (it is counted before the
    # in-flight gauge drops).
    deadline = time.time() + 30
    while metric(default_server, "visionserve_in_flight_requests", 'model="ssd_mobilenet_v2_coco"') > 0 and time.time() < deadline:
        time.sleep(0.05)
    before = metric(default_server, "visionserve_requests_total", 'protocol="grpc"', 'status="504"')
    with pytest.raises(InferenceServerException) as error:
        client.infer("ssd_mobilenet_v2_coco", image, client_timeout=30, headers={"x-request-timeout-ms": "5"})
    assert code_of(error.value) == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in error.value.message()
    assert metric(default_server, "visionserve_requests_total", 'protocol="grpc"', 'status="504"') == before + 1
    client.infer("mobilenet_v2", image)
    assert metric(default_server, "visionserve_requests_total", 'protocol="grpc"', 'status="200"') >= 1
    # REST counts under its own protocol label.
    assert requests.post(default_server.url("/v1/models/mobilenet_v2/predict"), data=encode(photo("coffee"), "JPEG")).status_code == 200
    assert metric(default_server, "visionserve_requests_total", 'protocol="v1"', 'model="mobilenet_v2"') >= 1


def test_the_bad_input_corpus_through_the_bytes_path(default_server):
    client = client_for(default_server)
    corpus = ROOT / "tests/corpus/files"
    for path in sorted((corpus / "accepted").iterdir()):
        result = client.infer("mobilenet_v2", [bytes_input(path.read_bytes())])
        assert result.as_numpy("scores").shape == (1, 1000), path.name
    for path in sorted((corpus / "rejected").iterdir()):
        with pytest.raises(InferenceServerException) as error:
            client.infer("mobilenet_v2", [bytes_input(path.read_bytes())])
        assert code_of(error.value) == "StatusCode.INVALID_ARGUMENT", (path.name, error.value)
    assert client.is_server_ready()


def test_api_keys_come_from_the_authorization_metadata(managed_server):
    client = client_for(managed_server)
    image = encode(photo("chelsea"), "JPEG")
    with pytest.raises(InferenceServerException) as missing:
        client.infer("resnet18", [bytes_input(image)])
    assert code_of(missing.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("resnet18", [bytes_input(image)], headers={"authorization": "Bearer not-the-key"})
    assert code_of(wrong.value) == "StatusCode.PERMISSION_DENIED"
    result = client.infer("resnet18", [bytes_input(image)], headers={"authorization": f"Bearer {API_KEY}"})
    assert result.as_numpy("scores").shape[0] == 1
    # A stream is checked once, when it opens.
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("resnet18", [bytes_input(image)])
    except InferenceServerException:
        pass  # the refusal may already have closed the stream
    client.stop_stream()
    result, error = answers.get(timeout=30)
    assert result is None and "UNAUTHENTICATED" in str(error.status())
    # Health and metadata stay open, as on REST.
    assert client.is_server_ready() and client.get_model_metadata("resnet18").name == "resnet18"


def test_load_and_unload_behind_the_admin_token(managed_server):
    client = client_for(managed_server)
    token = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with pytest.raises(InferenceServerException) as missing:
        client.unload_model("yolo_tiny")
    assert code_of(missing.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as wrong:
        client.unload_model("yolo_tiny", headers={"authorization": "Bearer wrong-token-wrong-token"})
    assert code_of(wrong.value) == "StatusCode.PERMISSION_DENIED"
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index(headers=token).models}
    assert index[("yolo_tiny", "1")] == "READY"

    client.unload_model("yolo_tiny", headers=token)
    assert not client.is_model_ready("yolo_tiny")
    keyed = {"authorization": f"Bearer {API_KEY}"}
    with pytest.raises(InferenceServerException) as unloaded:
        client.infer("yolo_tiny", [bytes_input(encode(photo("coffee"), "JPEG"))], headers=keyed)
    assert code_of(unloaded.value) == "StatusCode.UNAVAILABLE" and "not ready" in unloaded.value.message()
    client.load_model("yolo_tiny", headers=token)
    assert client.is_model_ready("yolo_tiny")
    result = client.infer("yolo_tiny", [bytes_input(encode(photo("coffee"), "JPEG"))], headers=keyed)
    assert result.as_numpy("num_detections").shape == (1,)
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("no_such_folder", headers=token)
    assert code_of(unknown.value) == "StatusCode.INVALID_ARGUMENT"


def test_sigterm_drains_calls_and_a_stream_in_flight():
    """SIGTERM once every call is in (a second or more of work queued on one inference
    thread): every accepted unary call and every frame of the open stream gets its full
    answer, then the process exits 0."""
    model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"], extra_args=["--models", model, "--inference-threads", "1"])
    try:
        client = client_for(server)
        image = encode(photo("coffee"), "JPEG")
        unary = []

        def call():
            try:
                unary.append(client.infer(model, [bytes_input(image)]).as_numpy("num_detections").shape)
            except Exception as error:  # noqa: BLE001 - recorded and asserted below
                unary.append(error)

        threads = [threading.Thread(target=call) for _ in range(6)]
        streamed = queue.Queue()
        stream_client = client_for(server)
        stream_client.start_stream(callback=lambda result, error: streamed.put((result, error)))
        for i in range(6):
            stream_client.async_stream_infer(model, [bytes_input(image)], request_id=f"s{i}")
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while metric(server, "visionserve_in_flight_requests", f'model="{model}"') + \
                metric(server, "visionserve_requests_total", f'model="{model}"') < 12:
            assert time.time() < deadline, "the calls never all got in"
            time.sleep(0.005)
        in_flight = metric(server, "visionserve_in_flight_requests", f'model="{model}"')
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        answers = [streamed.get(timeout=60) for _ in range(6)]
        stream_client.stop_stream()
        assert server.process.wait(timeout=60) == 0, "".join(server.log[-10:])
        assert in_flight >= 1, "nothing was in flight at SIGTERM: the test proves nothing"
        assert len(unary) == 6 and all(isinstance(shape, tuple) for shape in unary), unary
        assert [result.get_response().id for result, error in answers if error is None] == [f"s{i}" for i in range(6)], answers
        assert any("shut down" in line for line in server.log)
    finally:
        server.stop()


def test_the_shutdown_delay_turns_readiness_off_and_serves_on_until_the_listeners_close():
    """--shutdown-delay-secs: on SIGTERM readiness is off at once (REST 503 "shutting down",
    gRPC health NOT_SERVING), inference still answers on REST and gRPC for the delay (a
    balancer that polls readiness moves away first), then the listeners close and it exits 0."""
    model = "resnet18"
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"], extra_args=["--models", model, "--shutdown-delay-secs", "4"])
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc))
        image = encode(photo("chelsea"), "JPEG")
        predict = lambda: requests.post(server.url(f"/v1/models/{model}/predict"), data=image,
                                        headers={"content-type": "image/jpeg"}, timeout=30)
        assert predict().status_code == 200
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while requests.get(server.url("/health/ready"), timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "readiness stayed on after SIGTERM"
            time.sleep(0.02)
        ready = requests.get(server.url("/health/ready"), timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "shutting down", ready.text
        assert requests.get(server.url("/v2/health/ready"), timeout=5).status_code == 503
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline + 1, "gRPC health stayed SERVING after SIGTERM"
            time.sleep(0.02)
        answered = predict()
        grpc_answer = client_for(server).infer(model, [bytes_input(image)])
        # Only meaningful while the delay lasts: a slow machine that got here late says so.
        assert time.monotonic() - signalled < 4, "the checks above took the whole delay: this run proves nothing"
        assert answered.status_code == 200 and grpc_answer.as_numpy("scores") is not None
        assert server.process.wait(timeout=60) == 0, "".join(server.log[-10:])
        assert time.monotonic() - signalled >= 4, "the listeners closed before the delay was over"
        assert any("readiness off" in line for line in server.log)
    finally:
        server.stop()


def test_a_client_that_goes_away_cancels_its_queued_frames():
    """Eight frames queued on one slow inference thread, then the client disconnects: the
    frames still queued are skipped (not computed), and the stream's bound held them to 8."""
    model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    server = Server(os.environ["VISIONSERVE_TEST_MODELS"],
                    extra_args=["--models", model, "--inference-threads", "1", "--grpc-stream-max-in-flight", "8"])
    try:
        skipped = lambda: metric(server, "visionserve_jobs_skipped_total", f'model="{model}"', 'reason="disconnected"')
        computed = lambda: metric(server, "visionserve_batch_size_sum", f'model="{model}"')
        client = client_for(server)
        client.start_stream(callback=lambda result, error: None)
        image = encode(photo("astronaut"), "JPEG")
        for i in range(20):
            client.async_stream_infer(model, [bytes_input(image)], request_id=f"c{i}")
        deadline = time.time() + 30
        while metric(server, "visionserve_in_flight_requests", f'model="{model}"') < 8:
            assert time.time() < deadline, "the frames never got in"
            time.sleep(0.005)
        # The bound: never more than 8 frames of the stream in the server at once.
        seen = [metric(server, "visionserve_in_flight_requests", f'model="{model}"') for _ in range(20)]
        assert max(seen) <= 8, seen
        at_cancel = computed()
        client.stop_stream(cancel_requests=True)  # the RPC is cancelled: the client is gone
        deadline = time.time() + 30
        while metric(server, "visionserve_in_flight_requests", f'model="{model}"') > 0:
            assert time.time() < deadline, "the frames of a gone client stayed in flight"
            time.sleep(0.05)
        time.sleep(1)
        # Of the 8 frames in flight, at most the batch running (2 images) and one more could
        # still be computed; the rest were dropped, queued (skipped) or still preprocessing.
        assert computed() - at_cancel <= 4, (at_cancel, computed(), skipped())
        assert computed() < 20, "every frame was computed although the client left"
    finally:
        server.stop()
