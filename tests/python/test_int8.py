"""INT8 and BF16 versions (models/quantize.py): the gates' arithmetic, the layers kept FP32, and
the default mobilenet_v2's versions 3 (INT8) and 4 (BF16) as `make models` left them on this
machine: installed past their gates and serving the FP32 twin's answers on every protocol, or
listed with the gate's reason, refused with a 404 and never the default."""
import json
import os
import sys

import numpy as np
import pytest
import requests
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "models"))
import quantize  # noqa: E402
from conftest import box_iou  # noqa: E402

SAMPLES = [os.path.join(ROOT, "assets", "samples", f) for f in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
MODEL, TWIN = "mobilenet_v2", "2"
# The variants of the default set: model, version, precision (each made from version 2).
VARIANTS = [(MODEL, "3", "int8"), (MODEL, "4", "bf16"), ("ssd_mobilenet_v2_coco", "3", "bf16")]


def report(top1=0.995, confident=300, speedup=2.0, int8_calls=40, precision="int8", bf16_tensors=0):
    return {"precision": precision,
            "accuracy": {"crops": 512, "confident_crops": confident, "top1_confident": top1, "top1_overall": 0.9,
                         "top5_overlap": 0.9},
            "speed": {"threads": 2, "variant_ms_1_thread": 10.0 / speedup, "fp32_ms_1_thread": 10.0,
                      "speedup_1_thread": speedup, "variant_ms_all_threads": 5.0, "fp32_ms_all_threads": 6.0,
                      "speedup_all_threads": 1.2},
            "kernels": {"onednn_int8": int8_calls, "bf16": bf16_tensors}}


def test_the_gates_pass_only_a_variant_accurate_and_fast_with_quantized_kernels():
    assert quantize.gate(report()) is None
    assert "top-1 agreement 98.9%" in quantize.gate(report(top1=0.989))
    assert "only 49 evaluation crops" in quantize.gate(report(confident=49))
    assert "1.49 x" in quantize.gate(report(speedup=1.49))
    assert "would run in FP32" in quantize.gate(report(int8_calls=0))
    assert quantize.gate(report(top1=0.5, speedup=1.0)).count(";") == 1, "every failed gate is named"
    assert "93.0%" in quantize.describe(report(top1=0.93))
    avx2 = dict(report(speedup=1.1), cpu={"capability": "AVX2", "vnni": False, "amx": False})
    assert "no VNNI or AMX" in quantize.gate(avx2), "a failure on a CPU without 8-bit dot products says so"
    assert quantize.gate(dict(report(), cpu=avx2["cpu"])) is None, "a variant that passes, passes"


def test_a_bf16_variant_has_the_same_gates_and_must_compute_in_bfloat16():
    bf16 = dict(precision="bf16", int8_calls=0)
    assert quantize.gate(report(bf16_tensors=100, **bf16)) is None
    assert "would run in FP32" in quantize.gate(report(bf16_tensors=0, **bf16)), "a package left in FP32 fails"
    assert "1.20 x" in quantize.gate(report(bf16_tensors=100, speedup=1.2, **bf16))
    assert "top-1 agreement 98.0%" in quantize.gate(report(bf16_tensors=100, top1=0.98, **bf16))
    slow = dict(report(bf16_tensors=100, speedup=0.8, **bf16), cpu={"capability": "AVX512", "vnni": True, "amx": False,
                                                                   "bf16": False})
    assert "no AVX512-BF16 or AMX" in quantize.gate(slow) and "VNNI" not in quantize.gate(slow)
    assert "bfloat16 tensors" in quantize.describe(report(bf16_tensors=100, **bf16))


def test_a_detector_variant_is_judged_by_its_matched_boxes():
    boxes = {"kind": "boxes", "crops": 512, "confident_detections": 400, "matched": 0.985, "median_iou": 0.97}
    bf16 = dict(report(precision="bf16", int8_calls=0, bf16_tensors=10), accuracy=boxes)
    assert quantize.gate(bf16) is None
    assert "97.0% of FP32's confident detections matched at IoU >= 0.7" in quantize.gate(
        dict(bf16, accuracy=dict(boxes, matched=0.97)))
    assert "only 49 confident FP32 detections" in quantize.gate(dict(bf16, accuracy=dict(boxes, confident_detections=49)))
    assert "400 confident FP32 detections" in quantize.describe(bf16)


def test_detections_are_per_class_nms_above_the_threshold_without_the_background():
    # Anchors: two overlapping boxes of class 1 (NMS keeps the better), one of class 2, one box
    # whose only high score is the background's, one under the threshold.
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.52], [0.6, 0.6, 0.9, 0.9], [0, 0, 1, 1],
                           [0.2, 0.6, 0.3, 0.7]]])
    scores = torch.zeros(1, 5, 3)
    scores[0, 0, 1], scores[0, 1, 1], scores[0, 2, 2], scores[0, 3, 0], scores[0, 4, 1] = 0.9, 0.8, 0.7, 0.99, 0.2
    (kept, classes, values), = quantize.detections(boxes, scores, 0, 0.5)
    assert sorted(zip(classes.tolist(), values.tolist())) == [(1, pytest.approx(0.9)), (2, pytest.approx(0.7))]
    (everything, _, _), = quantize.detections(boxes, scores, None, 0.5)
    assert len(everything) == 3, "without a background class its column counts"


def test_a_variant_that_cannot_be_built_here_is_not_installed_and_the_build_goes_on(tmp_path, monkeypatch):
    import shutil
    import tomllib
    import aoti
    folder = tmp_path / MODEL / "4"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "models", MODEL, "4", "config.toml"), folder / "config.toml")
    (folder / "program.pt2").write_bytes(b"")
    (folder / "model.pt2").symlink_to(tmp_path / "an-old-package.pt2")

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no bfloat16 kernel for this operator on this CPU\nmore detail")
    monkeypatch.setattr(aoti, "twin_package", lambda *args: str(tmp_path / "twin.pt2"))
    monkeypatch.setattr(aoti, "compile_variant_cached", no_kernel)
    config = tomllib.load(open(folder / "config.toml", "rb"))
    assert aoti.install_variant(f"{MODEL}-v4", str(folder), config, str(tmp_path / "cache"), str(tmp_path)) is False
    assert not os.path.lexists(folder / "model.pt2"), "an older package is unlinked"
    reason = (folder / "not-installed.txt").read_text()
    assert reason.startswith("BF16 variant failed its gate on this machine: could not be built on this machine: "
                             "RuntimeError: no bfloat16 kernel for this operator on this CPU"), reason


def test_the_bf16_program_computes_in_bfloat16_and_answers_in_fp32():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    from program import export_program
    torch.manual_seed(0)
    tiny = Tiny().eval()
    example = torch.randn(2, 3, 16, 16)
    program = export_program(tiny, example, 4)
    spec = {"example_shape": [2, 3, 16, 16], "max_batch": 4}
    bf16 = quantize.to_bf16(program, spec)
    out = bf16.module()(example)
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    weights = [v.dtype for v in bf16.state_dict.values()]
    assert weights and all(d == torch.bfloat16 for d in weights), weights
    assert all(v.dtype == torch.float32 for v in program.state_dict.values()), "the FP32 program is left as it was"
    with torch.no_grad():
        assert (out - tiny(example)).abs().max().item() < 0.05


def test_the_first_and_last_layers_are_found_by_name_in_the_exported_graph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
            self.body = torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    module = torch.export.export(Net(), (torch.zeros(1, 3, 16, 16),)).module()
    assert quantize.end_layers(module, 1, 1) == ["stem.0", "head"]
    assert quantize.end_layers(module, 2, 0) == ["stem.0", "body"]
    assert quantize.end_layers(module) == ["stem.0", "body", "head"], "ends that overlap are named once"


def test_crops_are_preprocessed_as_the_server_does_and_repeatable():
    photos = [("grey", torch.full((3, 300, 400), 128, dtype=torch.uint8))]
    pixels = {"resize": "shorter_side_center_crop", "resize_shorter": 256, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    a = quantize.crops(photos, 4, 0, pixels, (224, 224))
    assert a.shape == (4, 3, 224, 224)
    assert torch.allclose(a, torch.full_like(a, (128 / 255 - 0.5) / 0.25), atol=1e-5)
    assert torch.equal(quantize.crops(photos, 4, 0, pixels, (224, 224)), a)


def version(server, model, v):
    return requests.get(server.url(f"/v1/models/{model}/versions/{v}"), timeout=10).json()


def answer(server, model, v, path):
    response = requests.post(server.url(f"/v1/models/{model}/versions/{v}/predict"), data=open(path, "rb").read(),
                             headers={"content-type": "image/jpeg"}, timeout=60)
    return response.status_code, response.json()


def installed(model, v):
    return os.path.exists(os.path.join(os.environ["VISIONSERVE_DEFAULT_MODELS"], model, v, "model.pt2"))


def same_answers(fp32, ours):
    """The variant's answer agrees with its twin's: the same top-1, or each of the twin's
    detections at score >= 0.5 found with the same label at IoU >= 0.7 (the build's box gate)."""
    fp32, ours = fp32["results"][0], ours["results"][0]
    if "predictions" in fp32:
        return fp32["predictions"][0]["index"] == ours["predictions"][0]["index"]
    confident = [d for d in fp32["detections"] if d["score"] >= 0.5]
    def corners(box):
        return [box[k] for k in ("x1", "y1", "x2", "y2")]
    return all(any(o["label"] == d["label"] and box_iou(corners(o["box"]), corners(d["box"])) >= 0.7
                   for o in ours["detections"]) for d in confident)


@pytest.mark.parametrize("model,variant,precision", VARIANTS)
def test_a_variant_is_installed_only_past_its_gates(default_server, model, variant, precision):
    folder = os.path.join(os.environ["VISIONSERVE_DEFAULT_MODELS"], model, variant)
    package, refusal = os.path.join(folder, "model.pt2"), os.path.join(folder, "not-installed.txt")
    listed = version(default_server, model, variant)
    assert listed["precision"] == precision and version(default_server, model, TWIN)["precision"] == "fp32"
    family = requests.get(default_server.url(f"/v1/models/{model}"), timeout=10).json()
    versions = [TWIN] + [v for m, v, _ in VARIANTS if m == model]
    assert family["default_version"] == max((v for v in versions if installed(model, v)), key=int), family
    if not os.path.exists(package):
        # make models judged it and left it out: the server says why and serves another version.
        reason = open(refusal).read().strip()
        assert f"{precision.upper()} variant failed its gate" in reason
        assert listed["status"] == "not_installed" and reason in listed["reason"], listed
        status, body = answer(default_server, model, variant, SAMPLES[0])
        assert status == 404 and "not installed on this machine" in body["error"]["message"], body
        assert family["default_version"] != variant, family
        assert requests.get(default_server.url("/health/ready"), timeout=10).status_code == 200
        pytest.skip(f"{model} version {variant} is not installed on this machine ({reason}); its refusal was checked")
    assert not os.path.exists(refusal)
    with open(os.path.join(os.path.dirname(os.path.realpath(package)), "gate.json")) as f:
        gates = json.load(f)
    assert gates["failed"] is None and quantize.gate(gates) is None and gates["precision"] == precision, gates
    assert listed["status"] == "ready", listed
    for path in SAMPLES:
        (a, fp32), (b, ours) = answer(default_server, model, TWIN, path), answer(default_server, model, variant, path)
        assert a == b == 200
        assert same_answers(fp32, ours), (path, fp32, ours)
    metadata = requests.get(default_server.url(f"/v2/models/{model}/versions/{variant}"), timeout=10).json()
    assert metadata["parameters"]["precision"] == precision
    config = requests.get(default_server.url(f"/v2/models/{model}/versions/{variant}/config"), timeout=10).json()
    assert config["parameters"]["precision"]["string_value"] == precision, config["parameters"]
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(default_server.grpc)
    answers = []
    for v in (TWIN, variant):
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([open(SAMPLES[0], "rb").read()], dtype=np.object_))
        result = client.infer(model, [tensor], model_version=v)
        scores = result.as_numpy("scores")[0]
        # The class of the top score, or the detections' classes: at score >= 0.5 for the twin,
        # >= 0.3 for the variant (a detection that slips just under 0.5 is still found).
        answers.append(int(np.argmax(scores)) if model == MODEL else
                       set(result.as_numpy("classes")[0][scores >= (0.5 if v == TWIN else 0.3)].tolist()))
    assert answers[0] == answers[1] if model == MODEL else answers[0] <= answers[1], answers
    assert f"precision=\"{precision}\"" in requests.get(default_server.url("/metrics"), timeout=10).text


def test_the_gates_run_on_a_test_classifier_and_refuse_what_fails(tmp_path):
    """models/aoti.py quantize on the test set's random-init resnet18: the INT8 package really
    calls quantized kernels (its FP32 twin's would fail the kernel gate), and a variant below
    its gates is not installed: no model.pt2, the reason written, exit status 1."""
    import shutil
    import subprocess
    import tomllib
    import aoti
    source = os.path.join(os.environ["VISIONSERVE_TEST_MODELS"], "aoti", "resnet18")
    config = open(os.path.join(source, "config.toml")).read()
    # One dynamic model per package (no batch-1 models): the compile is most of this test's time.
    fp32 = config + "\n[compile]\nbatch1_models = false\n"
    int8 = config + "\n[compile]\nbatch1_models = false\nprecision = \"int8\"\ntwin = \"1\"\ncalibration_crops = 32\n"
    for version, text in (("1", fp32), ("2", int8)):
        folder = tmp_path / "resnet18" / version
        folder.mkdir(parents=True)
        (folder / "config.toml").write_text(text)
        shutil.copy(os.path.join(source, "labels.txt"), folder / "labels.txt")
        os.symlink(os.path.join(source, "program.pt2"), folder / "program.pt2")
    cache = os.environ.get("VISIONSERVE_AOTI_CACHE") or str(tmp_path / "cache")
    folder = tmp_path / "resnet18" / "2"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "models", "aoti.py"), "quantize", "--folder", str(folder),
                          "--cache", cache, "--downloads", os.environ["VISIONSERVE_DOWNLOADS"]],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "INT8 version NOT installed" in run.stderr + run.stdout
    assert not os.path.exists(folder / "model.pt2")
    reason = (folder / "not-installed.txt").read_text()
    # Random weights are confident nowhere: the accuracy gate cannot be met.
    assert "failed its gate" in reason and "evaluation crops where FP32 is confident" in reason, reason
    packages = [os.path.join(root, "model.pt2") for root, _, files in os.walk(cache) if "gate.json" in files
                and os.path.basename(root).startswith("resnet18-v2-")]
    assert packages, f"no INT8 package with its gate report under {cache}"
    int8_package = max(packages, key=os.path.getmtime)
    report = json.load(open(os.path.join(os.path.dirname(int8_package), "gate.json")))
    assert report["kernels"].get("onednn_int8", 0) > 0, report["kernels"]
    with open(folder / "config.toml", "rb") as f:
        twin = aoti.twin_package(str(folder), tomllib.load(f), cache)
    silent = dict(report, kernels=aoti.package_kernels(twin))
    assert silent["kernels"].get("onednn_int8", 0) == 0
    assert "would run in FP32" in quantize.gate(silent), "a package that stayed FP32 fails the kernel gate"
