# visionserve: `make run` serves the default models on http://127.0.0.1:8080, `make test` runs
# the whole suite. Both prepare everything they need; heavy outputs (the Python/torch
# environment, cargo's build folder, converted models) live in $(CACHE), keyed by version,
# so a fresh clone on the same machine reuses them.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TORCH_VERSION       := 2.13.0
TORCHVISION_VERSION := 0.28.0
CACHE      ?= $(or $(VISIONSERVE_CACHE),$(HOME)/.cache/visionserve)
PY_ENV     := $(CACHE)/py-torch$(TORCH_VERSION)-tv$(TORCHVISION_VERSION)
PYTHON     := $(PY_ENV)/bin/python
LOCK_HASH  := $(shell sha256sum requirements.lock | cut -c1-12)
PY_STAMP   := $(PY_ENV)/.installed-$(LOCK_HASH)

export LIBTORCH_USE_PYTORCH := 1
export CARGO_TARGET_DIR     := $(CACHE)/cargo-target-torch$(TORCH_VERSION)
export PATH                 := $(PY_ENV)/bin:$(PATH)
BIN := target/release/visionserve

# Converted models are keyed by the scripts that make them (and the torch version).
TEST_MODELS_KEY := $(shell cat models/export.py models/program.py models/progress.py | sha256sum | cut -c1-12)
TEST_MODELS     := $(CACHE)/test-models-$(TEST_MODELS_KEY)
DEFAULT_MODELS  := mobilenet_v2 mobilenet_v2_embedding ssd_mobilenet_v2_coco text_detector_ppocr_v4
PRETRAINED_KEY  := $(shell cat models/convert_pretrained.py models/program.py models/progress.py models/weights.sha256 | sha256sum | cut -c1-12)
PRETRAINED      := $(CACHE)/pretrained-$(PRETRAINED_KEY)
# AOTInductor packages are machine code: models/aoti.py keys them inside this folder by torch
# version, a digest of the CPU flags and the exported program's checksum.
AOTI_CACHE      := $(CACHE)/aoti
PERF_ANALYZER   := $(CACHE)/perf-analyzer-2.51.0
# KServe's SDK in an environment of its own (it and tritonclient.grpc cannot share a process).
KSERVE_ENV      := $(CACHE)/kserve-sdk-$(shell sha256sum tests/clients/kserve/requirements.lock | cut -c1-12)
# ultralytics, for exporting YOLO models as users do and for reference checks against its own
# post-processing: an environment that sees the torch one (no second torch) plus the lock.
ULTRALYTICS_ENV    := $(CACHE)/ultralytics-$(shell cat tests/clients/ultralytics/requirements.lock tests/clients/ultralytics/tracking.lock requirements.lock | sha256sum | cut -c1-12)
ULTRALYTICS_PYTHON := $(ULTRALYTICS_ENV)/bin/python
# The test models of the tasks past detection (keypoints, YOLO instance masks): ultralytics
# exports and a small torchvision Keypoint R-CNN, keyed by the scripts that make them.
TASK_MODELS_KEY := $(shell cat models/export_tasks.py models/export.py models/progress.py tests/clients/ultralytics/requirements.lock | sha256sum | cut -c1-12)
TASK_MODELS     := $(CACHE)/task-models-$(TASK_MODELS_KEY)
# ONNX Runtime and OpenVINO for `make bench-cpu`, in an environment of their own.
BENCH_CPU_ENV   := $(CACHE)/bench-cpu-$(shell sha256sum scripts/bench-cpu.lock | cut -c1-12)

.PHONY: bench-video bench-streams swarm-test bench-swarm ultralytics task-models bench-sliced bench-masks quantize openapi-json bench-cpu bench-perf-analyzer perf-analyzer kserve-sdk bench-cache bench-tls bench-poll bench-pipeline bench-protocols bench-shipped compare-answers help prereqs pyenv build models test-models run test test-rust test-python test-browser bench bench-torchserve soak docker-image docker-test validate-manifests test-gpu zoo clean audit licenses fuzz

help:
	@echo "make run    - prepare everything and serve the default models on http://127.0.0.1:8080"
	@echo "make test   - prepare everything and run the whole test suite, which is:"
	@echo "  make test-rust          - unit, router (in-process) and integration tests (tests/*.rs, real binary)"
	@echo "  make test-python        - torchvision reference checks, default models, tritonclient (REST and gRPC), Triton's example"
	@echo "                           clients and perf_analyzer, pipelines,"
	@echo "                           the response cache, models on demand, tracing, TorchServe API, OpenAPI"
	@echo "  make test-browser       - the web page in headless Chromium"
	@echo "  make validate-manifests - Kubernetes and KServe manifests against their schemas, offline"
	@echo "  make docker-test        - the image built and run, answers compared with the host binary"
	@echo "  make swarm-test         - docker/swarm/stack.yml on a one-node swarm: rolling update and a killed replica under load"
	@echo "  make audit              - cargo deny: licences, banned crates, sources (and advisories when reachable)"
	@echo "make test-gpu - on a machine with an NVIDIA GPU: integration and reference tests on cuda:0"
	@echo "make compare-answers BEFORE=<old binary> - every route's answers, old binary vs this build, byte for byte"
	@echo "make build  - release binary at $(BIN)"
	@echo "make models - convert the default pretrained models into models/ (and their INT8 versions, installed past their gates)"
	@echo "make quantize MODEL=models/<name>/<version> [CALIBRATION=<photo folder>] - an INT8 version of your own model, with the same gates"
	@echo "make zoo    - export the torchvision zoo (ZOO_FLAGS=--random-init offline, --aoti for .pt2 twins) into ZOO_OUT"
	@echo "make bench  - load-test the server against the in-process ceiling (BENCHMARKS.md)"
	@echo "make soak   - ten minutes at 70 % load, resident memory over time"
	@echo "make bench-sliced - sliced detection: 1920x1080 in 15 tiles against one 15-image forward plus a decode; the merge's time"
	@echo "make bench-video - a 640x480 H.264 clip through the SSD against its frames as photos, with and without ByteTrack"
	@echo "make bench-streams - 3, 4, then 3 live RTSP streams through the SSD with ByteTrack: p95, drops, camera restarts, a 10-minute soak"
	@echo "make bench-masks - instance masks: response size and server time per mask format, 1, 20 and 100 instances"
	@echo "make bench-cache - mobilenet_v2 answered from the response cache against computed, one client"
	@echo "make bench-pipeline - the detect_then_classify pipeline against its two steps called alone"
	@echo "make bench-protocols - REST against gRPC on mobilenet_v2 as shipped, median of three interleaved runs"
	@echo "make bench-shipped - the server as shipped, a 640x480 and a 12 MP photo, concurrency 1, 16 and 160"
	@echo "make bench-poll - 20 version swaps by repository polling at 80 % load: failed requests, p99"
	@echo "make bench-tls - TLS against plain HTTP: keep-alive throughput at c=16, a new connection's cost"
	@echo "make bench-cpu - the forward pass alone: our TorchScript and AOTI versions beside ONNX Runtime and OpenVINO"
	@echo "make bench-torchserve - the same load on TorchServe 0.12 and on visionserve"
	@echo "make bench-perf-analyzer - Triton's perf_analyzer beside our load generator, HTTP and gRPC, mobilenet_v2 as shipped"
	@echo "make fuzz   - every cargo-fuzz target for FUZZ_SECONDS (default 600) each; needs nightly"

prereqs:
	@scripts/check-prereqs.sh

# The Python environment: torch and torchvision for libtorch and model export, the converters
# and the test clients, all pinned in requirements.lock.
$(PY_STAMP): requirements.lock | prereqs
	@echo "[setup] Python environment in $(PY_ENV) (first time: about 5 GB, a few minutes)"
	@test -x $(PYTHON) || python3 -m venv $(PY_ENV)
	$(PYTHON) -m pip install --progress-bar off -q --upgrade pip
	$(PYTHON) -m pip install --progress-bar off -r requirements.lock
	@touch $@

pyenv: $(PY_STAMP)

build: $(PY_STAMP) | prereqs
	@echo "[build] cargo build --release (first time: about 5 minutes for torch-sys)"
	cargo build --release --locked
	@mkdir -p target/release
	@install -m 755 $(CARGO_TARGET_DIR)/release/visionserve $(BIN)

# Default pretrained models: converted once per machine into the cache, then linked into
# models/<name>/ beside their committed config.toml and labels.
# The folder name already holds a hash of the scripts, so the stamp needs no file prerequisite.
$(PRETRAINED)/.complete: | $(PY_STAMP)
	$(PYTHON) models/convert_pretrained.py --out $(PRETRAINED) --downloads $(CACHE)/downloads
	@touch $@

# Version folders with format = "aoti" get the exported program, compiled for this machine.
models: $(PRETRAINED)/.complete
	@for d in models/*/[0-9]*/; do m=$$(basename $$(dirname $$d)); \
	  if grep -q '^format = "aoti"' $$d/config.toml; then ln -sfn $(PRETRAINED)/$$m/program.pt2 $$d/program.pt2; \
	  else ln -sfn $(PRETRAINED)/$$m/model.pt $$d/model.pt; fi; done
	$(PYTHON) models/aoti.py compile-repo --repo models --cache $(AOTI_CACHE) --downloads $(CACHE)/downloads
	@echo "[models] $(DEFAULT_MODELS) ready in models/"

# One version folder with [compile] precision = "int8" or "bf16" (models/README.md); exits 1 when the
# variant fails its gates (and is then listed as not installed).
quantize: $(PY_STAMP)
	@test -n "$(MODEL)" || { echo "usage: make quantize MODEL=models/<name>/<version> [CALIBRATION=<folder of photos>]"; exit 2; }
	$(PYTHON) models/aoti.py quantize --folder $(MODEL) --cache $(AOTI_CACHE) --downloads $(CACHE)/downloads $(if $(CALIBRATION),--calibration $(CALIBRATION))

$(TEST_MODELS)/.complete: | $(PY_STAMP)
	$(PYTHON) models/export.py --out $(TEST_MODELS) --set test --random-init
	@touch $@

$(ULTRALYTICS_ENV)/.installed: tests/clients/ultralytics/requirements.lock tests/clients/ultralytics/tracking.lock $(PY_STAMP)
	@echo "[setup] ultralytics in $(ULTRALYTICS_ENV) (first time: about 250 MB, under a minute)"
	@test -x $(ULTRALYTICS_PYTHON) || $(PYTHON) -m venv $(ULTRALYTICS_ENV)
	$(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $$($(ULTRALYTICS_PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/visionserve-torch-env.pth
	$(ULTRALYTICS_PYTHON) -m pip install --progress-bar off -q -r tests/clients/ultralytics/requirements.lock -r tests/clients/ultralytics/tracking.lock
	@touch $@

ultralytics: $(ULTRALYTICS_ENV)/.installed

$(TASK_MODELS)/.complete: | $(ULTRALYTICS_ENV)/.installed
	$(ULTRALYTICS_PYTHON) models/export_tasks.py --out $(TASK_MODELS)
	@touch $@

task-models: $(TASK_MODELS)/.complete

# The test set's AOTInductor twins, compiled for this machine (cached in AOTI_CACHE).
test-models: $(TEST_MODELS)/.complete
	$(PYTHON) models/aoti.py compile-repo --repo $(TEST_MODELS)/aoti --cache $(AOTI_CACHE)

run: build models
	$(BIN) --model-repository models

test: build models test-models audit test-rust test-python validate-manifests docker-test swarm-test test-browser

test-rust: build test-models
	VISIONSERVE_TEST_MODELS=$(TEST_MODELS) cargo test --release --locked

# The tests against ultralytics' own predictor, and against sahi's tiling and merge, run in its
# environment (which holds sahi too).
ULTRALYTICS_TESTS := tests/python/test_keypoints.py tests/python/test_yolo_seg.py tests/python/test_yolo_exports.py tests/python/test_sliced.py tests/python/test_tracking.py
test-python: build models test-models task-models perf-analyzer kserve-sdk
	@scripts/ensure-test-tools.sh openssl curl ffmpeg
	@scripts/ensure-rtsp-server.sh
	VISIONSERVE_BIN=$(abspath $(BIN)) VISIONSERVE_TEST_MODELS=$(TEST_MODELS) VISIONSERVE_PERF_ANALYZER=$(PERF_ANALYZER)/run \
	  VISIONSERVE_KSERVE_PYTHON=$(KSERVE_ENV)/bin/python \
	  VISIONSERVE_DEFAULT_MODELS=$(abspath models) VISIONSERVE_DOWNLOADS=$(CACHE)/downloads VISIONSERVE_AOTI_CACHE=$(AOTI_CACHE) \
	  $(PYTHON) -m pytest -q tests/python $(addprefix --ignore=,$(ULTRALYTICS_TESTS))
	VISIONSERVE_BIN=$(abspath $(BIN)) VISIONSERVE_TEST_MODELS=$(TEST_MODELS) VISIONSERVE_TASK_MODELS=$(TASK_MODELS) \
	  VISIONSERVE_DEFAULT_MODELS=$(abspath models) $(ULTRALYTICS_PYTHON) -m pytest -q $(ULTRALYTICS_TESTS)

# The web page in Debian's headless Chromium, driven by playwright-core; screenshots land in
# test-output/browser/ (VISIONSERVE_UPDATE_SCREENSHOTS=1 refreshes docs/screenshots/).
test-browser: build models test-models task-models
	@scripts/ensure-chromium.sh
	@command -v npm >/dev/null || { echo "visionserve setup: npm is not installed; install Node.js 18+ (Debian: apt-get install nodejs npm)." >&2; exit 1; }
	cd tests/browser && npm ci --no-audit --no-fund --silent
	cd tests/browser && VISIONSERVE_BIN=$(abspath $(BIN)) VISIONSERVE_DEFAULT_MODELS=$(abspath models) VISIONSERVE_TEST_MODELS=$(TEST_MODELS) VISIONSERVE_TASK_MODELS=$(TASK_MODELS) node --test page.test.mjs

# The load-test bench: in-process ceiling vs served throughput for each default model, in both
# formats (version 1 TorchScript, version 2 AOTInductor). Appends to BENCHMARKS.md, draws
# docs/bench/*.png. BENCH_MODELS picks others (model folders, comma-separated).
BENCH_SECONDS ?= 6
BENCH_CONCURRENCY ?= 1,4,16,64
BENCH_MODELS ?= $(subst $(eval) ,$(comma),$(foreach m,$(DEFAULT_MODELS),models/$(m)/1 models/$(m)/2))
comma := ,
bench: build models
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) \
	  --concurrency $(BENCH_CONCURRENCY) --models $(BENCH_MODELS) --protocols models --pipeline models --cache models

# REST against gRPC alone (the last part of `make bench`): mobilenet_v2 as shipped, /v1, V2
# binary, gRPC BYTES and gRPC UINT8, concurrency 1 and 16, median of three interleaved runs.
bench-protocols: build models
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) --protocols models

# The pipeline against its steps alone (also the end of `make bench`): detect_then_classify on
# a photo with five detections, against the detector plus one batched forward of five crops.
bench-pipeline: build models
	cargo run --release --locked --example bench -- --server $(BIN) --pipeline models

# The response cache (also the end of `make bench`): mobilenet_v2 answered from the cache
# against computed, one client, the 640×480 photo uploaded each time.
# Instance masks on the wire: response size and server time per mask format, 1/20/100 instances.
bench-sliced: build models ultralytics
	$(ULTRALYTICS_PYTHON) scripts/bench-sliced.py --bin $(abspath $(BIN)) --repo models

# A video against its frames sent as photos: frames per second through the SSD as shipped,
# with and without ByteTrack. Appends to BENCHMARKS.md, draws docs/bench/video.png.
bench-video: build models
	@scripts/ensure-test-tools.sh ffmpeg
	$(PYTHON) scripts/bench-video.py --bin $(abspath $(BIN)) --repo models

bench-streams: build models
	@scripts/ensure-test-tools.sh ffmpeg
	@scripts/ensure-rtsp-server.sh
	$(PYTHON) scripts/bench-streams.py --bin $(abspath $(BIN)) --repo models

bench-masks: build test-models
	$(PYTHON) scripts/bench-masks.py --bin $(abspath $(BIN)) --repo $(TEST_MODELS)

bench-cache: build models
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) --cache models

# 20 version swaps by repository polling under an open loop at 80 % of capacity (mobilenet_v2
# TorchScript as shipped): failed requests and p99 against steady. Appends to BENCHMARKS.md.
bench-poll: build models
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) --poll models

# TLS against plain HTTP on mobilenet_v2 as shipped: keep-alive throughput at c=16 and the cost
# of a new connection (certificates made with openssl). Appends to BENCHMARKS.md, draws tls.png.
bench-tls: build models
	@scripts/ensure-test-tools.sh openssl
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) --tls models

# TorchServe 0.12 (Java 17, PyPI) on mobilenet_v2's TorchScript file; visionserve on the same
# file and on its AOTInductor package; same load, same run.
# The server as a user gets it (models/ as shipped, every version loaded) on the 640×480 photo
# and a 12 MP phone-size photo, at concurrency 1, 16 and 160 (a retry storm). Appends to
# BENCHMARKS.md, draws docs/bench/shipped.png.
bench-shipped: build models
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) --shipped models --python $(PYTHON)

# Triton's perf_analyzer (from the tritonclient 2.51 wheel) beside our load generator on
# mobilenet_v2 as shipped, HTTP and gRPC, concurrency 1, 4, 16. Appends to BENCHMARKS.md,
# draws docs/bench/perf_analyzer.png.
bench-perf-analyzer: build models perf-analyzer
	cargo run --release --locked --example bench -- --server $(BIN) --seconds $(BENCH_SECONDS) \
	  --perf-analyzer $(PERF_ANALYZER)/run --repository models

perf-analyzer: $(PY_STAMP)
	@scripts/ensure-perf-analyzer.sh $(PERF_ANALYZER) $(PYTHON)

kserve-sdk: $(KSERVE_ENV)/.installed

$(KSERVE_ENV)/.installed: tests/clients/kserve/requirements.lock | prereqs
	@echo "[setup] KServe's SDK in $(KSERVE_ENV) (first time: about 450 MB, a minute or two)"
	@test -x $(KSERVE_ENV)/bin/python || python3 -m venv $(KSERVE_ENV)
	$(KSERVE_ENV)/bin/python -m pip install --progress-bar off -q -r tests/clients/kserve/requirements.lock
	@touch $@

# The forward pass alone: every version of mobilenet_v2 and the SSD beside ONNX Runtime and
# OpenVINO FP32 on the same exported program, 2 processes x 1 thread (batch 1 and 8) and one
# image on 2 threads, medians of 3 interleaved rounds. Appends to BENCHMARKS.md, draws
# docs/bench/cpu.png.
bench-cpu: models $(BENCH_CPU_ENV)/.installed
	$(BENCH_CPU_ENV)/bin/python scripts/bench-cpu.py --torch-python $(PYTHON) --repo models --seconds $(BENCH_SECONDS) --rounds 3

$(BENCH_CPU_ENV)/.installed: scripts/bench-cpu.lock | prereqs
	@echo "[setup] ONNX Runtime and OpenVINO for bench-cpu in $(BENCH_CPU_ENV) (first time: about 460 MB)"
	@test -x $(BENCH_CPU_ENV)/bin/python || python3 -m venv $(BENCH_CPU_ENV)
	$(BENCH_CPU_ENV)/bin/python -m pip install --progress-bar off -q -r scripts/bench-cpu.lock
	@touch $@

bench-torchserve: build models
	scripts/bench-torchserve.sh $(CACHE) models/mobilenet_v2/1 $(abspath $(BIN)) $(BENCH_SECONDS) models/mobilenet_v2/2

# Ten minutes at 70 % of capacity; reports resident memory over time into BENCHMARKS.md.
SOAK_SECONDS ?= 600
soak: build test-models
	cargo run --release --locked --example bench -- --server $(BIN) --soak-seconds $(SOAK_SECONDS) \
	  --models $(TEST_MODELS)/resnet18

# The CPU image, assembled from the host build (docker/Dockerfile explains why).
docker-image: build models
	cargo build --release --locked --example bench
	scripts/docker-context.sh
	DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -t visionserve:latest -f docker/Dockerfile docker

# Builds and runs the image as a user would; starts (and stops) a Docker engine if needed.
docker-test: build models
	cargo build --release --locked --example bench
	scripts/docker-test.sh $(CACHE)

# docker/swarm/stack.yml on a real orchestrator (swarm mode, one node, in a network namespace
# of its own): two replicas behind HAProxy under load, a rolling update to a new image and a
# killed replica; fails on a request lost to either. Report and chart in test-output/.
swarm-test: build models
	cargo build --release --locked --example bench
	scripts/swarm-test.sh $(CACHE) test-output/swarm.md test-output

# The same, its table appended to BENCHMARKS.md and its chart in docs/bench/.
bench-swarm: build models
	cargo build --release --locked --example bench
	scripts/swarm-test.sh $(CACHE) BENCHMARKS.md docs/bench

# A refactor's check: every route's answers (REST, gRPC, the pipeline, the test models) to the
# sample photos and the corpus, recorded with the binary BEFORE and with this build, compared
# byte for byte (timing headers and request ids aside). EXEMPT lists answer keys that are meant to change.
compare-answers: build models test-models
	@test -n "$(BEFORE)" || { echo "make compare-answers: set BEFORE=<path to the old visionserve binary>"; exit 2; }
	@mkdir -p test-output
	$(PYTHON) scripts/compare-answers.py record --bin $(BEFORE) --models models --test-models $(TEST_MODELS) --out test-output/answers-before.json
	$(PYTHON) scripts/compare-answers.py record --bin $(BIN) --models models --test-models $(TEST_MODELS) --out test-output/answers-after.json
	python3 scripts/compare-answers.py compare test-output/answers-before.json test-output/answers-after.json $(if $(EXEMPT),--exempt $(EXEMPT))

# docker/k8s/*.yaml against the Kubernetes schemas, offline.
# openapi.json (served as TorchServe's API description) from openapi.yaml; a test keeps them equal.
openapi-json: $(PY_STAMP)
	$(PYTHON) -c 'import json, yaml; spec = yaml.safe_load(open("openapi.yaml")); open("openapi.json", "w").write(json.dumps(spec, indent=1, ensure_ascii=False) + "\n")'

validate-manifests: $(PY_STAMP)
	$(PYTHON) scripts/validate-manifests.py

# On a machine with an NVIDIA GPU: a build that links libtorch_cuda, the integration and
# reference tests with every test model on cuda:0 (the reference side stays on CPU).
GPU_TEST_MODELS := $(CACHE)/test-models-cuda-$(TEST_MODELS_KEY)
test-gpu: $(PY_STAMP)
	$(PYTHON) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "make test-gpu: no CUDA device visible")'
	VISIONSERVE_CUDA=1 cargo build --release --locked
	@install -m 755 $(CARGO_TARGET_DIR)/release/visionserve $(BIN)
	test -f $(GPU_TEST_MODELS)/.complete || { $(PYTHON) models/export.py --out $(GPU_TEST_MODELS) --set test --random-init --device cuda:0 && touch $(GPU_TEST_MODELS)/.complete; }
	VISIONSERVE_CUDA=1 VISIONSERVE_TEST_MODELS=$(GPU_TEST_MODELS) cargo test --release --locked --test v1 --test v2 --test torchserve --test batching
	VISIONSERVE_BIN=$(abspath $(BIN)) VISIONSERVE_TEST_MODELS=$(GPU_TEST_MODELS) $(PYTHON) -m pytest -q tests/python/test_reference.py

ZOO_OUT   ?= $(CACHE)/zoo
ZOO_FLAGS ?=
# With ZOO_FLAGS=--aoti, also each model's AOTInductor twin (ZOO_OUT/aoti/), compiled here.
zoo: $(PY_STAMP)
	$(PYTHON) models/export.py --out $(ZOO_OUT) --set zoo $(ZOO_FLAGS)
	@if [ -d $(ZOO_OUT)/aoti ]; then $(PYTHON) models/aoti.py compile-repo --repo $(ZOO_OUT)/aoti --cache $(AOTI_CACHE); fi

clean:
	rm -rf target
	@rm -f models/*/[0-9]*/model.pt models/*/[0-9]*/model.pt2 models/*/[0-9]*/program.pt2

# Cargo tools, built once per machine into the cache, keyed by version.
CARGO_TOOLS        := $(CACHE)/cargo-tools
CARGO_DENY_VERSION := 0.19.0
CARGO_FUZZ_VERSION := 0.13.1
CARGO_DENY := $(CARGO_TOOLS)/bin/cargo-deny-$(CARGO_DENY_VERSION)
CARGO_FUZZ := $(CARGO_TOOLS)/bin/cargo-fuzz-$(CARGO_FUZZ_VERSION)

$(CARGO_DENY):
	@echo "[setup] cargo-deny $(CARGO_DENY_VERSION) (first time: a few minutes)"
	cargo install --locked --root $(CARGO_TOOLS) cargo-deny@$(CARGO_DENY_VERSION)
	@cp $(CARGO_TOOLS)/bin/cargo-deny $@

$(CARGO_FUZZ):
	@echo "[setup] cargo-fuzz $(CARGO_FUZZ_VERSION)"
	cargo install --locked --root $(CARGO_TOOLS) cargo-fuzz@$(CARGO_FUZZ_VERSION)
	@cp $(CARGO_TOOLS)/bin/cargo-fuzz $@

# Dependencies against deny.toml: licences (permissive only), banned crates, sources. The
# RustSec advisories need their database from GitHub: checked when it can be fetched, and
# said plainly when it cannot.
audit: $(CARGO_DENY)
	$(CARGO_DENY) check --hide-inclusion-graph bans licenses sources
	@if timeout 60 $(CARGO_DENY) fetch db >/dev/null 2>&1; then \
	  $(CARGO_DENY) check --disable-fetch advisories; \
	else \
	  echo "[audit] RustSec advisories NOT checked: the advisory database (github.com/rustsec/advisory-db) is unreachable from this machine"; \
	fi

# LICENSES-THIRD-PARTY.md's crate list, from the lock file.
licenses: $(CARGO_DENY)
	@python3 -c 'import re,sys; t=open("LICENSES-THIRD-PARTY.md").read(); print(t[:t.index("```")], end="")' > LICENSES-THIRD-PARTY.md.new
	@{ echo '```'; $(CARGO_DENY) list -l license; echo '```'; } >> LICENSES-THIRD-PARTY.md.new
	@mv LICENSES-THIRD-PARTY.md.new LICENSES-THIRD-PARTY.md

# cargo-fuzz (libFuzzer + AddressSanitizer, nightly Rust): each target in turn for
# FUZZ_SECONDS, seeded from fuzz/regressions/ (and the image corpus), growing its corpus in
# the cache. libFuzzer prints progress as it goes; a crash stops the run and lands in
# fuzz/artifacts/<target>/ — fix it, then copy the input to fuzz/regressions/<target>/ so
# `make test` keeps checking it (tests/fuzz_regressions.rs).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= decode_preprocess request_parsing v2_binary rle_nms
FUZZ_TARGET_DIR := $(CACHE)/cargo-fuzz-target-torch$(TORCH_VERSION)
TORCH_LIB = $(shell $(PYTHON) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
fuzz: $(PY_STAMP) $(CARGO_FUZZ)
	@rustup toolchain list | grep -q '^nightly' || { echo "make fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
	cd fuzz && CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) RUSTUP_TOOLCHAIN=nightly $(CARGO_FUZZ) fuzz build -O --fuzz-dir .
	@mkdir -p $(CACHE)/fuzz-logs
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(CACHE)/fuzz-corpus/$$t; \
	  seeds="regressions/$$t"; [ $$t = decode_preprocess ] && seeds="$$seeds ../tests/corpus/files/accepted ../tests/corpus/files/rejected"; \
	  echo "[fuzz] $$t for $(FUZZ_SECONDS) s (log: $(CACHE)/fuzz-logs/$$t.log)"; \
	  (cd fuzz && LD_LIBRARY_PATH=$(TORCH_LIB) CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) RUSTUP_TOOLCHAIN=nightly $(CARGO_FUZZ) fuzz run -O --fuzz-dir . $$t \
	    $(CACHE)/fuzz-corpus/$$t $$seeds -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
	    2>&1 | tee $(CACHE)/fuzz-logs/$$t.log | grep --line-buffered -E "^#[0-9]+ +(pulse|REDUCE|NEW)|ERROR|panicked|stat::|Done" ) || exit 1; \
	done
