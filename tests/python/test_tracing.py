"""OpenTelemetry traces: spans per stage over OTLP/HTTP and OTLP/gRPC into a collector written
here with opentelemetry-proto, the W3C parent taken from REST headers and gRPC metadata, the
batched forward linked to the requests it served, and a collector that is down costing a
counter, never a request."""
import http.server
import os
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import Server, encode, metric
from test_default_models import photo

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = {"receive_body", "decode", "preprocess", "queue_wait", "postprocess", "encode"}


class Collector:
    """Keeps every span it is sent, with its resource's attributes."""

    def __init__(self):
        self.spans = []
        self.services = set()
        self.lock = threading.Lock()

    def take(self, request):
        with self.lock:
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.services.add(attribute.value.string_value)
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)

    def wait_for(self, predicate, seconds=20):
        deadline = time.time() + seconds
        while time.time() < deadline:
            with self.lock:
                found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError("the collector never got the spans")


def http_collector():
    collector = Collector()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["content-length"]))
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            collector.take(request)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return collector, f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


def grpc_collector():
    collector = Collector()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 - the protocol's name
            collector.take(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return collector, f"http://127.0.0.1:{port}", lambda: server.stop(0)


def traced_server(endpoint, protocol, **extra_env):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "1000", **extra_env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Server(os.environ["VISIONSERVE_TEST_MODELS"], extra_args=["--models", "resnet18,fault_probe"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def attributes(span):
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value or value.int_value or value.double_value or value.bool_value
    return out


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_request_is_one_trace_of_stages_under_the_callers_parent(protocol):
    collector, endpoint, stop = (http_collector if protocol == "http/protobuf" else grpc_collector)()
    server = traced_server(endpoint, protocol, OTEL_SERVICE_NAME="visionserve-under-test")
    try:
        answer = requests.post(server.url("/v1/models/resnet18/predict"), data=encode(photo("chelsea"), "JPEG"),
                               headers={"traceparent": TRACEPARENT})
        assert answer.status_code == 200
        requests_spans = collector.wait_for(lambda s: s.name == "request" and s.trace_id.hex() == TRACE_ID)
        root = requests_spans[0]
        assert root.parent_span_id.hex() == PARENT_ID, "the caller's span is the parent"
        found = attributes(root)
        assert (found["model"], found["protocol"], found["version"], found["status"]) == ("resnet18", "v1", "1", 200)
        assert found["batch_size"] >= 1
        # Every stage is a span of the same trace, under the request.
        stages = collector.wait_for(lambda s: s.trace_id.hex() == TRACE_ID and s.name in STAGES and
                                    len({x.name for x in collector.spans if x.trace_id.hex() == TRACE_ID} & STAGES) == len(STAGES))
        names = {s.name for s in collector.spans if s.trace_id.hex() == TRACE_ID}
        assert STAGES <= names, names
        decode = next(s for s in collector.spans if s.trace_id.hex() == TRACE_ID and s.name == "decode")
        assert attributes(decode)["width"] == 451
        # The batched forward is its own span, linked to the request it served.
        forwards = collector.wait_for(lambda s: s.name == "forward" and any(l.trace_id.hex() == TRACE_ID for l in s.links))
        assert any(l.span_id == root.span_id for l in forwards[0].links)
        assert "visionserve-under-test" in collector.services
        # A request's log lines name its trace: fault_probe fails on a white image, and the
        # error line is logged in the request's span.
        failing_trace = "5af7651916cd43dd8448eb211c80319d"
        from PIL import Image
        white = encode(Image.new("RGB", (16, 16), (255, 255, 255)), "PNG")
        failed = requests.post(server.url("/v1/models/fault_probe/predict"), data=white,
                               headers={"traceparent": f"00-{failing_trace}-b7ad6b7169203331-01"})
        assert failed.status_code == 500
        deadline = time.time() + 5
        while not any(failing_trace in line and "trace_id" in line for line in server.log):
            assert time.time() < deadline, "".join(server.log[-5:])
            time.sleep(0.1)

        # gRPC: the parent comes from the call's metadata.
        grpc_trace = "0af7651916cd43dd8448eb211c80319c"
        client = grpcclient.InferenceServerClient(server.grpc)
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([encode(photo("coffee"), "JPEG")], dtype=np.object_))
        client.infer("resnet18", [image], headers={"traceparent": f"00-{grpc_trace}-b7ad6b7169203331-01"})
        grpc_root = collector.wait_for(lambda s: s.name == "request" and s.trace_id.hex() == grpc_trace)[0]
        assert attributes(grpc_root)["protocol"] == "grpc"
        assert grpc_root.parent_span_id.hex() == "b7ad6b7169203331"
    finally:
        server.stop()
        stop()


def test_a_collector_that_is_down_costs_a_counter_not_a_request():
    # A port nothing listens on.
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # A 5 s export timeout: requests that waited on the exporter would take 100 s or more for
    # 20, far beyond the 60 s allowed, which leaves room for a loaded 2-core machine (a clean
    # clone's make test once took over 10 s for these 20 with other builds running).
    server = traced_server(dead, "http/protobuf", OTEL_EXPORTER_OTLP_TIMEOUT="5000")
    try:
        blob = encode(photo("chelsea"), "JPEG")
        url = server.url("/v1/models/resnet18/predict")
        started = time.time()
        for _ in range(20):
            assert requests.post(url, data=blob, timeout=30).status_code == 200
        assert time.time() - started < 60, "requests waited on the exporter"
        deadline = time.time() + 20
        while metric(server, "visionserve_trace_export_errors_total") < 1:
            assert time.time() < deadline, "failed exports were not counted"
            time.sleep(0.2)
    finally:
        server.stop()


def test_tracing_is_off_without_an_endpoint(default_server):
    answer = requests.post(default_server.url("/v1/models/mobilenet_v2/predict"), data=encode(photo("chelsea"), "JPEG"),
                           headers={"traceparent": TRACEPARENT})
    assert answer.status_code == 200
    assert not any("trace_id=" in line for line in default_server.log)
