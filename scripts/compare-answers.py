#!/usr/bin/env python3
"""Records every route's answer to the same requests, and compares two recordings byte for byte.

A refactor that should not change behaviour is checked with it: record with the binary before
the change, record with the binary after, compare.

    compare-answers.py record --bin OLD/visionserve --models models --out before.json
    compare-answers.py record --bin target/release/visionserve --models models --out after.json
    compare-answers.py compare before.json after.json [--exempt KEY-PREFIX ...]

The start-here refactor (one post-processing path, one readiness rule) was checked with it:
1,817 answers, all identical except the one intended change, exempted with
`--exempt "empty-repository GET /ping"`: TorchServe's /ping over an empty repository now
says Unhealthy (500), as /health/ready and /v2/health/ready already said not ready.

Routes: /v1 JSON (default and non-default parameters) and PNG overlays, V2 JSON and binary
tensors (BYTES, UINT8 pixels, FP32 tensors), TorchServe's /predictions, the pipeline on each
of them, the management routes without their token, gRPC (ModelInfer, ModelMetadata,
ModelReady, when `tritonclient` is importable), plus the health and metadata routes and a set
of error requests. Requests: the project's sample photos and every file of the robustness
corpus, for each default model, at both versions; with `--test-models DIR`, also the sample
photos through every model of that repository. Only the timing headers, the request id and the
Date header are left out of the comparison.

The REST part uses only the standard library; gRPC needs tritonclient (the project's Python
environment has it).
"""

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORED_HEADERS = {
    "date",
    "x-request-id",
    "x-preprocess-time-ms",
    "x-queue-time-ms",
    "x-inference-time-ms",
    "x-postprocess-time-ms",
}
# Per-step timing headers of a pipeline.
IGNORED_HEADER_PATTERN = re.compile(r"^x-step\d+-(preprocess|queue|inference|postprocess|model-load)-time-ms$")
# Measurements in the metadata, not answers: the load-time batch-cost measurement (noisy at its
# 5 % margin: mobilenet_v2 measured 1 in one start and 4 in the next), resident memory, use times.
IGNORED_FIELDS = {"batch_bound", "memory_estimate_bytes", "last_used_ms", "executors_now", "queued_requests"}
MODELS = {
    "mobilenet_v2": "classification",
    "ssd_mobilenet_v2_coco": "detection",
    "text_detector_ppocr_v4": "segmentation",
}
# Non-default parameters per task, so the parameter handling is compared too.
V1_QUERIES = {
    "classification": ["", "?top_k=3", "?top_k=0", "?score_threshold=0.2"],
    "detection": ["", "?score_threshold=0.3&iou_threshold=0.6&max_detections=5", "?score_threshold=2", "?top_k=3"],
    "segmentation": ["", "?mask_format=rle", "?mask_format=none", "?mask_format=jpeg"],
}
V2_PARAMETERS = [
    {},
    {"score_threshold": 0.3, "iou_threshold": 0.6, "max_detections": 5},
    {"score_threshold": 1.5},
    {"max_detections": 0},
    {"binary_data_output": "yes"},
]


def wait_ready(base, server, limit_s, what):
    started = time.time()
    while True:
        try:
            if request(base, "GET", "/health/ready")[0] == 200:
                return
        except OSError:
            pass
        if time.time() - started > limit_s or server.poll() is not None:
            sys.exit(f"{what} did not become ready")
        time.sleep(0.5)


def stop(server):
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base, method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def record_one(base, key, method, path, body=None, headers=None):
    status, got_headers, payload = request(base, method, path, body, headers)
    kept = {k.lower(): v for k, v in got_headers.items()
            if k.lower() not in IGNORED_HEADERS and not IGNORED_HEADER_PATTERN.match(k.lower())}
    if path.startswith("/v1/models") and method == "GET":
        payload = without_measurements(payload)
        kept.pop("content-length", None)
    entry = {"status": status, "headers": dict(sorted(kept.items())), "sha256": hashlib.sha256(payload).hexdigest()}
    if len(payload) <= 4096:
        entry["body"] = payload.decode("utf-8", "replace")
    return key, entry


def without_measurements(payload):
    """A metadata body with its measured fields taken out."""
    try:
        value = json.loads(payload)
    except ValueError:
        return payload

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in IGNORED_FIELDS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return json.dumps(strip(value), sort_keys=True).encode()


def sample_images():
    images = []
    samples = os.path.join(ROOT, "assets", "samples")
    for name in sorted(os.listdir(samples)):
        if name.endswith((".jpg", ".png")):
            images.append(("sample/" + name, open(os.path.join(samples, name), "rb").read()))
    for kind in ("accepted", "rejected"):
        folder = os.path.join(ROOT, "tests", "corpus", "files", kind)
        for name in sorted(os.listdir(folder)):
            images.append((f"corpus/{kind}/{name}", open(os.path.join(folder, name), "rb").read()))
    return images


def v2_binary_request(image, parameters):
    """Triton's binary extension: a JSON header, then the length-prefixed image."""
    element = struct.pack("<I", len(image)) + image
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}}],
        "parameters": dict(parameters, binary_data_output=True),
    }
    head = json.dumps(header).encode()
    return head + element, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


# Binaries from before gRPC start too: the listener is set by an environment variable.
NO_GRPC = {**os.environ, "VISIONSERVE_GRPC_ADDR": "off"}
PIPELINE = "detect_then_classify"


def grpc_available():
    try:
        import tritonclient.grpc  # noqa: F401
        return True
    except ImportError:
        return False


def record_grpc(address, answers, images):
    """ModelInfer (BYTES, each sample photo), ModelMetadata and ModelReady for every default
    model and the pipeline, and a few refusals; outputs as bytes, hashed."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(address)

    def digest(array):
        # BYTES come back as an object array, whose raw bytes are pointers: hash the elements.
        if array.dtype == np.object_:
            return hashlib.sha256(b"\0".join(bytes(e) for e in array.ravel())).hexdigest()
        return hashlib.sha256(array.tobytes()).hexdigest()

    def keep(key, call):
        try:
            value = call()
            entry = {"ok": value}
        except InferenceServerException as error:
            entry = {"error": [str(error.status()), error.message()]}
        answers[key] = entry

    for model in list(MODELS) + [PIPELINE, "ghost"]:
        keep(f"grpc ModelMetadata {model}", lambda: json.dumps(client.get_model_metadata(model, as_json=True), sort_keys=True))
        keep(f"grpc ModelReady {model}", lambda: client.is_model_ready(model))
        for name, image in images:
            def infer():
                tensor = grpcclient.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
                result = client.infer(model, [tensor])
                response = result.get_response(as_json=True)
                outputs = {o["name"]: digest(result.as_numpy(o["name"])) for o in response["outputs"]}
                return json.dumps({"outputs": response["outputs"], "data": outputs}, sort_keys=True)
            keep(f"grpc ModelInfer {model} {name}", infer)
    client.close()


def record_empty_repository(args, answers):
    """The health routes of a server over an empty repository: the one place the readiness
    rule was not yet one rule (TorchServe's /ping said Healthy)."""
    import tempfile
    with tempfile.TemporaryDirectory() as empty:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([args.bin, "--addr", f"127.0.0.1:{port}", "--model-repository", empty],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=NO_GRPC)
        try:
            started = time.time()
            while True:
                try:
                    request(base, "GET", "/health/live")
                    break
                except OSError:
                    if time.time() - started > 60:
                        sys.exit("the empty server did not start")
                    time.sleep(0.2)
            for path in ["/health/ready", "/v2/health/ready", "/ping"]:
                answers.update([record_one(base, f"empty-repository GET {path}", "GET", path)])
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def record_pipeline(add, samples):
    """The pipeline through every protocol, and the versions it does not have."""
    for name, image in samples:
        raw = {"Content-Type": "application/octet-stream"}
        add(f"POST pipeline /v1 {name}", "POST", f"/v1/models/{PIPELINE}/predict", image, raw)
        add(f"POST pipeline /v1 render {name}", "POST", f"/v1/models/{PIPELINE}/predict?render=png", image, raw)
        add(f"POST pipeline /predictions {name}", "POST", f"/predictions/{PIPELINE}", image, raw)
        body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]}).encode()
        add(f"POST pipeline /v2 json {name}", "POST", f"/v2/models/{PIPELINE}/infer", body, {"Content-Type": "application/json"})
        body, headers = v2_binary_request(image, {})
        add(f"POST pipeline /v2 binary {name}", "POST", f"/v2/models/{PIPELINE}/infer", body, headers)
    for path in [f"/v1/models/{PIPELINE}", f"/v1/models/{PIPELINE}/versions/1", f"/v1/models/{PIPELINE}/versions/2",
                 f"/v2/models/{PIPELINE}", f"/v2/models/{PIPELINE}/ready", f"/v2/models/{PIPELINE}/versions/3/ready"]:
        add(f"GET {path}", "GET", path)
    add("POST pipeline /v1 version 2", "POST", f"/v1/models/{PIPELINE}/versions/2/predict", b"x", {"Content-Type": "image/jpeg"})
    add("POST pipeline /v1 parameter", "POST", f"/v1/models/{PIPELINE}/predict?top_k=2", samples[0][1], {"Content-Type": "image/jpeg"})
    fp32 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]}
    add("POST pipeline /v2 FP32", "POST", f"/v2/models/{PIPELINE}/infer", json.dumps(fp32).encode(), {"Content-Type": "application/json"})


def record_tensor_inputs(add):
    """V2's UINT8 pixels and FP32 tensors, well and badly shaped."""
    pixels = [(x * 7 + y * 13) % 256 for y in range(32) for x in range(32 * 3)]
    for model in MODELS:
        v2 = f"/v2/models/{model}/infer"
        uint8 = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": pixels}]}
        add(f"POST {v2} UINT8", "POST", v2, json.dumps(uint8).encode(), {"Content-Type": "application/json"})
        bad = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32], "data": pixels}]}
        add(f"POST {v2} UINT8 bad shape", "POST", v2, json.dumps(bad).encode(), {"Content-Type": "application/json"})
        fp32 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.25] * 192}]}
        add(f"POST {v2} FP32 8x8", "POST", v2, json.dumps(fp32).encode(), {"Content-Type": "application/json"})


def record_test_models(args, answers):
    """The sample photos through every model of the test repository, /v1 and V2."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.bin, "--addr", f"127.0.0.1:{port}", "--model-repository", args.test_models],
                              stdout=subprocess.DEVNULL, stderr=open(args.out + ".test-models.log", "w"), env=NO_GRPC)
    try:
        wait_ready(base, server, 600, "the test-model server")
        models = json.loads(request(base, "GET", "/v1/models")[2])["models"]
        images = [(n, i) for n, i in sample_images() if n.startswith("sample/")]
        for model in models:
            name = model["name"]
            print(f"\r[record] test model {name:40}", end="", file=sys.stderr, flush=True)
            answers.update([record_one(base, f"test-models GET /v1/models/{name}", "GET", f"/v1/models/{name}")])
            for image_name, image in images:
                answers.update([record_one(base, f"test-models POST /v1/models/{name}/predict {image_name}", "POST",
                                           f"/v1/models/{name}/predict", image, {"Content-Type": "application/octet-stream"})])
                body, headers = v2_binary_request(image, {})
                answers.update([record_one(base, f"test-models POST /v2/models/{name}/infer {image_name}", "POST",
                                           f"/v2/models/{name}/infer", body, headers)])
        print(file=sys.stderr)
    finally:
        stop(server)


def record(args):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grpc_port = free_port()
    with_grpc = grpc_available()
    server = subprocess.Popen(
        [args.bin, "--addr", f"127.0.0.1:{port}", "--model-repository", args.models],
        stdout=subprocess.DEVNULL,
        stderr=open(args.out + ".log", "w"),
        env={**os.environ, "VISIONSERVE_GRPC_ADDR": f"127.0.0.1:{grpc_port}"} if with_grpc else NO_GRPC,
    )
    answers = {}
    try:
        wait_ready(base, server, 300, "the server")

        def add(key, *call, **kw):
            answers.update([record_one(base, key, *call, **kw)])

        for path in ["/health/live", "/health/ready", "/v2/health/ready", "/v2/health/live", "/ping", "/v2", "/v1/models"]:
            add(f"GET {path}", "GET", path)
        for model in MODELS:
            for path in [f"/v1/models/{model}", f"/v1/models/{model}/versions/1", f"/v2/models/{model}",
                         f"/v2/models/{model}/versions/1", f"/v2/models/{model}/ready", f"/v2/models/{model}/versions/2/ready"]:
                add(f"GET {path}", "GET", path)
        for path in ["/v1/models/ghost", "/v2/models/ghost", "/v2/models/ghost/ready", "/v2/models/mobilenet_v2/versions/7",
                     "/v1/models/mobilenet_v2/versions/7"]:
            add(f"GET {path}", "GET", path)

        images = sample_images()
        total = len(images) * len(MODELS)
        done = 0
        for model, task in MODELS.items():
            for name, image in images:
                done += 1
                print(f"\r[record] {done}/{total} {model} {name[:40]:40}", end="", file=sys.stderr, flush=True)
                for version in ("", "/versions/1"):
                    v1 = f"/v1/models/{model}{version}/predict"
                    for query in V1_QUERIES[task]:
                        add(f"POST {v1}{query} {name}", "POST", v1 + query, image, {"Content-Type": "application/octet-stream"})
                    if version:
                        continue
                    add(f"POST {v1}?render=png {name}", "POST", v1 + "?render=png", image, {"Content-Type": "application/octet-stream"})
                    v2 = f"/v2/models/{model}/infer"
                    for parameters in V2_PARAMETERS:
                        body = json.dumps({
                            "id": "r1",
                            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}],
                            "parameters": parameters,
                        }).encode()
                        add(f"POST {v2} json {json.dumps(parameters)} {name}", "POST", v2, body, {"Content-Type": "application/json"})
                    body, headers = v2_binary_request(image, {})
                    add(f"POST {v2} binary {name}", "POST", v2, body, headers)
                    add(f"POST /predictions/{model} {name}", "POST", f"/predictions/{model}", image,
                        {"Content-Type": "application/octet-stream"})
        print(file=sys.stderr)
        samples = [(n, i) for n, i in images if n.startswith("sample/")]
        record_pipeline(add, samples)
        record_tensor_inputs(add)
        for method, path in [("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/mobilenet_v2/load"),
                             ("GET", "/models"), ("GET", "/models/mobilenet_v2"), ("PUT", "/models/mobilenet_v2?min_worker=1"),
                             ("DELETE", "/models/mobilenet_v2/1")]:
            add(f"{method} {path} without token", method, path, b"" if method != "GET" else None)
        if with_grpc:
            record_grpc(f"127.0.0.1:{grpc_port}", answers, samples)
        # A few requests the shared paths refuse before any model runs.
        add("POST /v1 unknown model", "POST", "/v1/models/ghost/predict", b"x", {"Content-Type": "image/jpeg"})
        add("POST /v2 unknown model", "POST", "/v2/models/ghost/infer", b"{}", {"Content-Type": "application/json"})
        add("POST /v2 two inputs", "POST", "/v2/models/mobilenet_v2/infer",
            json.dumps({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}] * 2}).encode(),
            {"Content-Type": "application/json"})
        add("POST /v2 bad datatype", "POST", "/v2/models/mobilenet_v2/infer",
            json.dumps({"inputs": [{"name": "a", "datatype": "INT8", "shape": [1], "data": [1]}]}).encode(),
            {"Content-Type": "application/json"})
        add("POST /v2 unknown output", "POST", "/v2/models/mobilenet_v2/infer",
            json.dumps({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
                        "outputs": [{"name": "nothing"}]}).encode(),
            {"Content-Type": "application/json"})
        add("POST /predictions unknown model", "POST", "/predictions/ghost", b"x", {"Content-Type": "image/jpeg"})
        add("POST /v1 bad timeout header", "POST", "/v1/models/mobilenet_v2/predict", b"x",
            {"Content-Type": "image/jpeg", "x-request-timeout-ms": "0"})
        add("POST /v2 bad timeout header", "POST", "/v2/models/mobilenet_v2/infer", b"{}",
            {"Content-Type": "application/json", "x-request-timeout-ms": "abc"})
    finally:
        stop(server)
    record_empty_repository(args, answers)
    if args.test_models:
        record_test_models(args, answers)
    with open(args.out, "w") as f:
        json.dump(answers, f, indent=1, sort_keys=True)
    print(f"[record] {len(answers)} answers in {args.out}")


def compare(args):
    before = json.load(open(args.before))
    after = json.load(open(args.after))
    exempt = tuple(args.exempt or ())
    differing, exempted = [], []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        (exempted if key.startswith(exempt) and exempt else differing).append(key)
    for key in exempted:
        print(f"exempt  {key}\n  before {before.get(key)}\n  after  {after.get(key)}")
    for key in differing[:20]:
        print(f"DIFFERS {key}\n  before {before.get(key)}\n  after  {after.get(key)}")
    same = len(set(before) | set(after)) - len(differing) - len(exempted)
    print(f"{same} answers identical, {len(exempted)} exempt, {len(differing)} differ")
    sys.exit(1 if differing else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--bin", required=True)
    rec.add_argument("--models", default=os.path.join(ROOT, "models"))
    rec.add_argument("--out", required=True)
    rec.add_argument("--test-models", help="also record every model of this repository on the sample photos")
    cmp_ = commands.add_parser("compare")
    cmp_.add_argument("before")
    cmp_.add_argument("after")
    cmp_.add_argument("--exempt", nargs="*", help="keys starting with these may differ (intended changes)")
    args = parser.parse_args()
    record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    main()
