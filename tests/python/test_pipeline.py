"""The default pipeline (models/detect_then_classify/pipeline.toml: ssd_mobilenet_v2_coco, then
mobilenet_v2 on every kept detection) against its own steps called alone, on every protocol."""
import io
import math
import os
import pathlib

import numpy as np
import pytest
import requests
import tomllib
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from conftest import Server, encode, metric
from test_default_models import CAT_CLASSES, COFFEE_CLASSES

ROOT = pathlib.Path(__file__).resolve().parents[2]
PIPELINE = "detect_then_classify"
SPEC = tomllib.loads((ROOT / "models" / PIPELINE / "pipeline.toml").read_text())
SAMPLES = ROOT / "assets" / "samples"


def grid(layout, width=400, height=300):
    """Photos of the project tiled into one picture: several detections per image."""
    photos = {"cat": Image.open(SAMPLES / "chelsea.jpg").convert("RGB"), "cup": Image.open(SAMPLES / "coffee.jpg").convert("RGB")}
    rows = [row.split(",") for row in layout.split("/")]
    picture = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
    for y, row in enumerate(rows):
        for x, name in enumerate(row):
            picture.paste(photos[name].resize((width, height)), (x * width, y * height))
    return picture


MANY = "cat,cup,cat/cup,cat,cup"  # five or more kept detections (asserted below)


def pipeline_v1(server, blob):
    response = requests.post(server.url(f"/v1/models/{PIPELINE}/predict"), data=blob, timeout=120)
    assert response.status_code == 200, response.text
    return response


def expected_detections(server, blob):
    """The detector's own answer, as the pipeline's spec filters it."""
    response = requests.post(server.url("/v1/models/ssd_mobilenet_v2_coco/predict"), data=blob, timeout=120,
                             params={"score_threshold": SPEC["detect"]["min_score"], "max_detections": 100})
    assert response.status_code == 200, response.text
    kept = [d for d in response.json()["results"][0]["detections"] if d["label"] in SPEC["detect"]["classes"]]
    return kept[: SPEC["detect"]["max_crops"]]


def crop_box(box, margin, width, height):
    """src/pipeline.rs crop_of, in Python: the box grown by the margin, outward to whole pixels."""
    dx, dy = (box["x2"] - box["x1"]) * margin, (box["y2"] - box["y1"]) * margin
    clamp = lambda v, hi: min(max(v, 0), hi)
    return (clamp(math.floor(box["x1"] - dx), width), clamp(math.floor(box["y1"] - dy), height),
            clamp(math.ceil(box["x2"] + dx), width), clamp(math.ceil(box["y2"] + dy), height))


@pytest.mark.parametrize("name", ["chelsea", "coffee", "many"])
def test_boxes_equal_the_detectors_and_each_label_the_classifiers_on_the_same_crop(default_server, name):
    picture = grid(MANY) if name == "many" else Image.open(SAMPLES / f"{name}.jpg").convert("RGB")
    # PNG: the pipeline and this test decode exactly the same pixels.
    blob = encode(picture, "PNG")
    answer = pipeline_v1(default_server, blob).json()
    assert answer["model"] == PIPELINE and answer["task"] == "detection"
    assert answer["steps"]["detect"]["model"] == "ssd_mobilenet_v2_coco"
    found = answer["results"][0]["detections"]
    expected = expected_detections(default_server, blob)
    assert len(found) == len(expected) > 0
    for ours, theirs in zip(found, expected):
        assert (ours["label"], ours["index"]) == (theirs["label"], theirs["index"])
        for k in ("x1", "y1", "x2", "y2"):
            assert abs(ours["box"][k] - theirs["box"][k]) < 1e-3, (ours, theirs)
        assert abs(ours["score"] - theirs["score"]) < 1e-5
        crop = picture.crop(crop_box(ours["box"], SPEC["classify"]["margin"], picture.width, picture.height))
        alone = requests.post(default_server.url("/v1/models/mobilenet_v2/predict"), data=encode(crop, "PNG"), timeout=60).json()
        alone_top = alone["results"][0]["predictions"]
        nested = ours["classification"]["predictions"]
        assert len(nested) == SPEC["classify"]["top_k"]
        assert [p["label"] for p in nested[:3]] == [p["label"] for p in alone_top[:3]], (nested, alone_top)
        assert abs(nested[0]["score"] - alone_top[0]["score"]) < 1e-3
    if name == "chelsea":
        assert found[0]["classification"]["predictions"][0]["label"] in CAT_CLASSES
    if name == "coffee":
        assert found[0]["classification"]["predictions"][0]["label"] in COFFEE_CLASSES



def test_the_crops_of_a_request_go_to_the_classifier_in_batched_forwards(default_server):
    blob = encode(grid(MANY), "JPEG", quality=92)
    label = 'model="mobilenet_v2"'
    forwards = metric(default_server, "visionserve_batch_size_count", label)
    images = metric(default_server, "visionserve_batch_size_sum", label)
    response = pipeline_v1(default_server, blob)
    crops = len(response.json()["results"][0]["detections"])
    assert crops >= 5
    # One job for all the crops, run in forwards of the classifier's batch bound (its
    # max_batch_size, or less where loading measured smaller batches as cheap per image on
    # this CPU), not one job per crop.
    bound = requests.get(default_server.url("/v1/models/mobilenet_v2"), timeout=30).json()["batch_bound"]
    assert 1 <= bound <= 8
    assert metric(default_server, "visionserve_batch_size_count", label) - forwards == math.ceil(crops / bound)
    assert metric(default_server, "visionserve_batch_size_sum", label) - images == crops
    assert int(response.headers["x-step2-batch-size"]) == crops
    assert response.headers["x-step1-model"].startswith("ssd_mobilenet_v2_coco/")
    assert response.headers["x-step2-model"].startswith("mobilenet_v2/")
    for stage in ("preprocess", "queue", "inference"):
        step_sum = sum(float(response.headers[f"x-step{n}-{stage}-time-ms"]) for n in (1, 2))
        assert abs(float(response.headers[f"x-{stage}-time-ms"]) - step_sum) < 0.01


def test_the_overlay_torchserve_v2_and_grpc(default_server):
    blob = encode(grid(MANY), "JPEG", quality=92)
    reference = pipeline_v1(default_server, blob).json()["results"][0]["detections"]

    overlay = requests.post(default_server.url(f"/v1/models/{PIPELINE}/predict?render=png"), data=blob, timeout=60)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(overlay.content))
    assert drawn.size == (1200, 600)
    assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(Image.open(io.BytesIO(blob)), dtype=int)).sum() > 0

    served = requests.post(default_server.url(f"/predictions/{PIPELINE}"), data=blob, timeout=60).json()
    assert len(served) == len(reference)
    for ts, ours in zip(served, reference):
        assert ts[ours["label"]] == pytest.approx([ours["box"][k] for k in ("x1", "y1", "x2", "y2")], abs=1e-3)
        assert list(ts["classification"])[0] == ours["classification"]["predictions"][0]["label"]

    names = ["boxes", "scores", "classes", "num_detections", "classification_scores", "classification_classes", "classification_labels"]
    meta = requests.get(default_server.url(f"/v2/models/{PIPELINE}")).json()
    assert [o["name"] for o in meta["outputs"]] == names and meta["platform"] == "visionserve_pipeline"
    http = httpclient.InferenceServerClient(url=default_server.base.removeprefix("http://"))
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)
    result = http.infer(PIPELINE, [image], outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in names])
    count = int(result.as_numpy("num_detections")[0])
    assert count == len(reference)
    labels = result.as_numpy("classification_labels")
    assert labels.shape == (1, count, SPEC["classify"]["top_k"])
    assert [l.decode() for l in labels[0, :, 0]] == [d["classification"]["predictions"][0]["label"] for d in reference]
    np.testing.assert_allclose(result.as_numpy("classification_scores")[0, :, 0],
                               [d["classification"]["predictions"][0]["score"] for d in reference], atol=1e-4)

    grpc_client = grpcclient.InferenceServerClient(default_server.grpc)
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([blob], dtype=np.object_))
    over_grpc = grpc_client.infer(PIPELINE, [image])
    assert [l.decode() for l in over_grpc.as_numpy("classification_labels")[0, :, 0]] == [l.decode() for l in labels[0, :, 0]]
    assert grpc_client.is_model_ready(PIPELINE)


def test_listing_readiness_and_errors(default_server):
    models = {m["name"]: m for m in requests.get(default_server.url("/v1/models")).json()["models"]}
    pipeline = models[PIPELINE]
    assert pipeline["kind"] == "pipeline" and pipeline["status"] == "ready"
    assert pipeline["steps"]["detect"]["model"] == "ssd_mobilenet_v2_coco"
    assert pipeline["steps"]["classify"]["model"] == "mobilenet_v2"
    assert requests.get(default_server.url(f"/v2/models/{PIPELINE}/ready")).status_code == 200
    blob = (SAMPLES / "chelsea.jpg").read_bytes()
    wrong_version = requests.post(default_server.url(f"/v1/models/{PIPELINE}/versions/2/predict"), data=blob)
    assert wrong_version.status_code == 404
    with_params = requests.post(default_server.url(f"/v1/models/{PIPELINE}/predict?score_threshold=0.1"), data=blob)
    assert with_params.status_code == 422 and "pipeline.toml" in with_params.json()["error"]["message"]
    not_an_image = requests.post(default_server.url(f"/v1/models/{PIPELINE}/predict"), data=b"not an image")
    assert not_an_image.status_code == 400


ADMIN = "pipeline-admin-token-0123456789"


@pytest.fixture(scope="module")
def step_server(tmp_path_factory):
    """A repository of test models with two pipelines: one sound, one naming a model that is
    not there."""
    repository = tmp_path_factory.mktemp("pipelines")
    test_models = pathlib.Path(os.environ["VISIONSERVE_TEST_MODELS"])
    for model in ("tiny_ssd", "resnet18"):
        os.symlink(test_models / model, repository / model)
    (repository / "chain").mkdir()
    (repository / "chain" / "pipeline.toml").write_text(
        '[detect]\nmodel = "tiny_ssd"\nmin_score = 0.0\nmax_crops = 3\n[classify]\nmodel = "resnet18"\n')
    (repository / "broken").mkdir()
    (repository / "broken" / "pipeline.toml").write_text('[detect]\nmodel = "tiny_ssd"\n[classify]\nmodel = "no_such_model"\n')
    server = Server(str(repository), extra_args=["--admin-token", ADMIN], require_ready=False)
    yield server
    server.stop()


def test_a_step_that_cannot_run_is_named(step_server):
    blob = encode(Image.open(SAMPLES / "coffee.jpg").convert("RGB").resize((160, 120)), "PNG")
    models = {m["name"]: m for m in requests.get(step_server.url("/v1/models")).json()["models"]}
    assert models["broken"]["status"] == "failed" and "step 'classify'" in models["broken"]["reason"]
    # The broken pipeline holds readiness back, naming itself.
    ready = requests.get(step_server.url("/health/ready"))
    assert ready.status_code == 503 and "broken" in ready.text
    answer = requests.post(step_server.url("/v1/models/chain/predict"), data=blob)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"][0]["detections"]) == 3
    assert all(len(d["classification"]["predictions"]) == 5 for d in answer.json()["results"][0]["detections"])
    broken = requests.post(step_server.url("/v1/models/broken/predict"), data=blob)
    assert broken.status_code == 503 and "no_such_model" in broken.json()["error"]["message"]
    # The second step unloaded: 503, naming it.
    token = {"Authorization": f"Bearer {ADMIN}"}
    assert requests.post(step_server.url("/v2/repository/models/resnet18/unload"), headers=token).status_code == 200
    unloaded = requests.post(step_server.url("/v1/models/chain/predict"), data=blob)
    assert unloaded.status_code == 503 and "resnet18" in unloaded.json()["error"]["message"], unloaded.text
    assert requests.get(step_server.url("/v2/models/chain/ready")).status_code == 503
    assert requests.post(step_server.url("/v2/repository/models/resnet18/load"), headers=token).status_code == 200
    assert requests.post(step_server.url("/v1/models/chain/predict"), data=blob).status_code == 200

    # Statistics: each pipeline a row of its own, as Triton's ensembles; its steps in their
    # models' rows (resnet18's since its reload: counters start again with a new load).
    def row(name):
        rows = requests.get(step_server.url(f"/v2/models/{name}/stats"), timeout=30).json()["model_stats"]
        assert len(rows) == 1, rows
        return rows[0]
    chain = row("chain")
    assert (chain["version"], chain["execution_count"], chain["batch_stats"]) == ("1", 0, [])
    counts = lambda r: (r["inference_stats"]["success"]["count"], r["inference_stats"]["fail"]["count"])
    assert counts(chain) == (2, 1) and chain["inference_count"] == 2, chain
    assert chain["inference_stats"]["compute_infer"]["ns"] > 0
    assert counts(row("broken")) == (0, 1)
    # The detector answered all three chain requests: the unloaded classifier was found at
    # step 2.
    assert counts(row("tiny_ssd"))[0] == 3
    classifier = row("resnet18")
    assert counts(classifier) == (1, 0), classifier
    assert sum(b["compute_infer"]["count"] for b in classifier["batch_stats"]) == classifier["execution_count"] >= 1
    assert classifier["memory_usage"][0]["type"] == "CPU" and classifier["memory_usage"][0]["byte_size"] > 0
    every = requests.get(step_server.url("/v2/models/stats"), timeout=30).json()["model_stats"]
    assert {"chain", "broken", "tiny_ssd", "resnet18"} <= {r["name"] for r in every}
