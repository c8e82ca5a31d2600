#!/usr/bin/env python3
"""Validates docker/k8s/*.yaml offline against the Kubernetes schemas that kubernetes-validate
ships (strict: unknown fields fail). KServe's InferenceService is a CRD without a bundled
schema: its predictor containers are validated as the core Container type they are."""
import glob
import sys

import kubernetes_validate
import yaml

failures = 0
for path in sorted(glob.glob("docker/k8s/*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        name = f"{path}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            predictor = doc["spec"]["predictor"]
            doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
                   "spec": {"containers": predictor["containers"]}}
            name += " (predictor containers as a Pod spec)"
        try:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
            print(f"ok    {name}")
        except kubernetes_validate.ValidationError as e:
            failures += 1
            print(f"FAIL  {name}: {e.message} at {'/'.join(map(str, e.path))}")
print(f"{len(glob.glob('docker/k8s/*.yaml')) - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
