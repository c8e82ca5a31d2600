#!/usr/bin/env python3
"""Validates docker/k8s/*.yaml offline against the Kubernetes schemas that kubernetes-validate
ships (strict: unknown fields fail). KServe's resources are CRDs without a bundled schema:
their containers are validated as the core Container type they are, and their own fields
against the keys KServe's CRDs define (serving.kserve.io v1alpha1 ServingRuntimeSpec,
v1beta1 PredictorSpec/ModelSpec), plus the rules this project relies on:
- a runtime declares `v2` and `grpc-v2` and never auto-selects the `pytorch` format (it would
  capture TorchServe InferenceServices whose /mnt/models holds .mar files);
- an InferenceService on a runtime names one defined here, a protocol it declares, and (for
  grpc-v2) a container port named h2c."""
import glob
import sys

import kubernetes_validate
import yaml

K8S = "1.37.0"
RUNTIME_SPEC_KEYS = {"annotations", "supportedModelFormats", "protocolVersions", "containers", "multiModel",
                     "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "builtInAdapter", "disabled",
                     "nodeSelector", "affinity", "tolerations", "labels", "imagePullSecrets", "storageHelper",
                     "hostIPC", "volumes", "replicas", "workerSpec"}
MODEL_FORMAT_KEYS = {"name", "version", "autoSelect", "priority"}
MODEL_SPEC_KEYS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}
PREDICTOR_KEYS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containers", "model", "serviceAccountName",
                  "timeout", "canaryTrafficPercent", "containerConcurrency", "nodeSelector", "tolerations", "affinity",
                  "volumes", "logger", "batcher", "annotations", "labels", "deploymentStrategy", "autoScaling"}


def as_pod(name, containers):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": containers}}


class RuleError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message, self.path = message, []


def check(condition, message):
    if not condition:
        raise RuleError(message)


def validate_runtime(doc):
    spec = doc["spec"]
    check(set(spec) <= RUNTIME_SPEC_KEYS, f"unknown runtime spec keys {set(spec) - RUNTIME_SPEC_KEYS}")
    check({"v2", "grpc-v2"} <= set(spec["protocolVersions"]), "the runtime must declare v2 and grpc-v2")
    for model_format in spec["supportedModelFormats"]:
        check(set(model_format) <= MODEL_FORMAT_KEYS, f"unknown model format keys {set(model_format) - MODEL_FORMAT_KEYS}")
        check(not (model_format["name"] == "pytorch" and model_format.get("autoSelect")),
              "auto-selecting 'pytorch' would capture TorchServe InferenceServices")
    check(any("/mnt/models" in arg for c in spec["containers"] for arg in c.get("args", [])),
          "the runtime must read its models from /mnt/models")
    kubernetes_validate.validate(as_pod(doc["metadata"]["name"], spec["containers"]), K8S, strict=True)


def validate_inference_service(doc, runtimes):
    predictor = doc["spec"]["predictor"]
    check(set(predictor) <= PREDICTOR_KEYS, f"unknown predictor keys {set(predictor) - PREDICTOR_KEYS}")
    if "containers" in predictor:
        kubernetes_validate.validate(as_pod(doc["metadata"]["name"], predictor["containers"]), K8S, strict=True)
        return
    model = dict(predictor["model"])
    runtime = runtimes.get(model.get("runtime"))
    check(runtime is not None, f"runtime {model.get('runtime')!r} is not defined in docker/k8s")
    check(model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]},
          "the runtime does not support this model format")
    protocol = model.get("protocolVersion", "v1")
    check(protocol in runtime["protocolVersions"], f"the runtime does not speak {protocol}")
    if protocol == "grpc-v2":
        check(any(p.get("name") == "h2c" for p in model.get("ports", [])), "gRPC needs a container port named h2c")
    # The rest of a ModelSpec is a core Container (its name is KServe's).
    container = {k: v for k, v in model.items() if k not in MODEL_SPEC_KEYS}
    kubernetes_validate.validate(as_pod(doc["metadata"]["name"], [{"name": "kserve-container", **container}]), K8S, strict=True)


documents = [(path, doc) for path in sorted(glob.glob("docker/k8s/*.yaml")) for doc in yaml.safe_load_all(open(path)) if doc]
runtimes = {doc["metadata"]["name"]: doc["spec"] for _, doc in documents
            if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime")}
failures = 0
for path, doc in documents:
    name = f"{path}: {doc['kind']}/{doc['metadata']['name']}"
    try:
        if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
            validate_runtime(doc)
            name += " (KServe fields; containers as a Pod spec)"
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            validate_inference_service(doc, runtimes)
            name += " (KServe fields; containers as a Pod spec)"
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)
        print(f"ok    {name}")
    except (kubernetes_validate.ValidationError, RuleError) as e:
        failures += 1
        print(f"FAIL  {name}: {e.message} at {'/'.join(map(str, e.path))}")
print(f"{len(documents) - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
