"""`make bench-cpu`: the forward pass alone, visionserve's model versions beside ONNX Runtime and
OpenVINO on the same models, same machine, same run.

Method (as in ../shared/docs/cpu-speed-facts.md): real photos preprocessed beforehand as the
server does (one tensor file per model), forward only, dynamic-batch models. Three settings:
  "2 x 1 b1"  two processes of one thread each, started together, batch 1, images/s summed;
  "2 x 1 b8"  the same at batch 8 (what the server's pool runs under load: 2 workers x 1 thread);
  "1 x 2"     one process, two threads, batch 1, one image at a time: p50 latency.
Each setting runs ROUNDS interleaved rounds of SECONDS (every variant once per round, so a
noisy minute hits them all); the table gives medians.

Two environments, never mixed: this orchestrator, ONNX Runtime and OpenVINO run in the bench's
own virtual environment (scripts/bench-cpu.requirements); torch workers (TorchScript, AOTI)
and the ONNX export run in the server's Python (--torch-python). Appends a table to
BENCHMARKS.md and draws docs/bench/cpu.png.

    python scripts/bench-cpu.py --torch-python PY --repo models [--seconds 5 --rounds 3]
    python scripts/bench-cpu.py --torch-python PY --repo models --extra mobilenet_v2=aoti:/path/model.pt2:label
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHOTOS = [os.path.join(ROOT, "assets", "samples", name) for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
MODELS = ("mobilenet_v2", "ssd_mobilenet_v2_coco")
SETTINGS = (("2 x 1 b1", 2, 1, 1), ("2 x 1 b8", 2, 1, 8), ("1 x 2", 1, 2, 1))
TORCH_RUNTIMES = ("torchscript", "aoti")


def progress(message):
    print(f"[bench-cpu] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs (bench environment)

def preprocess(config, photos):
    """The server's preprocessing for the two input layouts the default models use."""
    import numpy as np
    from PIL import Image
    inputs = config["input"]
    w, h = inputs["width"], inputs["height"]
    tensors = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        if inputs["resize"] == "shorter_side_center_crop":
            shorter = inputs["resize_shorter"]
            scale = shorter / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) * inputs.get("scale", 1.0 / 255.0)  # the server's default scale
        if "mean" in inputs:
            pixels = (pixels - np.array(inputs["mean"], np.float32)) / np.array(inputs["std"], np.float32)
        tensors.append(pixels.transpose(2, 0, 1))
    # Eight distinct images so batch 8 is eight real photos (the three, flipped and shifted).
    variants = []
    for i in range(8):
        t = tensors[i % len(tensors)]
        t = t[:, :, ::-1] if (i // len(tensors)) % 2 else t
        variants.append(np.ascontiguousarray(t, dtype=np.float32))
    return np.stack(variants)


# ---------------------------------------------------------------- workers (either environment)

def load_runner(runtime, path, threads):
    """A callable numpy [N,3,H,W] float32 -> first output as numpy, for one runtime."""
    if runtime in TORCH_RUNTIMES:
        import torch
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        if runtime == "torchscript":
            module = torch.jit.load(path).eval()
        else:
            # As the server runs a package: one-image batches on its batch-1 model compiled for
            # this thread count, if it has one.
            from torch._inductor.package import load_package
            dynamic = load_package(path, "model")
            listed = dict(entry.split(":", 1) for entry in
                          dynamic.get_metadata().get("visionserve.batch1_models", "").split(",") if entry)
            batch1 = load_package(path, listed[str(threads)]) if str(threads) in listed else dynamic

            def module(x):
                return batch1(x) if x.shape[0] == 1 else dynamic(x)

        def run(x):
            out = module(torch.from_numpy(x))
            out = out[0] if isinstance(out, (list, tuple)) else out
            return out.numpy()
        return run
    if runtime == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if runtime == "openvino":
        import openvino as ov
        core = ov.Core()
        # FP32 on every CPU: OpenVINO's default precision is BF16 where the CPU has it.
        # Pinning off: two one-thread processes would otherwise both pin themselves to core 0.
        compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                   "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                   "ENABLE_CPU_PINNING": False})
        request = compiled.create_infer_request()

        def run(x):
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()
        return run
    raise SystemExit(f"unknown runtime {runtime}")


def worker(args):
    import numpy as np
    images = np.load(args.inputs)
    run = load_runner(args.runtime, args.model, args.threads)
    batch = np.ascontiguousarray(images[:args.batch])
    for _ in range(3):
        run(batch)
    print("ready", flush=True)
    sys.stdin.readline()  # the orchestrator says go to every worker of a setting at once
    latencies, done = [], 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        t = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t)
        done += args.batch
    elapsed = time.perf_counter() - started
    print(json.dumps({"images_per_s": done / elapsed, "p50_ms": 1000 * statistics.median(latencies)}), flush=True)


def reference_output(args):
    import numpy as np
    images = np.load(args.inputs)
    np.save(args.out, load_runner(args.runtime, args.model, 2)(np.ascontiguousarray(images[:2])))


# ---------------------------------------------------------------- ONNX export (torch environment)

def export_onnx(args):
    """ONNX from the same exported program the AOTI package is compiled from, dynamic batch."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "models"))
    from program import load_program
    program, spec = load_program(args.program)
    example = torch.rand(spec["example_shape"])
    # Traced first: the exporter that needs no extra package (onnxscript) takes a TorchScript
    # module, and an exported program's module refuses the eval() it calls.
    with torch.no_grad():
        traced = torch.jit.trace(program.module(), (example,), strict=False)
        outputs = traced(example)
    count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
    names = [f"output{i}" for i in range(count)]
    torch.onnx.export(traced, (example,), args.out, dynamo=False, opset_version=17, input_names=["image"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image"] + names})


# ---------------------------------------------------------------- orchestration (bench environment)

def run_setting(python, variant, inputs, processes, threads, batch, seconds):
    runtime, path = variant["runtime"], variant["path"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    workers = [subprocess.Popen([python, __file__, "worker", "--runtime", runtime, "--model", path, "--inputs", inputs,
                                 "--threads", str(threads), "--batch", str(batch), "--seconds", str(seconds)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(processes)]
    for w in workers:
        line = w.stdout.readline()
        if line.strip() != "ready":
            for other in workers:
                other.kill()
            raise SystemExit(f"bench-cpu: {variant['label']} worker failed to start ({line.strip()!r})")
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    results = [json.loads(w.stdout.readline()) for w in workers]
    for w in workers:
        w.wait()
    return {"images_per_s": sum(r["images_per_s"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results)}


def variants_for(name, repo, work, torch_python, extra):
    import tomllib
    found = []
    for version in sorted(os.listdir(os.path.join(repo, name))):
        folder = os.path.join(repo, name, version)
        config_path = os.path.join(folder, "config.toml")
        if not version.isdigit() or not os.path.isfile(config_path):
            continue
        with open(config_path, "rb") as f:
            config = tomllib.load(f)
        runtime = "aoti" if config.get("format") == "aoti" else "torchscript"
        path = os.path.join(folder, config.get("file", "model.pt2" if runtime == "aoti" else "model.pt"))
        precision = config.get("compile", {}).get("precision", "fp32")
        if not os.path.exists(path):
            # An INT8 or BF16 version that failed its gates on this machine (make models says why).
            why = os.path.join(folder, "not-installed.txt")
            progress(f"{name} v{version}: not installed, left out: "
                     f"{open(why).read().strip() if os.path.exists(why) else 'no ' + path}")
            continue
        kind = "AOTInductor" if runtime == "aoti" else "TorchScript"
        found.append({"label": f"visionserve v{version} ({kind}{'' if precision == 'fp32' else ' ' + precision.upper()})",
                      "runtime": runtime, "path": os.path.realpath(path), "python": torch_python, "config": config,
                      "precision": precision})
    for spec in extra:
        model, rest = spec.split("=", 1)
        runtime, path, label = rest.split(":", 2)
        if model == name:
            found.append({"label": label, "runtime": runtime, "path": path, "python": torch_python})
    program = next((os.path.join(repo, name, v, "program.pt2") for v in sorted(os.listdir(os.path.join(repo, name)))
                    if os.path.exists(os.path.join(repo, name, v, "program.pt2"))), None)
    if program:
        onnx_path = os.path.join(work, f"{name}.onnx")
        progress(f"{name}: exporting ONNX from {program}")
        subprocess.run([torch_python, __file__, "export-onnx", "--program", program, "--out", onnx_path], check=True)
        found.append({"label": "ONNX Runtime FP32", "runtime": "onnxruntime", "path": onnx_path, "python": sys.executable})
        found.append({"label": "OpenVINO FP32", "runtime": "openvino", "path": onnx_path, "python": sys.executable})
    return found


def check_parity(name, variants, inputs, work):
    """Every variant's first output on two photos against the first variant's: the same model."""
    import numpy as np
    outputs = []
    for i, v in enumerate(variants):
        out = os.path.join(work, f"{name}-{i}-out.npy")
        subprocess.run([v["python"], __file__, "reference", "--runtime", v["runtime"], "--model", v["path"],
                        "--inputs", inputs, "--out", out], check=True)
        outputs.append(np.load(out))
    for v, out in zip(variants[1:], outputs[1:]):
        diff = float(np.abs(out - outputs[0]).max())
        v["max_abs_diff"] = diff
        if v.get("precision", "fp32") != "fp32":
            # Not the same numbers by design: the same top-1 on the sample photos (the build's
            # gate judged it on many more crops).
            if (out.reshape(len(out), -1).argmax(-1) != outputs[0].reshape(len(out), -1).argmax(-1)).any():
                raise SystemExit(f"bench-cpu: {name}: {v['label']} answers another top-1 than {variants[0]['label']}")
        elif diff > 1e-2:
            raise SystemExit(f"bench-cpu: {name}: {v['label']} differs from {variants[0]['label']} by {diff}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    return ", ".join(w for w in wanted if w in flags) or "no AVX2"


def orchestrate(args):
    import numpy as np
    work = tempfile.mkdtemp(prefix="bench-cpu-")
    table = {}
    for name in MODELS:
        variants = variants_for(name, args.repo, work, args.torch_python, args.extra)
        config = next(v["config"] for v in variants if "config" in v)
        inputs = os.path.join(work, f"{name}-inputs.npy")
        np.save(inputs, preprocess(config, PHOTOS))
        check_parity(name, variants, inputs, work)
        runs = {(v["label"], s[0]): [] for v in variants for s in SETTINGS}
        total = args.rounds * len(SETTINGS) * len(variants)
        step = 0
        for r in range(args.rounds):
            for setting, processes, threads, batch in SETTINGS:
                for v in variants:
                    step += 1
                    result = run_setting(v["python"], v, inputs, processes, threads, batch, args.seconds)
                    runs[(v["label"], setting)].append(result)
                    progress(f"{name} [{step}/{total}] round {r + 1} {setting:9} {v['label']:40} "
                             f"{result['images_per_s']:7.1f} img/s  p50 {result['p50_ms']:6.1f} ms")
        table[name] = (variants, {k: {"images_per_s": statistics.median(x["images_per_s"] for x in xs),
                                      "p50_ms": statistics.median(x["p50_ms"] for x in xs)} for k, xs in runs.items()})
    report = render(table, args)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + report)
    if args.chart:
        draw(table, args.chart)
        progress(f"chart: {args.chart}")


def render(table, args):
    lines = [f"## CPU forward pass: visionserve beside ONNX Runtime and OpenVINO (run of {time.strftime('%Y-%m-%d %H:%M')}, `make bench-cpu`)",
             "", f"{cpu_name()} ({cpu_features()}), {os.cpu_count()} vCPUs. Forward only on the sample photos preprocessed "
             f"as served; medians of {args.rounds} interleaved rounds of {args.seconds:g} s. 2 x 1 = two processes of one "
             "thread, images/s summed; 1 x 2 = one image at a time on two threads. Ratio: img/s at 2 x 1 b1 (1 x 2: "
             "latency inverted) against the best of ONNX Runtime and OpenVINO.", ""]
    for name, (variants, medians) in table.items():
        best = {s[0]: max((medians[(v["label"], s[0])] for v in variants if v["runtime"] in ("onnxruntime", "openvino")),
                          key=lambda m: m["images_per_s"] if s[0] != "1 x 2" else -m["p50_ms"], default=None)
                for s in SETTINGS}
        lines += [f"### {name}", "", "| variant | 2 x 1, batch 1 (img/s) | 2 x 1, batch 8 (img/s) | 1 x 2, one image p50 (ms) | vs best other, b1 / b8 / 1x2 | max abs diff |",
                  "|---|---|---|---|---|---|"]
        for v in variants:
            m = [medians[(v["label"], s[0])] for s in SETTINGS]
            ratios = []
            for s, mine in zip(SETTINGS, m):
                other = best[s[0]]
                if other is None:
                    ratios.append("-")
                elif s[0] == "1 x 2":
                    ratios.append(f"{other['p50_ms'] / mine['p50_ms']:.2f}")
                else:
                    ratios.append(f"{mine['images_per_s'] / other['images_per_s']:.2f}")
            diff = f"{v['max_abs_diff']:.1e}" if "max_abs_diff" in v else "reference"
            lines.append(f"| {v['label']} | {m[0]['images_per_s']:.1f} | {m[1]['images_per_s']:.1f} | {m[2]['p50_ms']:.1f} | "
                         f"{' / '.join(ratios)} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def draw(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(table), len(SETTINGS), figsize=(15, 4.2 * len(table)), squeeze=False)
    for row, (name, (variants, medians)) in enumerate(table.items()):
        for col, (setting, *_rest) in enumerate(SETTINGS):
            ax = axes[row][col]
            key = "p50_ms" if setting == "1 x 2" else "images_per_s"
            values = [medians[(v["label"], setting)][key] for v in variants]
            colours = ["tab:blue" if v["runtime"] in TORCH_RUNTIMES else "tab:gray" for v in variants]
            ax.barh([v["label"] for v in variants], values, color=colours)
            ax.invert_yaxis()
            ax.set_title(f"{name}, {setting}")
            ax.set_xlabel("p50 ms (lower is better)" if key == "p50_ms" else "images/s (higher is better)")
            for i, value in enumerate(values):
                ax.text(value, i, f" {value:.1f}", va="center", fontsize=8)
            if col:
                ax.set_yticklabels([])
    fig.suptitle(f"Forward pass on {cpu_name()}, {os.cpu_count()} vCPUs (make bench-cpu)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    w = commands.add_parser("worker")
    r = commands.add_parser("reference")
    for p in (w, r):
        p.add_argument("--runtime", required=True)
        p.add_argument("--model", required=True)
        p.add_argument("--inputs", required=True)
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    r.add_argument("--out", required=True)
    e = commands.add_parser("export-onnx")
    e.add_argument("--program", required=True)
    e.add_argument("--out", required=True)
    parser.add_argument("--torch-python", help="the server's Python (torch) for TorchScript, AOTI and the ONNX export")
    parser.add_argument("--repo", default=os.path.join(ROOT, "models"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra", action="append", default=[], help="MODEL=RUNTIME:PATH:LABEL, another variant to measure")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "bench", "cpu.png"))
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
    elif args.command == "reference":
        reference_output(args)
    elif args.command == "export-onnx":
        export_onnx(args)
    else:
        if not args.torch_python:
            parser.error("--torch-python is required")
        orchestrate(args)


if __name__ == "__main__":
    main()
