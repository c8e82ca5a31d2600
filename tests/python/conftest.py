"""Fixtures that start the real visionserve binary on an ephemeral port."""
import io
import os
import re
import subprocess
import threading
import time

import pytest
import requests


class Server:
    """`verify` and `cert` are requests' own arguments, for a server started with TLS (the base
    URL is then https://) and mutual TLS."""

    def __init__(self, repository, extra_args=(), require_ready=True, verify=True, cert=None):
        binary = os.environ.get("VISIONSERVE_BIN")
        if not binary:
            raise RuntimeError("VISIONSERVE_BIN is not set: run the suite with `make test`")
        self.process = subprocess.Popen(
            [binary, "--addr", "127.0.0.1:0", "--model-repository", repository,
             *([] if "--grpc-addr" in extra_args else ["--grpc-addr", "127.0.0.1:0"]), *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        self.log = []
        self.verify, self.cert = verify, cert
        found = threading.Event()
        self.base = None
        # host:port of the gRPC listener, as tritonclient.grpc takes it (None when off).
        self.grpc = None

        def pump():
            for line in self.process.stderr:
                self.log.append(line)
                grpc = re.search(r"listening on grpcs?://(\S+)", line)
                if grpc:
                    self.grpc = grpc.group(1)
                match = re.search(r"listening on (https?://\S+)", line)
                if match and not found.is_set():
                    self.base = match.group(1)
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise RuntimeError("visionserve did not start:\n" + "".join(self.log))
        deadline = time.time() + 300
        while time.time() < deadline:
            models = requests.get(self.base + "/v1/models", timeout=10, verify=verify, cert=cert).json()["models"]
            if all(m["status"] != "loading" for m in models):
                break
            time.sleep(0.2)
        ready = requests.get(self.base + "/health/ready", timeout=10, verify=verify, cert=cert)
        if require_ready and ready.status_code != 200:
            self.stop()
            raise RuntimeError(f"models failed to load: {ready.text}")

    def url(self, path):
        return self.base + path

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def test_server():
    repo = os.environ.get("VISIONSERVE_TEST_MODELS")
    if not repo:
        raise RuntimeError("VISIONSERVE_TEST_MODELS is not set: run the suite with `make test`")
    server = Server(repo)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_server():
    repo = os.environ.get("VISIONSERVE_DEFAULT_MODELS")
    if not repo:
        raise RuntimeError("VISIONSERVE_DEFAULT_MODELS is not set: run the suite with `make test`")
    server = Server(repo)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def task_server():
    """The models of the tasks past detection (`make task-models`), for the tests run in the
    ultralytics environment."""
    repo = os.environ.get("VISIONSERVE_TASK_MODELS")
    if not repo:
        raise RuntimeError("VISIONSERVE_TASK_MODELS is not set: run the suite with `make test`")
    server = Server(repo)
    yield server
    server.stop()


def wait_for(predicate, seconds=60, what=None):
    """`predicate()`'s first truthy value within `seconds` (polled every 0.1 s); else None, or,
    given `what` the test waits for, an AssertionError naming it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    if what is not None:
        raise AssertionError(f"not within {seconds} s: {what}")
    return None


def box_iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def metric(server, name, *labels):
    """The sum of the samples of Prometheus metric `name` (exactly) whose labels include every
    one of `labels` (written as `key="value"`)."""
    total = 0.0
    tls = {"verify": server.verify, "cert": server.cert} if isinstance(server, Server) else {}
    for line in requests.get(server.url("/metrics"), timeout=10, **tls).text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total
