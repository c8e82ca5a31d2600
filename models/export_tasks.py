"""Exports the test models of the tasks past detection, as users bring them:

- `yolov8n_pose`: ultralytics' own YOLOv8n-pose (`yolov8n-pose.yaml`), exported by ultralytics'
  `model.export(format="torchscript")` exactly as a user's `yolo export` writes it, and dropped
  into a folder beside a config.toml. No pretrained checkpoint is reachable here, so its weights
  are random (seeded); its batch-norm statistics are measured on photos that ship with
  scikit-image and the class bias shifted so that about 1.5 % of anchors score above 0.5 — a
  random head otherwise scores every box 0.0008 and nothing could be compared.
- `yolov8n_seg`: ultralytics' YOLOv8n-seg (`yolov8n-seg.yaml`, COCO's 80 classes), exported and
  calibrated the same way: its answer is the head with 32 mask coefficients per anchor and the
  prototypes, which ultralytics' own predictor turns into masks (`process_mask`).
- `yolo26n_end2end`: ultralytics' YOLO26n (`yolo26n.yaml`), exported with `nms=False`, which keeps
  its NMS-free one-to-one head: `[N, 300, 6]`, the head's own picks, answered without NMS; and
  `yolo26n_seg_end2end`, `yolo26n_pose_end2end`, its -seg and -pose heads exported alike
  (`[N, 300, 6 + 32]` beside the prototypes, `[N, 300, 6 + 51]`).
- `yolov8n_cls`: ultralytics' YOLOv8n-cls (`yolov8n-cls.yaml`, ImageNet's 1000 classes), whose
  export answers softmax probabilities, served as a classifier.
- `yolov8n_obb`: ultralytics' YOLOv8n-obb (`yolov8n-obb.yaml`, DOTA's 15 classes): rotated boxes,
  `[N, 4 + C + 1, A]`, the angle last.
- `keypoint_rcnn_small`: torchvision's KeypointRCNN heads on the MobileNetV3-Large FPN backbone
  (torchvision builds no smaller Keypoint R-CNN), random init as the test set's Mask R-CNN.

Runs in the ultralytics environment (`make task-models`), which also sees torch and torchvision.
"""

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import torchvision_op_libraries, write_config, write_labels  # noqa: E402
from progress import reporter  # noqa: E402

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
progress = reporter("task-models")

# Photos for batch-norm statistics: scikit-image's, never the ones the tests send.
CALIBRATION = ["rocket", "hubble_deep_field", "immunohistochemistry", "retina", "coins", "page", "horse", "camera"]
YOLO_SIZE = 320


def calibration_batch(size):
    from skimage import data as skdata
    images = []
    for name in CALIBRATION:
        picture = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size), Image.BILINEAR)
        images.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def export_ultralytics(out, seed, yaml, name, task, labels, output, input=None, **export_args):
    """ultralytics' model built from `yaml` with as many classes as `labels`, its batch-norm
    statistics measured and its class bias shifted (see above), exported by ultralytics as a
    user's `yolo export` does (`export_args`: `nms=False` keeps an NMS-free head's end-to-end
    branch)."""
    from ultralytics import YOLO
    import ultralytics
    import yaml as pyyaml
    from ultralytics.nn.tasks import yaml_model_load
    # ultralytics' yamls say nc: 80 (1000 for -cls); the same yaml with the labels' count, under
    # the same file name (ultralytics reads the model scale, n, from it).
    spec = {k: v for k, v in yaml_model_load(yaml).items() if k not in ("yaml_file", "scale")}
    spec["nc"] = len(labels)
    work = os.path.join(out, f".ultralytics-work-{name}")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, yaml), "w") as f:
        pyyaml.safe_dump(spec, f, sort_keys=False)
    torch.manual_seed(seed)
    model = YOLO(os.path.join(work, yaml))
    net = model.model
    batch = calibration_batch(YOLO_SIZE)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()
    head = net.model[-1]
    if task == "classification":
        # A random classifier's softmax is flat (every class near 1/1000, the top five within
        # 1e-6 of each other); logits spread twenty-fold give it a clear top that a comparison
        # can hold to.
        with torch.no_grad():
            head.linear.weight *= 20
            head.linear.bias *= 20
    else:
        with torch.no_grad():
            scores = net(batch)
        while isinstance(scores, (tuple, list)):  # (head, extras): -seg heads nest a tuple
            scores = scores[0]
        scores = scores[:, 4:4 + head.nc].amax(1)
        shift = -torch.logit(scores.clamp(1e-6, 1 - 1e-6)).flatten().quantile(0.985).item()
        # NMS-free heads (YOLOv10, YOLO26) also have a one-to-one branch, the end-to-end one.
        with torch.no_grad():
            for branch in list(head.cv3) + list(getattr(head, "one2one_cv3", None) or []):
                branch[-1].bias += shift
    # ultralytics writes the export beside its source; the yaml-built model has none, so cwd.
    here = os.getcwd()
    os.chdir(work)
    try:
        exported = os.path.abspath(model.export(format="torchscript", imgsz=YOLO_SIZE, verbose=False, **export_args))
    finally:
        os.chdir(here)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(exported, os.path.join(folder, "model.torchscript"))
    write_labels(folder, labels)
    write_config(folder, {"task": task, "format": "torchscript", "file": "model.torchscript", "labels": "labels.txt"}, {
        "provenance": {"weights": f"random-init:seed={seed}", "source": f"ultralytics {ultralytics.__version__} {yaml} (nc={len(labels)}), yolo export format=torchscript",
                       "license": "AGPL-3.0", "parameter_count": sum(p.numel() for p in net.parameters())},
        "input": input or {"width": YOLO_SIZE, "height": YOLO_SIZE, "resize": "letterbox", "pad_value": 114,
                           "resize_filter": "opencv_linear"},
        "output": output,
        "batching": {"max_batch_size": 4, "max_delay_ms": 2, "queue_capacity": 64},
    })
    shutil.rmtree(work, ignore_errors=True)
    return folder


def export_yolov8_pose(out, seed):
    return export_ultralytics(out, seed, "yolov8n-pose.yaml", "yolov8n_pose", "keypoints", ["person"], {"convention": "yolov8"})


def coco_names():
    import yaml as pyyaml
    from ultralytics.utils import ROOT
    with open(ROOT / "cfg" / "datasets" / "coco.yaml") as f:
        names = pyyaml.safe_load(f)["names"]  # COCO's 80, as ultralytics' pretrained models name them
    return [names[i] for i in range(len(names))]


def export_yolo26_end2end(out, seed):
    return export_ultralytics(out, seed, "yolo26n.yaml", "yolo26n_end2end", "detection", coco_names(),
                              {"convention": "yolo_end2end"}, nms=False)


def export_yolo26_seg_end2end(out, seed):
    return export_ultralytics(out, seed, "yolo26n-seg.yaml", "yolo26n_seg_end2end", "instance_segmentation", coco_names(),
                              {"convention": "yolo_end2end"}, nms=False)


def export_yolo26_pose_end2end(out, seed):
    return export_ultralytics(out, seed, "yolo26n-pose.yaml", "yolo26n_pose_end2end", "keypoints", ["person"],
                              {"convention": "yolo_end2end"}, nms=False)


def export_yolov8_cls(out, seed):
    """ultralytics' classifier: its predictor resizes the shorter side to imgsz (torchvision's
    bilinear on a PIL image), crops the centre and scales to 0..1, no mean or std; the export
    answers softmax probabilities."""
    import yaml as pyyaml
    from ultralytics.utils import ROOT
    with open(ROOT / "cfg" / "datasets" / "ImageNet.yaml") as f:
        names = pyyaml.safe_load(f)["names"]
    return export_ultralytics(out, seed, "yolov8n-cls.yaml", "yolov8n_cls", "classification", [names[i] for i in range(len(names))],
                              {"convention": "logits", "softmax": False},
                              input={"width": YOLO_SIZE, "height": YOLO_SIZE, "resize": "shorter_side_center_crop",
                                     "resize_shorter": YOLO_SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})


def export_yolov8_obb(out, seed):
    import yaml as pyyaml
    from ultralytics.utils import ROOT
    with open(ROOT / "cfg" / "datasets" / "DOTAv1.yaml") as f:
        names = pyyaml.safe_load(f)["names"]  # DOTA's 15, as ultralytics' pretrained -obb names them
    return export_ultralytics(out, seed, "yolov8n-obb.yaml", "yolov8n_obb", "oriented_detection", [names[i] for i in range(len(names))],
                              {"convention": "yolov8"})


def export_yolov8_seg(out, seed):
    return export_ultralytics(out, seed, "yolov8n-seg.yaml", "yolov8n_seg", "instance_segmentation", coco_names(), {"convention": "yolov8"})


def small_keypoint_rcnn():
    """KeypointRCNN on the backbone and 320-pixel settings of fasterrcnn_mobilenet_v3_large_320_fpn,
    its keypoint head narrowed (4 convolutions of 64 channels, not 8 of 512: the full head costs
    about 5 GFLOP per detection) and at most 20 detections an image, so a test runs in seconds.
    Heatmaps, their decoding and the post-processing are torchvision's own."""
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    from torchvision.ops import misc as misc_nn_ops
    backbone = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    backbone = _mobilenet_extractor(backbone, True, 6)
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return KeypointRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors, min_size=320, max_size=640,
                        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150, rpn_score_thresh=0.05,
                        box_score_thresh=0.0, box_detections_per_img=20,
                        keypoint_head=KeypointRCNNHeads(backbone.out_channels, (64,) * 4),
                        keypoint_predictor=KeypointRCNNPredictor(64, 17))


def export_keypoint_rcnn(out, seed):
    torch.manual_seed(seed)
    model = small_keypoint_rcnn()
    torch.manual_seed(seed + 1)
    for module in model.backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="leaky_relu", a=0.5)
    model.eval()
    folder = os.path.join(out, "keypoint_rcnn_small")
    os.makedirs(folder, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(os.path.join(folder, "model.pt"))
    labels = list(torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
    write_labels(folder, labels)
    write_config(folder, {"task": "keypoints", "format": "torchscript", "file": "model.pt", "labels": "labels.txt"}, {
        "provenance": {"weights": f"random-init:seed={seed}",
                       "source": f"torchvision {torchvision.__version__} KeypointRCNN (MobileNetV3-Large FPN)",
                       "license": "BSD-3-Clause", "parameter_count": sum(p.numel() for p in model.parameters())},
        "input": {"width": 320, "height": 320, "resize": "original"},
        # torchvision's keypoint scores are heatmap logits: a point at 0 or above is drawn.
        "output": {"convention": "torchvision_detection", "keypoint_threshold": 0.0},
        "runtime": {"op_libraries": torchvision_op_libraries()},
        "batching": {"max_batch_size": 2, "max_delay_ms": 2, "queue_capacity": 64},
    })
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    exports = [("yolov8n_pose", export_yolov8_pose), ("yolov8n_seg", export_yolov8_seg),
               ("yolo26n_end2end", export_yolo26_end2end), ("yolo26n_seg_end2end", export_yolo26_seg_end2end),
               ("yolo26n_pose_end2end", export_yolo26_pose_end2end), ("yolov8n_cls", export_yolov8_cls),
               ("yolov8n_obb", export_yolov8_obb),
               ("keypoint_rcnn_small", export_keypoint_rcnn)]
    for i, (name, export) in enumerate(exports, 1):
        started = time.time()
        progress(f"({i}/{len(exports)}) exporting {name} ...")
        folder = export(args.out, args.seed)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        progress(f"{name}: {size / 1e6:.1f} MB in {time.time() - started:.1f} s")
    progress(f"done: {len(exports)} models in {args.out}")


if __name__ == "__main__":
    main()
