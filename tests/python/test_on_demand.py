"""Models on demand (--max-loaded-models): requests that cycle through more models than fit all
succeed, at most the budget's worth is loaded at any time, a pinned model stays, concurrent
first requests make one load, and what an admin unloaded is not loaded by a request."""
import io
import os
import pathlib
import threading

import pytest
import requests
from PIL import Image

from conftest import Server, metric

MODELS = ["resnet18", "yolo_tiny", "tiny_ssd", "tiny_text_map"]
ADMIN = "on-demand-admin-token-0123456789"


def image():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """The test models, with resnet18 pinned (its config.toml plus `runtime.pinned`)."""
    root = tmp_path_factory.mktemp("on_demand")
    test_models = pathlib.Path(os.environ["VISIONSERVE_TEST_MODELS"])
    for model in MODELS:
        if model != "resnet18":
            os.symlink(test_models / model, root / model)
    pinned = root / "resnet18"
    pinned.mkdir()
    for item in (test_models / "resnet18").iterdir():
        if item.name != "config.toml":
            os.symlink(item, pinned / item.name)
    config = (test_models / "resnet18" / "config.toml").read_text()
    assert "[runtime]" not in config
    (pinned / "config.toml").write_text(config + "\n[runtime]\npinned = true\n")
    return root


def status(server):
    return {m["name"]: m for m in requests.get(server.url("/v1/models")).json()["models"]}


def loaded(server):
    return sorted(name for name, m in status(server).items() if m["status"] == "ready")



def resident_kib(server):
    for line in open(f"/proc/{server.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_cycling_through_more_models_than_fit(repository):
    server = Server(str(repository), extra_args=["--max-loaded-models", "2", "--admin-token", ADMIN])
    try:
        # Ready at once: only the pinned model loads at start.
        assert loaded(server) == ["resnet18"]
        models = status(server)
        assert models["resnet18"]["pinned"] is True
        assert all(models[m]["status"] == "on_demand" for m in MODELS[1:])
        blob = image()
        for _ in range(2):
            for model in MODELS[1:] + ["resnet18"]:
                answer = requests.post(server.url(f"/v1/models/{model}/predict"), data=blob, timeout=60)
                assert answer.status_code == 200, (model, answer.text)
                now = loaded(server)
                assert len(now) <= 2 and "resnet18" in now, now
                assert model in now
        # Each unpinned model was loaded on demand, and the cold start was reported.
        assert metric(server, "visionserve_model_load_seconds_count") >= 6
        models = status(server)
        assert all(models[m].get("memory_estimate_bytes", 0) > 0 for m in MODELS)
        assert models["resnet18"]["last_used_ms"] >= models["yolo_tiny"]["last_used_ms"]
        # Resident memory only as a loose outer bound: four small models, two at a time.
        assert resident_kib(server) < 3 * 1024 * 1024

        # An admin's unload is not undone by a request.
        token = {"Authorization": f"Bearer {ADMIN}"}
        assert requests.post(server.url("/v2/repository/models/tiny_ssd/unload"), headers=token).status_code == 200
        refused = requests.post(server.url("/v1/models/tiny_ssd/predict"), data=blob)
        assert refused.status_code == 503 and status(server)["tiny_ssd"]["status"] == "unloaded"
        assert requests.get(server.url("/health/ready")).status_code == 200
    finally:
        server.stop()


def test_concurrent_first_requests_make_one_load(repository):
    server = Server(str(repository), extra_args=["--max-loaded-models", "3"])
    try:
        blob = image()
        answers = []

        def call():
            answers.append(requests.post(server.url("/v1/models/yolo_tiny/predict"), data=blob, timeout=60))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.status_code for a in answers] == [200] * 6
        assert metric(server, "visionserve_model_load_seconds_count", 'model="yolo_tiny"') == 1
        assert any("x-model-load-time-ms" in a.headers for a in answers)
        assert requests.post(server.url("/v1/models/yolo_tiny/predict"), data=blob).headers.get("x-model-load-time-ms") is None
    finally:
        server.stop()
