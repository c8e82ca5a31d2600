"""AOTInductor packages (.pt2) for visionserve: export once, compile on the serving machine.

Two steps, because they have different keys:

1. export (portable): `torch.export.export` with a dynamic batch dimension (and dynamic height
   and width for fully convolutional models), saved with `torch.export.save` as `program.pt2`.
   Done by models/convert_pretrained.py and models/export.py, or by you (see models/README.md).
2. compile (this machine only): `torch._inductor.aoti_compile_and_package` turns the program
   into machine code for this torch version and this CPU. The package carries metadata the
   server checks before loading it: torch version, a digest of the CPU flags, the batch bound.

    python models/aoti.py compile --program program.pt2 --out model.pt2
    python models/aoti.py compile-repo --repo models --cache ~/.cache/visionserve/aoti

`compile-repo` finds every `<model>/[<version>/]config.toml` with `format = "aoti"` next to a
`program.pt2`, compiles it once into CACHE/<torch>-<cpu>/<name>-<program sha>/model.pt2 and
links it as the folder's `model.pt2`; a cached package is reused (seconds, not minutes).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import tomllib

import torch
from progress import reporter

KEY_TORCH_VERSION = "visionserve.torch_version"
KEY_CPU_FLAGS = "visionserve.cpu_flags_sha256"
KEY_MAX_BATCH = "visionserve.max_batch"
KEY_PROGRAM = "visionserve.program_sha256"
EXTRA_SPEC = "visionserve_export"


progress = reporter("aoti")


def cpu_flags_digest(cpuinfo_path="/proc/cpuinfo"):
    """SHA-256 of the first `flags` line's words, sorted: the digest the server computes."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = sorted(line.split(":", 1)[1].split())
                    return hashlib.sha256(" ".join(flags).encode()).hexdigest()
    except OSError:
        pass
    return ""


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


def compile_package(program_path, package_path):
    """Compiles an exported program for this machine, with the metadata the server checks.
    The device is the program's own: export on cuda:0 for a GPU package."""
    program, spec = load_program(program_path)
    # A loaded program has lost the size hints of its dynamic dimensions, which some lowerings
    # (bilinear resizing) need: export its module again the way it was first exported.
    example = torch.zeros(spec["example_shape"], device=spec["device"])
    program = export_program(program.module(), example, spec["max_batch"], spec["multiple"], spec["max_side"])
    metadata = {
        KEY_TORCH_VERSION: torch.__version__,
        KEY_CPU_FLAGS: cpu_flags_digest(),
        KEY_MAX_BATCH: str(spec["max_batch"]),
        KEY_PROGRAM: sha256(program_path),
    }
    tmp = package_path + ".tmp.pt2"
    # The server turns on the package's input checks (shape, dtype, upper bounds). Their lower
    # bound is left out: export reasons about a dynamic size as at least 2 (0/1 specialisation),
    # so the check would refuse batch 1 and single-block heights, which run correctly (the
    # parity tests run both).
    torch._inductor.aoti_compile_and_package(
        program, package_path=tmp,
        inductor_configs={"aot_inductor.metadata": metadata, "aot_inductor.check_lowerbound": False})
    os.replace(tmp, package_path)
    return spec["max_batch"]


def cache_folder(cache):
    cpu = cpu_flags_digest()[:12] or "unknown-cpu"
    return os.path.join(cache, f"torch{torch.__version__.split('+')[0]}-cpu{cpu}")


def compile_cached(program_path, cache, name):
    """The compiled package for this program on this machine, compiled on first use."""
    # This script's own checksum too: how it compiles is part of what the package is.
    key = f"{sha256(program_path)[:16]}-{sha256(os.path.abspath(__file__))[:8]}"
    folder = os.path.join(cache_folder(cache), f"{name}-{key}")
    package = os.path.join(folder, "model.pt2")
    if os.path.exists(package):
        progress(f"{name}: cached package {package}")
        return package
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    progress(f"{name}: compiling {program_path} for this machine (a minute or more on 2 cores) ...")
    max_batch = compile_package(program_path, package)
    progress(f"{name}: {os.path.getsize(package) / 1e6:.1f} MB, batch 1..{max_batch}, {time.time() - started:.0f} s")
    return package


def aoti_folders(repo):
    """(name, folder) of every model version in `repo` whose config says format = "aoti"."""
    for entry in sorted(os.listdir(repo)):
        top = os.path.join(repo, entry)
        if not os.path.isdir(top):
            continue
        candidates = [top] + [os.path.join(top, v) for v in sorted(os.listdir(top)) if v.isdigit()]
        for folder in candidates:
            config_path = os.path.join(folder, "config.toml")
            if not os.path.isfile(config_path):
                continue
            with open(config_path, "rb") as f:
                config = tomllib.load(f)
            if config.get("format") == "aoti":
                version = os.path.basename(folder) if folder != top else ""
                yield (f"{entry}-v{version}" if version else entry), folder, config


def compile_repo(repo, cache):
    found = list(aoti_folders(repo))
    for i, (name, folder, config) in enumerate(found, 1):
        program = os.path.join(folder, "program.pt2")
        if not os.path.exists(program):
            sys.exit(f"aoti: {folder} is format = \"aoti\" but has no program.pt2 to compile")
        progress(f"({i}/{len(found)}) {name}")
        package = compile_cached(os.path.realpath(program), cache, name)
        target = os.path.join(folder, config.get("file", "model.pt2"))
        if os.path.islink(target) or os.path.exists(target):
            os.remove(target)
        os.symlink(package, target)
    progress(f"{len(found)} packages ready in {repo}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("compile", help="compile one exported program into a package")
    one.add_argument("--program", required=True)
    one.add_argument("--out", required=True)
    many = commands.add_parser("compile-repo", help="compile every format = \"aoti\" model of a repository")
    many.add_argument("--repo", required=True)
    many.add_argument("--cache", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.command == "compile":
        started = time.time()
        max_batch = compile_package(args.program, args.out)
        progress(f"wrote {args.out} (batch 1..{max_batch}) in {time.time() - started:.0f} s")
    else:
        compile_repo(args.repo, args.cache)


if __name__ == "__main__":
    main()
