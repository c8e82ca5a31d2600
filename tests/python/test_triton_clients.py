"""Triton's own example clients, vendored unmodified in tests/clients/triton/ (see SOURCE.md
there), run as a Triton user runs them against the default models: `image_client.py` over
HTTP and gRPC with its batching, async and streaming modes, `grpc_image_client.py` and
`ensemble_image_client.py`. Each must print the right top-1 for the project's photos."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import Server

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "clients" / "triton"
SAMPLES = ROOT / "assets" / "samples"
# The photos' top-1 ImageNet classes, by index (mobilenet_v2's labels).
EXPECTED = {"chelsea.jpg": {281, 282, 285}, "coffee.jpg": {967, 968}}


def run_client(script, *args):
    result = subprocess.run([sys.executable, str(CLIENTS / script), *args], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def top_indices(output):
    """The class index of each `    score (index) = label` line the clients print."""
    return [int(line.split("(")[1].split(")")[0]) for line in output.splitlines() if line.startswith("    ") and "(" in line]


@pytest.mark.parametrize("protocol,extra", [
    ("http", []),
    ("http", ["-b", "2"]),
    ("http", ["-a"]),
    ("grpc", []),
    ("grpc", ["-b", "2"]),
    ("grpc", ["-a"]),
    ("grpc", ["--streaming"]),
])
@pytest.mark.parametrize("photo", sorted(EXPECTED))
def test_image_client_gets_the_right_top_1(default_server, protocol, extra, photo):
    url = default_server.grpc if protocol == "grpc" else default_server.base.removeprefix("http://")
    code, output = run_client("image_client.py", "-m", "mobilenet_v2", "-c", "1", "-i", protocol, "-u", url, *extra, str(SAMPLES / photo))
    assert code == 0 and "PASS" in output, output
    tops = top_indices(output)
    batch = 2 if "-b" in extra else 1
    assert len(tops) == batch and all(t in EXPECTED[photo] for t in tops), output


def test_image_client_inception_scaling_is_refused_by_the_client(default_server):
    """The input is RGB pixels (UINT8); the server applies the model's own normalization, so the
    right scaling is the default, NONE. INCEPTION turns the pixels into floats, which
    tritonclient itself refuses to send for a UINT8 input: an error, not a wrong answer. (VGG
    subtracts the mean in uint8 arithmetic, which wraps around in the client before anything is
    sent: the server cannot tell those pixels from a photo's. The README says to use NONE, or
    `pixel_datatype = "FP32"`: the next test.)"""
    code, output = run_client("image_client.py", "-m", "mobilenet_v2", "-s", "INCEPTION",
                              "-u", default_server.base.removeprefix("http://"), str(SAMPLES / "chelsea.jpg"))
    assert "expected UINT8" in output and "PASS" not in output, output


@pytest.fixture(scope="module")
def fp32_pixels_server(tmp_path_factory):
    """The default mobilenet_v2 (its TorchScript version) with `[input] pixel_datatype = "FP32"`."""
    shipped = pathlib.Path(os.environ["VISIONSERVE_DEFAULT_MODELS"]) / "mobilenet_v2" / "1"
    version = tmp_path_factory.mktemp("fp32-pixels") / "mobilenet_v2" / "1"
    version.mkdir(parents=True)
    for item in shipped.iterdir():
        if item.name != "config.toml":
            os.symlink(item.resolve(), version / item.name)
    config = (shipped / "config.toml").read_text()
    assert "\n[input]\n" in config
    (version / "config.toml").write_text(config.replace("\n[input]\n", '\n[input]\npixel_datatype = "FP32"\n'))
    server = Server(str(version.parent.parent))
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_client_with_fp32_pixels_is_right_unscaled_and_told_the_scaling_otherwise(fp32_pixels_server, protocol):
    """With FP32 pixels advertised, NONE gets the right top-1, and both scalings that would
    give a wrong answer (INCEPTION's -1..1, VGG's mean subtracted) are refused by the server
    with a message that names the scaling the model expects."""
    server = fp32_pixels_server
    url = server.grpc if protocol == "grpc" else server.base.removeprefix("http://")
    code, output = run_client("image_client.py", "-m", "mobilenet_v2", "-i", protocol, "-u", url, "-b", "2", str(SAMPLES / "chelsea.jpg"))
    assert code == 0 and "PASS" in output, output
    assert [t in EXPECTED["chelsea.jpg"] for t in top_indices(output)] == [True, True], output
    for scaling in ["INCEPTION", "VGG"]:
        code, output = run_client("image_client.py", "-m", "mobilenet_v2", "-i", protocol, "-u", url, "-s", scaling, str(SAMPLES / "chelsea.jpg"))
        assert code != 0 and "PASS" not in output, output
        assert "-s NONE" in output and "within 0..255" in output, output


def test_grpc_image_client(default_server):
    code, output = run_client("grpc_image_client.py", "-m", "mobilenet_v2", "-c", "2", "-u", default_server.grpc, str(SAMPLES / "chelsea.jpg"))
    assert code == 0 and "PASS" in output, output
    assert top_indices(output)[0] in EXPECTED["chelsea.jpg"], output


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_image_client_sends_the_encoded_files(default_server, protocol, tmp_path):
    for name in EXPECTED:
        shutil.copy(SAMPLES / name, tmp_path / name)
    url = default_server.grpc if protocol == "grpc" else default_server.base.removeprefix("http://")
    code, output = run_client("ensemble_image_client.py", "-m", "mobilenet_v2", "-i", protocol, "-u", url, str(tmp_path))
    assert code == 0 and "PASS" in output, output
    # Files in name order, one top-1 each.
    tops = top_indices(output)
    assert [t in EXPECTED[name] for t, name in zip(tops, sorted(EXPECTED))] == [True, True], output


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_unmodified(default_server, protocol, tmp_path):
    """perf_analyzer plans its requests from the model's metadata and configuration (it refused
    to start without the configuration) and sends random pixels: every request is answered."""
    tool = os.environ.get("VISIONSERVE_PERF_ANALYZER")
    if not tool:
        pytest.skip("VISIONSERVE_PERF_ANALYZER is not set: `make test-python` sets it up (scripts/ensure-perf-analyzer.sh)")
    url = default_server.grpc if protocol == "grpc" else default_server.base.removeprefix("http://")
    csv = tmp_path / "pa.csv"
    result = subprocess.run([tool, "-m", "mobilenet_v2", "-i", protocol, "-u", url, "--concurrency-range", "2",
                             "--measurement-interval", "2000", "--max-trials", "3", "--stability-percentage", "999", "-f", str(csv)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    header, values = csv.read_text().splitlines()[:2]
    throughput = float(dict(zip(header.split(","), values.split(",")))["Inferences/Second"])
    assert throughput > 0, result.stdout
    # The server's own statistics, as perf_analyzer read them from the statistics extension.
    assert "Successful request count" in result.stdout and "compute infer" in result.stdout, result.stdout
