"""Repository polling (`--repository-poll-secs`) on the real binary, under load: a model copied
in slowly is not loaded half-way, a new version swaps in with no failed request, a broken new
version leaves the old one serving and says why, a removed folder is unloaded, versions whose
files did not change keep serving as they were (and no loading thread is left behind), a
brand-new broken folder is reported without taking readiness away, and a pipeline's
pipeline.toml is read again when it changes.

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

from conftest import Server, metric, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHOTO = (ROOT / "assets" / "samples" / "coffee.jpg").read_bytes()
POLL, SETTLE = 1, 3
ADMIN = "polling-test-admin"


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
    # A classifier for the pipeline test, linked (45 MB).
    namer = repo / "namer"
    namer.mkdir()
    for name in ("config.toml", "labels.txt", "model.pt"):
        (namer / name).symlink_to(pathlib.Path(os.environ["VISIONSERVE_TEST_MODELS"]) / "resnet18" / name)
    server = Server(str(repo), extra_args=["--repository-poll-secs", str(POLL), "--repository-poll-settle-secs", str(SETTLE), "--admin-token", ADMIN])
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


def inference_count(server, model, version):
    rows = requests.get(server.url(f"/v2/models/{model}/versions/{version}/stats"), timeout=30).json()["model_stats"]
    return rows[0]["inference_count"]


def thread_names(server):
    tasks = pathlib.Path(f"/proc/{server.process.pid}/task")
    return [(task / "comm").read_text().strip() for task in tasks.iterdir()]


def test_unchanged_versions_keep_serving_as_they_were_and_no_loading_thread_stays(polled):
    assert listing(polled, "tiny")["versions"] == ["1", "2", "3"]
    for _ in range(3):
        assert requests.post(polled.url("/v1/models/tiny/versions/3/predict"), data=PHOTO, timeout=60).status_code == 200
    served = inference_count(polled, "tiny", "3")
    assert served >= 3
    copy_version(polled.repo / "tiny" / "4")
    assert wait_for(lambda: listing(polled, "tiny")["default_version"] == "4"), "".join(polled.log[-20:])
    # Version 3 was not loaded again: the same entry, its statistics kept (a reload starts at 0).
    assert inference_count(polled, "tiny", "3") >= served
    assert any("unchanged_kept" in line and '"3"' in line for line in polled.log), "".join(polled.log[-10:])
    # Loads run on a thread that ends with them: a long-lived loader kept an OpenMP thread team
    # (a second "repository-poll" thread), which made every forward 2.5 x slower on 2 cores.
    names = thread_names(polled)
    assert names.count("repository-poll") == 1 and "model-load" not in names, names


def test_a_new_broken_folder_is_reported_and_the_server_stays_ready(polled):
    broken = polled.repo / "broken_new"
    copy_version(broken)
    (broken / "model.pt").write_bytes(b"not a TorchScript archive")
    reported = wait_for(lambda: (listing(polled, "broken_new") or {}).get("last_load_error"))
    assert reported, "".join(polled.log[-20:])
    assert listing(polled, "broken_new")["status"] == "failed"
    assert requests.get(polled.url("/health/ready"), timeout=10).status_code == 200
    index = requests.post(polled.url("/v2/repository/index"), json={}, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).json()
    assert any(row["name"] == "broken_new" and row.get("reason") == reported for row in index), index
    shutil.rmtree(broken)
    assert wait_for(lambda: listing(polled, "broken_new") is None)


PIPELINE = """
[detect]
model = "tiny"
min_score = {min_score}

[classify]
model = "namer"
"""


def test_a_pipeline_file_is_read_again_when_it_changes(polled):
    folder = polled.repo / "chain"
    folder.mkdir()
    (folder / "pipeline.toml").write_text(PIPELINE.format(min_score=0.5))
    listed = wait_for(lambda: (listing(polled, "chain") or {}).get("status") == "ready")
    assert listed, "".join(polled.log[-20:])
    assert listing(polled, "chain")["steps"]["detect"]["min_score"] == 0.5
    assert requests.post(polled.url("/v1/models/chain/predict"), data=PHOTO, timeout=60).status_code == 200
    (folder / "pipeline.toml").write_text(PIPELINE.format(min_score=0.25))
    assert wait_for(lambda: listing(polled, "chain")["steps"]["detect"]["min_score"] == 0.25), "".join(polled.log[-20:])
    # Broken: the steps that served go on, and the listing says why.
    (folder / "pipeline.toml").write_text("[detect]\nmodel = ")
    reported = wait_for(lambda: listing(polled, "chain").get("last_load_error"))
    assert reported, "".join(polled.log[-20:])
    chain = listing(polled, "chain")
    assert chain["status"] == "ready" and chain["steps"]["detect"]["min_score"] == 0.25
    assert requests.post(polled.url("/v1/models/chain/predict"), data=PHOTO, timeout=60).status_code == 200
    assert requests.get(polled.url("/health/ready"), timeout=10).status_code == 200
    shutil.rmtree(folder)
    assert wait_for(lambda: listing(polled, "chain") is None), "".join(polled.log[-20:])
    assert requests.post(polled.url("/v1/models/chain/predict"), data=PHOTO, timeout=60).status_code == 404
