"""What the Python benches share (bench-sliced, bench-masks, bench-video, bench-streams): the CPU's name for
their tables, and a server of one model started on an ephemeral port and waited for."""
import platform
import re
import subprocess
import time

import requests


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def start_server(bench, binary, repo, model, timeout=300, extra=()):
    """`binary` serving `model` of `repo` (no gRPC; `extra` flags), once ready: the process and
    its base URL."""
    process = subprocess.Popen([binary, "--addr", "127.0.0.1:0", "--grpc-addr", "off", "--model-repository", repo,
                                "--models", model, *extra], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    for line in process.stderr:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            base = found.group(1)
            break
        if time.time() > deadline:
            raise SystemExit(f"{bench}: the server did not start")
    else:
        raise SystemExit(f"{bench}: the server exited")
    while requests.get(base + "/health/ready", timeout=5).status_code != 200:
        if time.time() > deadline:
            raise SystemExit(f"{bench}: {model} did not become ready")
        time.sleep(0.3)
    return process, base


COLOURS = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (127, 127, 127), (214, 39, 40), (90, 90, 90)]


def bar_chart(path, title, bars, width=640, height=300):
    """(name, value) bars with Pillow (the server's environment has no plotting library); a
    name's ", " parts go on lines of their own."""
    import os
    from PIL import Image, ImageDraw
    margin = 30
    chart = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(chart)
    pen.text((margin, 8), title, fill="black")
    peak = max(v for _, v in bars) * 1.15
    slot = (width - 2 * margin) / len(bars)
    bottom = height - 50
    for i, ((name, value), colour) in enumerate(zip(bars, COLOURS)):
        x = margin + slot * i + 8
        top = bottom - (bottom - 40) * value / peak
        pen.rectangle([x, top, x + slot - 16, bottom], fill=colour)
        pen.text((x, top - 14), f"{value:.1f}" if value < 100 else f"{value:.0f}", fill="black")
        for k, word in enumerate(name.split(", ")):
            pen.text((x, bottom + 6 + 12 * k), word, fill="black")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chart.save(path)
