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
import contextlib
import hashlib
import json
import os
import re
import statistics
import sys
import time
import tomllib
import zipfile

import torch
from program import export_program, load_program, sha256
from progress import reporter

KEY_TORCH_VERSION = "visionserve.torch_version"
KEY_CPU_FLAGS = "visionserve.cpu_flags_sha256"
KEY_MAX_BATCH = "visionserve.max_batch"
KEY_PROGRAM = "visionserve.program_sha256"
# "fp32", "int8" or "bf16": the server refuses a package whose precision is not its config's.
KEY_PRECISION = "visionserve.precision"
# The package's batch-1 models by thread count, "1:batch1_t1,2:batch1_t2" (compile_package).
KEY_BATCH1 = "visionserve.batch1_models"
BATCH1_MODEL = "batch1"
# Off only to measure what freezing buys (VISIONSERVE_AOTI_FREEZE=0 with `compile`).
FREEZE = os.environ.get("VISIONSERVE_AOTI_FREEZE", "1") != "0"
# Calls in a package's generated wrapper, by kind (package_kernels).
KERNEL_PATTERNS = {
    "onednn_fp32": r"mkldnn__convolution_pointwise|mkldnn__linear_pointwise|mkl_linear|mkldnn_rnn",
    "onednn_int8": r"qconv\w*pointwise|qlinear\w*pointwise",
    # Every bfloat16 tensor the wrapper makes or checks: none in an FP32 package.
    "bf16": r"cached_torch_dtype_bfloat16",
}


progress = reporter("aoti")
HERE = os.path.dirname(os.path.abspath(__file__))
# Written into a version folder whose package was compiled but not installed (a failed gate):
# the server reports the version failed with this file's reason.
NOT_INSTALLED = "not-installed.txt"
# The precisions made from an FP32 twin and judged by models/quantize.py's gates.
VARIANTS = ("int8", "bf16")


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


def reexported(program_path):
    """The exported program and its export record. A loaded program has lost the size hints of
    its dynamic dimensions, which some lowerings (bilinear resizing) need: its module is
    exported again the way it was first exported."""
    program, spec = load_program(program_path)
    example = torch.zeros(spec["example_shape"], device=spec["device"])
    return export_program(program.module(), example, spec["max_batch"], spec["multiple"], spec["max_side"]), spec


def compile_package(program_path, package_path, pixels=None, batch1=True, variant=None, precision="fp32"):
    """Compiles an exported program for this machine, with the metadata the server checks.
    The device is the program's own: export on cuda:0 for a GPU package. `pixels` (the
    config's [input] table) says what values the model sees, for timing its batch-1 models.
    `variant`: the program's INT8 or BF16 version (models/quantize.py), compiled in its place,
    its `precision` recorded."""
    program, spec = reexported(program_path)
    example = torch.zeros(spec["example_shape"], device=spec["device"])
    if variant is not None:
        program = variant
    metadata = {
        KEY_TORCH_VERSION: torch.__version__,
        KEY_CPU_FLAGS: cpu_flags_digest(),
        KEY_MAX_BATCH: str(spec["max_batch"]),
        KEY_PROGRAM: sha256(program_path),
        KEY_PRECISION: precision,
    }
    files = {"model": compile_part(program, metadata)}
    tmp = package_path + ".tmp.pt2"
    from torch._inductor.package import package_aoti
    # More models in the same package for batch 1, with every size static, one per thread count
    # the server runs a forward at (1: the pool under load; all cores: a lone request). One
    # image at a time is what a lone request runs, and what the pool runs under load wherever
    # batching does not pay on the CPU (the server measures that at load). Static shapes let
    # Inductor and oneDNN specialise every kernel, but for the thread count they were compiled
    # at: the SSD's static model compiled at 2 threads took 47 ms at 1 thread, against 26 ms
    # compiled at 1 (the dynamic model: 32 ms). So each is compiled at its thread count, timed
    # against the dynamic model at that count, and kept only where it is at least 10 % faster
    # (make bench-cpu has the last word: models/README.md). Not for models whose height and
    # width are dynamic too.
    if batch1 and FREEZE and spec["max_batch"] > 1 and not spec["multiple"] and spec["device"] == "cpu":
        with torch.no_grad():
            static = torch.export.export(program.module(), (example[:1],))
        counts = sorted({1, torch.get_num_threads()})
        for threads in counts:
            files[f"{BATCH1_MODEL}_t{threads}"] = compile_part(static, dict(metadata, **{KEY_MAX_BATCH: "1"}), threads)
        package_aoti(tmp, files)
        kept = []
        for threads in counts:
            name = f"{BATCH1_MODEL}_t{threads}"
            static_ms, dynamic_ms = time_in_fresh_process((tmp, name), (tmp, "model"), list(example[:1].shape), threads,
                                                          pixels or {})
            keep = static_ms < 0.9 * dynamic_ms
            progress(f"batch-1 model for {threads} thread{'s' * (threads > 1)}: {static_ms:.1f} ms against "
                     f"{dynamic_ms:.1f} ms dynamic: {'kept' if keep else 'left out'}")
            if keep:
                kept.append(f"{threads}:{name}")
            else:
                del files[name]
        if kept:
            record_metadata(files["model"], {KEY_BATCH1: ",".join(kept)})
    package_aoti(tmp, files)
    os.replace(tmp, package_path)
    return spec["max_batch"]


def time_in_fresh_process(first, second, shape, threads, pixels):
    """time_one_image in a process of its own, as a server would run the packages: timed in the
    compiling process (its memory and thread pools churned by the compile) the SSD's dynamic
    model measured 31 ms at 2 threads, against 22 ms in make bench-cpu's clean workers.
    `first` and `second` are (package, model name); the name SERVING is the model the server
    runs one image on at `threads` (the package's batch-1 model for it, else the dynamic one)."""
    import json
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "time-one-image", "--first", ":".join(first),
                          "--second", ":".join(second), "--shape", ",".join(map(str, shape)), "--threads", str(threads),
                          "--pixels", json.dumps(pixels)], check=True, capture_output=True, text=True).stdout
    times = json.loads(out.strip().splitlines()[-1])
    return times["first_ms"], times["second_ms"]


SERVING = "serving"


def serving_model(package, threads):
    """The model of `package` the server runs one image on at `threads` (AotiModel::load)."""
    from torch._inductor.package import load_package
    listed = load_package(package, "model").get_metadata().get(KEY_BATCH1, "")
    by_threads = dict(entry.split(":", 1) for entry in listed.split(",") if entry)
    return by_threads.get(str(threads), "model")


def model_input(pixels, shape):
    """Random pixels scaled and normalised as the server feeds this model (the config's
    [input] scale, mean and std), so the timing sees values in the model's own range."""
    image = torch.randint(0, 256, shape).float() * pixels.get("scale", 1.0 / 255.0)
    if "mean" in pixels and "std" in pixels:
        image = (image - torch.tensor(pixels["mean"]).view(1, -1, 1, 1)) / torch.tensor(pixels["std"]).view(1, -1, 1, 1)
    return image


def time_one_image(first, second, image, threads, rounds=7, seconds=0.3):
    """Median time of one forward of `image` by two models, each (package, name), at `threads`,
    in interleaved rounds (a busy build machine slows both alike)."""
    from torch._inductor.package import load_package
    models = [load_package(package, serving_model(package, threads) if name == SERVING else name)
              for package, name in (first, second)]
    samples = [[], []]
    with torch.no_grad(), threads_set(threads):
        for _ in range(rounds):
            for model, times in zip(models, samples):
                model(image)
                calls, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    model(image)
                    calls += 1
                times.append((time.perf_counter() - started) / calls)
    return tuple(statistics.median(times) * 1000 for times in samples)


def record_metadata(files, entries):
    """Adds entries to a compiled model's metadata (the JSON files the package loader reads)."""
    import json
    for path in files:
        if isinstance(path, str) and path.endswith("_metadata.json"):
            with open(path) as f:
                metadata = json.load(f)
            metadata.update(entries)
            with open(path, "w") as f:
                json.dump(metadata, f)


def compile_part(program, metadata, threads=None):
    """One model of a package: its compiled files, for package_aoti. With `threads`, compiled
    for that many threads (Inductor's loops and oneDNN's packed weights are chosen for it)."""
    # The server turns on the package's input checks (shape, dtype, upper bounds). Their lower
    # bound is left out: export reasons about a dynamic size as at least 2 (0/1 specialisation),
    # so the check would refuse batch 1 and single-block heights, which run correctly (the
    # parity tests run both).
    # Freezing: the weights become constants of the graph, so Inductor folds them (batch norms
    # into convolutions) and calls oneDNN's fused convolution and linear kernels on weights packed
    # once at load, instead of generated C++ loops. Measured by `make bench-cpu` (BENCHMARKS.md);
    # the packed layout is this CPU's, which the package's CPU-flags key already pins. Freezing
    # needs no_grad: with autograd on, Inductor keeps the weights as parameters.
    options = {"aot_inductor.metadata": metadata, "aot_inductor.check_lowerbound": False, "freezing": FREEZE,
               "aot_inductor.package": True}
    with threads_set(threads or torch.get_num_threads()):
        return compile_with_fallback(program, options)


@contextlib.contextmanager
def threads_set(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compile_with_fallback(program, options):
    # As aoti_compile_and_package does it, one model at a time (its documented way to put
    # several models in one package).
    module = program.module(check_guards=False)
    args, kwargs = program.example_inputs
    with torch.no_grad():
        try:
            return torch._inductor.aot_compile(module, args, kwargs, options=dict(options))
        except Exception as error:
            if not FREEZE:
                raise
            # Seen with torch 2.13 on the text detector: the freezing pass that folds an add into
            # the convolution before it sizes the new bias from weight.shape[0], which for a
            # transposed convolution is its input channels ("expected bias to be 1-dimensional
            # with 1 elements, but got bias of size [24]"). Frozen without that one pass, the
            # package still gets oneDNN's kernels; only that add stays a separate step.
            progress(f"frozen compile failed ({str(error).splitlines()[0][:160]}); again without Inductor's "
                     "binary folding pass")
            with binary_folding_off():
                return torch._inductor.aot_compile(module, args, kwargs, options=dict(options))


@contextlib.contextmanager
def binary_folding_off():
    """Inductor's freezing without its conv/linear binary folding pass (a private pass object:
    its apply() is what freezing_passes calls until the graph stops changing)."""
    from torch._inductor.fx_passes import freezing_patterns
    folding = freezing_patterns.binary_folding_pass
    folding.apply = lambda graph: 0
    try:
        yield
    finally:
        del folding.apply


def package_kernels(package_path):
    """How many calls of each kind of library kernel the package's generated wrapper makes: the
    proof of what really runs (a frozen CPU package calls oneDNN; an unfrozen one only loops)."""
    counts = {}
    with zipfile.ZipFile(package_path) as package:
        for name in package.namelist():
            if name.endswith(".cpp") and "wrapper" in os.path.basename(name):
                source = package.read(name).decode("utf-8", "replace")
                for kind, pattern in KERNEL_PATTERNS.items():
                    counts[kind] = counts.get(kind, 0) + len(re.findall(pattern, source))
    return counts


def cache_folder(cache):
    cpu = cpu_flags_digest()[:12] or "unknown-cpu"
    return os.path.join(cache, f"torch{torch.__version__.split('+')[0]}-cpu{cpu}")


def compile_cached(program_path, cache, name, pixels=None, batch1=True):
    """The compiled package for this program on this machine, compiled on first use."""
    # This script's own checksum too: how it compiles is part of what the package is.
    key = f"{sha256(program_path)[:16]}-{sha256(os.path.abspath(__file__))[:8]}" + ("" if FREEZE else "-unfrozen") + ("" if batch1 else "-nobatch1")
    folder = os.path.join(cache_folder(cache), f"{name}-{key}")
    package = os.path.join(folder, "model.pt2")
    if os.path.exists(package):
        progress(f"{name}: cached package {package}")
        return package
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    progress(f"{name}: compiling {program_path} for this machine (a minute or more on 2 cores) ...")
    max_batch = compile_package(program_path, package, pixels, batch1)
    kernels = ", ".join(f"{n} {kind}" for kind, n in package_kernels(package).items() if n) or "no library kernels"
    progress(f"{name}: {os.path.getsize(package) / 1e6:.1f} MB, batch 1..{max_batch}, calls {kernels}, "
             f"{time.time() - started:.0f} s")
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


def twin_package(folder, config, cache):
    """The FP32 twin's package for an INT8 or BF16 version (`[compile] twin` names its version folder),
    compiled as its own folder would be (so it is the cached package that folder links)."""
    twin = str(config.get("compile", {}).get("twin", ""))
    twin_folder = os.path.join(os.path.dirname(folder), twin)
    path = os.path.join(twin_folder, "program.pt2")
    if not twin or not os.path.exists(path):
        sys.exit(f"aoti: {folder} has precision = \"{config.get('compile', {}).get('precision')}\" but no [compile] "
                 f"twin = \"<version>\" with a program.pt2 (looked for {path})")
    with open(os.path.join(twin_folder, "config.toml"), "rb") as f:
        twin_config = tomllib.load(f)
    name = f"{os.path.basename(os.path.dirname(folder))}-v{twin}"
    return compile_cached(os.path.realpath(path), cache, name, twin_config.get("input", {}),
                          twin_config.get("compile", {}).get("batch1_models", True))


def compile_variant_cached(program_path, twin_package, cache, name, config, downloads, calibration_folder=None):
    """The INT8 or BF16 package for this program on this machine and its gate report,
    converted, compiled and judged on first use (models/quantize.py)."""
    import quantize
    precision = config["compile"]["precision"]
    crops_n = int(config.get("compile", {}).get("calibration_crops", 512))
    # What the quantization depends on: the script, and the config's [compile] and [input].
    recipe = json.dumps([config.get("compile", {}), config.get("input", {})], sort_keys=True)
    calibration_key = sha256(os.path.join(HERE, "quantize.py"))[:8] + "-" + hashlib.sha256(recipe.encode()).hexdigest()[:8]
    if calibration_folder:
        listing = "\n".join(sorted(f"{n} {os.path.getsize(os.path.join(calibration_folder, n))}" for n in os.listdir(calibration_folder)))
        calibration_key += "-" + hashlib.sha256(listing.encode()).hexdigest()[:8]
    key = f"{sha256(program_path)[:16]}-{sha256(os.path.abspath(__file__))[:8]}-{precision}-{calibration_key}"
    folder = os.path.join(cache_folder(cache), f"{name}-{key}")
    package, report_path = os.path.join(folder, "model.pt2"), os.path.join(folder, "gate.json")
    if os.path.exists(package) and os.path.exists(report_path):
        progress(f"{name}: cached {precision.upper()} package {package}")
        with open(report_path) as f:
            return package, json.load(f)
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    pixels = config.get("input", {})
    size = (pixels["width"], pixels["height"])
    # The accuracy gates there are: top-1 agreement (classification) and matched boxes (a
    # detector with boxes and per-class scores out); INT8 for classification only (the SSD needs
    # graph surgery before the quantizer sees it: ../shared/docs/cpu-speed-facts.md).
    detector = config.get("task") == "detection" and config.get("output", {}).get("convention") == "boxes_scores"
    if not (config.get("task") == "classification" or (detector and precision == "bf16")):
        sys.exit(f"aoti: {name}: {precision.upper()} versions have an accuracy gate for classification"
                 f"{' and boxes_scores detectors' if precision == 'bf16' else ''} only so far "
                 f"(task = \"{config.get('task')}\")")
    program, spec = reexported(program_path)
    options = config.get("compile", {})
    if precision == "bf16":
        variant = quantize.to_bf16(program, spec)
    else:
        calibration = quantize.crops(quantize.calibration_photos(calibration_folder), crops_n, quantize.CALIBRATION_SEED,
                                     pixels, size)
        variant = quantize.quantize(program, spec, calibration,
                                    first=int(options.get("fp32_first_layers", quantize.FP32_FIRST_LAYERS)),
                                    last=int(options.get("fp32_last_layers", quantize.FP32_LAST_LAYERS)))
    progress(f"{name}: compiling the {precision.upper()} program for this machine ...")
    compile_package(program_path, package, pixels, options.get("batch1_models", True), variant, precision)
    progress(f"{name}: judging the {precision.upper()} package against its FP32 program on held-apart photos ...")
    evaluation = quantize.crops(quantize.evaluation_photos(downloads), quantize.EVALUATION_CROPS,
                                quantize.EVALUATION_SEED, pixels, size)
    shape = [1, 3, size[1], size[0]]
    threads = max(1, os.cpu_count() or 1)
    speed = {"threads": threads}
    for count, label in ((1, "1_thread"), (threads, "all_threads")):
        variant_ms, fp32_ms = time_in_fresh_process((package, SERVING), (twin_package, SERVING), shape, count, pixels)
        speed.update({f"variant_ms_{label}": variant_ms, f"fp32_ms_{label}": fp32_ms, f"speedup_{label}": fp32_ms / variant_ms})
    batch = min(8, spec["max_batch"])
    if detector:
        accuracy = quantize.box_accuracy(program.module(), package, evaluation, batch,
                                         config.get("output", {}).get("background_class"))
    else:
        accuracy = quantize.accuracy(program.module(), package, evaluation, batch)
    report = {"precision": precision, "accuracy": accuracy, "speed": speed,
              "kernels": package_kernels(package), "cpu": quantize.cpu_support(),
              "compile_s": round(time.time() - started)}
    report["failed"] = quantize.gate(report)
    quantize.save_report(report_path, report)
    return package, report


def link(package, target):
    if os.path.islink(target) or os.path.exists(target):
        os.remove(target)
    if package:
        os.symlink(package, target)


def install_variant(name, folder, config, cache, downloads, calibration_folder=None):
    """Converts, compiles and judges an INT8 or BF16 version folder; links its package in when
    it passes its gates, else writes NOT_INSTALLED with the reason. True when installed."""
    import quantize
    precision = config["compile"]["precision"].upper()
    program = os.path.realpath(os.path.join(folder, "program.pt2"))
    target = os.path.join(folder, config.get("file", "model.pt2"))
    refusal = os.path.join(folder, NOT_INSTALLED)
    twin = twin_package(folder, config, cache)

    def refuse(reason, detail=""):
        progress(f"{name}: {precision} version NOT installed: {reason}{detail}")
        link(None, target)
        with open(refusal, "w") as f:
            f.write(f"{precision} variant failed its gate on this machine: {reason}\n")
        return False

    try:
        package, report = compile_variant_cached(program, twin, cache, name, config, downloads, calibration_folder)
    except Exception as error:
        # A variant this machine's torch cannot convert or compile (an operator without a
        # bfloat16 or quantized kernel on this CPU) is a variant not installed, not a failed
        # build: the FP32 versions serve as before.
        return refuse(f"could not be built on this machine: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    if report["failed"]:
        return refuse(report["failed"], f" ({quantize.describe(report)})")
    progress(f"{name}: {precision} version installed: {quantize.describe(report)}")
    if os.path.exists(refusal):
        os.remove(refusal)
    link(package, target)
    return True


def compile_repo(repo, cache, downloads):
    found = list(aoti_folders(repo))
    for i, (name, folder, config) in enumerate(found, 1):
        program = os.path.join(folder, "program.pt2")
        if not os.path.exists(program):
            sys.exit(f"aoti: {folder} is format = \"aoti\" but has no program.pt2 to compile")
        progress(f"({i}/{len(found)}) {name}")
        options = config.get("compile", {})
        if options.get("precision", "fp32") in VARIANTS:
            install_variant(name, folder, config, cache, downloads)
            continue
        package = compile_cached(os.path.realpath(program), cache, name, config.get("input", {}),
                                 options.get("batch1_models", True))
        link(package, os.path.join(folder, config.get("file", "model.pt2")))
    progress(f"{len(found)} packages ready in {repo}")


def quantize_folder(folder, cache, downloads, calibration_folder):
    """`make quantize`: one version folder with `[compile] precision = "int8"` or "bf16" (its
    program.pt2 the twin's, or linked by you), an INT8 one calibrated on your photos when given."""
    folder = os.path.abspath(folder.rstrip("/"))
    with open(os.path.join(folder, "config.toml"), "rb") as f:
        config = tomllib.load(f)
    if config.get("compile", {}).get("precision") not in VARIANTS or not config.get("compile", {}).get("twin"):
        sys.exit(f"aoti: {folder}/config.toml needs [compile] precision = \"int8\" (or \"bf16\") and "
                 "twin = \"<FP32 version>\"")
    program = os.path.join(folder, "program.pt2")
    if not os.path.exists(program):
        twin = os.path.join(os.path.dirname(folder), str(config["compile"]["twin"]), "program.pt2")
        if not os.path.exists(twin):
            sys.exit(f"aoti: neither {program} nor the twin's {twin} exists: export the FP32 program first")
        os.symlink(os.path.realpath(twin), program)
    name = f"{os.path.basename(os.path.dirname(folder))}-v{os.path.basename(folder)}"
    sys.exit(0 if install_variant(name, folder, config, cache, downloads, calibration_folder) else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("compile", help="compile one exported program into a package")
    one.add_argument("--program", required=True)
    one.add_argument("--out", required=True)
    many = commands.add_parser("compile-repo", help="compile every format = \"aoti\" model of a repository")
    many.add_argument("--repo", required=True)
    many.add_argument("--cache", required=True)
    many.add_argument("--downloads", default=os.path.expanduser("~/.cache/visionserve/downloads"),
                      help="where the INT8 gate's evaluation photos are fetched to")
    int8 = commands.add_parser("quantize", help="make one version folder's INT8 or BF16 package, installed past its gates")
    int8.add_argument("--folder", required=True, help="a version folder whose config has [compile] precision = \"int8\" "
                      "or \"bf16\"")
    int8.add_argument("--cache", required=True)
    int8.add_argument("--downloads", default=os.path.expanduser("~/.cache/visionserve/downloads"))
    int8.add_argument("--calibration", help="a folder of your own photos (.jpg, .png) to calibrate on")
    timing = commands.add_parser("time-one-image", help="(internal) two models' forward of one image, PACKAGE:MODEL each")
    timing.add_argument("--first", required=True)
    timing.add_argument("--second", required=True)
    timing.add_argument("--shape", required=True)
    timing.add_argument("--threads", type=int, required=True)
    timing.add_argument("--pixels", default="{}")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.command == "time-one-image":
        import json
        image = model_input(json.loads(args.pixels), [int(n) for n in args.shape.split(",")])
        first, second = (tuple(arg.rsplit(":", 1)) for arg in (args.first, args.second))
        first_ms, second_ms = time_one_image(first, second, image, args.threads)
        print(json.dumps({"first_ms": first_ms, "second_ms": second_ms}))
    elif args.command == "compile":
        started = time.time()
        max_batch = compile_package(args.program, args.out)
        progress(f"wrote {args.out} (batch 1..{max_batch}) in {time.time() - started:.0f} s")
    elif args.command == "quantize":
        quantize_folder(args.folder, args.cache, args.downloads, args.calibration)
    else:
        compile_repo(args.repo, args.cache, args.downloads)


if __name__ == "__main__":
    main()
