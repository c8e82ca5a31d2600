#!/usr/bin/env python3
"""Validates docker/k8s/*.yaml offline against the Kubernetes schemas that kubernetes-validate
ships (strict: unknown fields fail). KServe's resources are CRDs without a bundled schema:
their containers are validated as the core Container type they are, and their own fields
against the keys KServe's CRDs define (serving.kserve.io v1alpha1 ServingRuntimeSpec,
v1beta1 PredictorSpec/ModelSpec), plus the rules this project relies on:
- a runtime declares `v2` and `grpc-v2` and never auto-selects the `pytorch` format (it would
  capture TorchServe InferenceServices whose /mnt/models holds .mar files);
- an InferenceService on a runtime names one defined here, a protocol it declares, and (for
  grpc-v2) a container port named h2c.
KEDA's ScaledObject is checked by its CRD's keys and its Prometheus triggers' required fields.
Every metric the autoscaling manifests and the Grafana dashboard (docker/grafana/*.json) query
must be one the server exports (the names src/metrics.rs defines)."""
import glob
import json
import re
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


SCALED_OBJECT_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount", "minReplicaCount",
                      "maxReplicaCount", "fallback", "advanced", "triggers", "initialCooldownPeriod"}
TRIGGER_KEYS = {"type", "metadata", "name", "metricType", "authenticationRef", "useCachedMetrics"}


def exported_metrics():
    """The metric names src/metrics.rs defines; a histogram's series add _bucket, _sum, _count."""
    source = open("src/metrics.rs").read()
    names = set(re.findall(r'pub const [A-Z_]+: &str = "(visionserve_[a-z_]+)"', source))
    series = set(names)
    for name in names:
        series |= {name + "_bucket", name + "_sum", name + "_count"}
    return series


def queried_metrics(text):
    return set(re.findall(r"visionserve_[a-z_]+", text))


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
    check({"v1", "v2", "grpc-v2"} <= set(spec["protocolVersions"]), "the runtime must declare v1, v2 and grpc-v2")
    for model_format in spec["supportedModelFormats"]:
        check(set(model_format) <= MODEL_FORMAT_KEYS, f"unknown model format keys {set(model_format) - MODEL_FORMAT_KEYS}")
        check(not (model_format["name"] == "pytorch" and model_format.get("autoSelect")),
              "auto-selecting 'pytorch' would capture TorchServe InferenceServices")
    check(any("/mnt/models" in arg for c in spec["containers"] for arg in c.get("args", [])),
          "the runtime must read its models from /mnt/models")
    kubernetes_validate.validate(as_pod(doc["metadata"]["name"], spec["containers"]), K8S, strict=True)


def validate_scaled_object(doc, exported):
    spec = doc["spec"]
    check(set(spec) <= SCALED_OBJECT_KEYS, f"unknown ScaledObject keys {set(spec) - SCALED_OBJECT_KEYS}")
    check("name" in spec["scaleTargetRef"], "scaleTargetRef needs a name")
    for trigger in spec["triggers"]:
        check(set(trigger) <= TRIGGER_KEYS, f"unknown trigger keys {set(trigger) - TRIGGER_KEYS}")
        if trigger["type"] == "prometheus":
            missing = {"serverAddress", "query", "threshold"} - set(trigger["metadata"])
            check(not missing, f"a prometheus trigger needs {missing}")
            float(trigger["metadata"]["threshold"])
            unknown = queried_metrics(trigger["metadata"]["query"]) - exported
            check(not unknown, f"the query names metrics the server does not export: {unknown}")


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


exported = exported_metrics()
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
        elif doc["kind"] == "ScaledObject":
            validate_scaled_object(doc, exported)
            name += " (KEDA fields; queried metrics exported)"
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            validate_inference_service(doc, runtimes)
            name += " (KServe fields; containers as a Pod spec)"
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)
            if doc["kind"] == "HorizontalPodAutoscaler":
                names = {m["pods"]["metric"]["name"] for m in doc["spec"]["metrics"] if m["type"] == "Pods"}
                check(names <= exported, f"the HPA scales on metrics the server does not export: {names - exported}")
        print(f"ok    {name}")
    except (kubernetes_validate.ValidationError, RuleError) as e:
        failures += 1
        print(f"FAIL  {name}: {e.message} at {'/'.join(map(str, e.path))}")
for path in sorted(glob.glob("docker/grafana/*.json")):
    dashboard = json.load(open(path))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v.get("query", "") for v in dashboard.get("templating", {}).get("list", []) if isinstance(v.get("query"), str)]
    unknown = set().union(*(queried_metrics(q) for q in queries)) - exported
    documents.append((path, None))
    if unknown or not queries:
        failures += 1
        print(f"FAIL  {path}: queries metrics the server does not export: {sorted(unknown)}")
    else:
        print(f"ok    {path}: {len(dashboard['panels'])} panels, {len(queries)} queries, every metric exported")
print(f"{len(documents) - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
