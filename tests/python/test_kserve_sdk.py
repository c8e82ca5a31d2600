"""KServe's own Python SDK, unmodified (kserve 0.21, pinned in tests/clients/kserve/
requirements.lock, in an environment of its own: it cannot share a process with
tritonclient.grpc): `InferenceRESTClient` with protocol v1 (liveness, `is_model_ready`,
`:predict` with a `b64` instance) and v2 (readiness and `infer`, whose requests carry the
`model_name` field the server once refused), and `InferenceGRPCClient`. The calls are in
tests/clients/kserve/kserve_calls.py; here their answers are checked against /v1's."""
import json
import os
import pathlib
import subprocess

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHOTO = ROOT / "assets" / "samples" / "chelsea.jpg"


def test_kserve_sdk_v1_v2_and_grpc(default_server):
    python = os.environ.get("VISIONSERVE_KSERVE_PYTHON")
    if not python:
        pytest.skip("VISIONSERVE_KSERVE_PYTHON is not set: `make test-python` makes KServe's environment")
    result = subprocess.run([python, str(ROOT / "tests" / "clients" / "kserve" / "kserve_calls.py"), default_server.base,
                             default_server.grpc, "mobilenet_v2", str(PHOTO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for check in ["v1_live", "v1_ready", "v2_live", "v2_server_ready", "v2_ready", "grpc_live", "grpc_ready"]:
        assert found[check] is True, (check, found)
    v1 = requests.post(default_server.url("/v1/models/mobilenet_v2/predict"), data=PHOTO.read_bytes()).json()
    top = v1["results"][0]["predictions"][0]
    # V1 predictions in TorchServe's classifier shape, best first.
    (prediction,) = found["v1_predictions"]
    best_label, best_score = next(iter(prediction.items()))
    assert best_label == top["label"] and abs(best_score - top["score"]) < 1e-4, (prediction, top)
    assert found["v2_top1"] == [top["index"], "scores"] and found["grpc_top1"] == [top["index"], "scores"], found
