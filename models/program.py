"""Exported programs (portable, any machine): what models/convert_pretrained.py and
models/export.py write and models/aoti.py compiles.

`torch.export` with a dynamic batch dimension (and dynamic height and width for fully
convolutional models), saved with `torch.export.save` beside a record of how it was exported.
Kept apart from the compile step so that changing how packages are compiled (models/aoti.py)
does not change the key of the converted models (the Makefile hashes this file, not aoti.py).
"""
import hashlib
import json
import os
import sys

import torch

EXTRA_SPEC = "visionserve_export"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_program(model, example, max_batch, multiple=None, max_side=None):
    """Exports `model` (in eval mode) with batch sizes 1..max_batch; with `multiple`, height
    and width may be any multiple of it up to `max_side` (fully convolutional models)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dims = {0: batch}
    if multiple:
        blocks = max_side // multiple
        dims[2] = multiple * torch.export.Dim("height_blocks", min=1, max=blocks)
        dims[3] = multiple * torch.export.Dim("width_blocks", min=1, max=blocks)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))


def save_program(program, path, example, max_batch, multiple=None, max_side=None):
    """Saves the program with how it was exported (example shape, device, dynamic dimensions),
    which the compile step needs to export it again with size hints."""
    spec = {"example_shape": list(example.shape), "device": str(example.device), "max_batch": max_batch,
            "multiple": multiple, "max_side": max_side}
    tmp = path[:-len(".pt2")] + ".tmp.pt2" if path.endswith(".pt2") else path + ".tmp.pt2"
    torch.export.save(program, tmp, extra_files={EXTRA_SPEC: json.dumps(spec)})
    os.replace(tmp, path)


def load_program(path):
    extra = {EXTRA_SPEC: ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra[EXTRA_SPEC]:
        sys.exit(f"aoti: {path} was not saved by models/aoti.py (no '{EXTRA_SPEC}' record); export it with save_program")
    return program, json.loads(extra[EXTRA_SPEC])
