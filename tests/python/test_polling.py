"""Repository polling (`--repository-poll-secs`) on the real binary, under load: a model copied
in slowly is not loaded half-way, a new version swaps in with no failed request, a broken new
version leaves the old one serving and says why, a removed folder is unloaded.

The model is the test set's tiny SSD (7 KB, loads in well under a second). The checks wait on
what the server reports (its listing, its log), never on a fixed sleep, with margins that hold
on a busy 2-core machine."""
import os
import pathlib
import shutil
import threading
import time

import pytest
import requests

from conftest import Server, metric

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHOTO = (ROOT / "assets" / "samples" / "coffee.jpg").read_bytes()
POLL, SETTLE = 1, 3


def source():
    return pathlib.Path(os.environ["VISIONSERVE_TEST_MODELS"]) / "tiny_ssd"


def copy_version(target):
    target.mkdir(parents=True)
    for name in ("config.toml", "labels.txt", "model.pt"):
        shutil.copy(source() / name, target / name)


def listing(server, name):
    for model in requests.get(server.url("/v1/models"), timeout=10).json()["models"]:
        if model["name"] == name:
            return model
    return None


def wait_for(predicate, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return None


class Load:
    """Two clients sending predictions back to back; every status kept."""

    def __init__(self, url):
        self.url, self.statuses, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()

    def run(self):
        session = requests.Session()
        while not self.stop.is_set():
            try:
                self.statuses.append(session.post(self.url, data=PHOTO, timeout=60).status_code)
            except requests.RequestException as e:
                self.statuses.append(repr(e))

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        return self.statuses


@pytest.fixture(scope="module")
def polled(tmp_path_factory):
    repo = tmp_path_factory.mktemp("polled-repository")
    copy_version(repo / "tiny" / "1")
    server = Server(str(repo), extra_args=["--repository-poll-secs", str(POLL), "--repository-poll-settle-secs", str(SETTLE)])
    server.repo = repo
    yield server
    server.stop()


def failed_loads(server, model):
    return metric(server, "visionserve_repository_poll_loads_total", f'model="{model}"', 'outcome="failed"')


def test_a_new_version_swaps_in_under_load_with_no_failed_request(polled):
    assert listing(polled, "tiny")["default_version"] == "1"
    load = Load(polled.url("/v1/models/tiny/predict"))
    wait_for(lambda: len(load.statuses) >= 10)
    copy_version(polled.repo / "tiny" / "2")
    swapped = wait_for(lambda: listing(polled, "tiny")["default_version"] == "2" and listing(polled, "tiny")["status"] == "ready")
    # A little more load on the new version, then every answer is counted.
    count = len(load.statuses)
    wait_for(lambda: len(load.statuses) >= count + 10)
    statuses = load.finish()
    assert swapped, "".join(polled.log[-20:])
    assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200][:5]
    assert listing(polled, "tiny")["versions"] == ["1", "2"]
    assert metric(polled, "visionserve_repository_poll_loads_total", 'model="tiny"', 'outcome="loaded"') >= 1


def test_a_model_copied_in_slowly_is_not_loaded_half_way(polled):
    target = polled.repo / "slow"
    load = Load(polled.url("/v1/models/tiny/predict"))
    target.mkdir()
    # File by file, each pause shorter than the settle interval; the model file in two halves.
    shutil.copy(source() / "config.toml", target / "config.toml")
    time.sleep(SETTLE * 0.6)
    shutil.copy(source() / "labels.txt", target / "labels.txt")
    time.sleep(SETTLE * 0.6)
    model = (source() / "model.pt").read_bytes()
    with open(target / "model.pt", "wb") as half:
        half.write(model[: len(model) // 2])
        half.flush()
        time.sleep(SETTLE * 0.6)
        half.write(model[len(model) // 2:])
    assert listing(polled, "slow") is None, "taken before its files settled"
    ready = wait_for(lambda: (listing(polled, "slow") or {}).get("status") == "ready")
    statuses = load.finish()
    assert ready, "".join(polled.log[-20:])
    assert failed_loads(polled, "slow") == 0
    assert not any("polled change failed" in line and "slow" in line for line in polled.log)
    assert requests.post(polled.url("/v1/models/slow/predict"), data=PHOTO, timeout=60).status_code == 200
    assert all(s == 200 for s in statuses)


def test_a_broken_new_version_leaves_the_old_one_serving_and_says_why(polled):
    assert listing(polled, "tiny")["default_version"] == "2"
    broken = polled.repo / "tiny" / "3"
    copy_version(broken)
    (broken / "model.pt").write_bytes(b"not a TorchScript archive")
    reported = wait_for(lambda: listing(polled, "tiny").get("last_load_error"))
    assert reported and "version 3" in reported, reported
    model = listing(polled, "tiny")
    assert model["default_version"] == "2" and model["status"] == "ready" and model["versions"] == ["1", "2"]
    assert requests.post(polled.url("/v1/models/tiny/predict"), data=PHOTO, timeout=60).status_code == 200
    assert failed_loads(polled, "tiny") == 1
    assert metric(polled, "visionserve_repository_poll_failing", 'model="tiny"') == 1
    # Mended: the next change is taken, and the report goes.
    shutil.copy(source() / "model.pt", broken / "model.pt")
    assert wait_for(lambda: listing(polled, "tiny")["default_version"] == "3"), "".join(polled.log[-20:])
    assert "last_load_error" not in listing(polled, "tiny")
    assert metric(polled, "visionserve_repository_poll_failing", 'model="tiny"') == 0


def test_a_removed_folder_is_unloaded(polled):
    assert (listing(polled, "slow") or {}).get("status") == "ready"
    shutil.rmtree(polled.repo / "slow")
    assert wait_for(lambda: listing(polled, "slow")["status"] == "unloaded"), "".join(polled.log[-20:])
    answer = requests.post(polled.url("/v1/models/slow/predict"), data=PHOTO, timeout=60)
    assert answer.status_code in (404, 503) and "error" in answer.json()
    # The other model is untouched.
    assert requests.post(polled.url("/v1/models/tiny/predict"), data=PHOTO, timeout=60).status_code == 200
