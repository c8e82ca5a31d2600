"""KServe's own Python SDK (kserve 0.21, unmodified, from tests/clients/kserve/requirements.lock)
against the server, as a KServe user calls a model: `InferenceRESTClient` over protocol v1 and
v2 and `InferenceGRPCClient`. Run in KServe's environment, apart from the test suite's (the
two cannot share a process); prints one JSON object of what each call answered, for
tests/python/test_kserve_sdk.py to check.

Usage: python kserve_calls.py HTTP_BASE GRPC_HOST_PORT MODEL IMAGE"""
import asyncio
import base64
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def image_request(model, image):
    tensor = InferInput(name="image", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-sdk")


def top1(response):
    scores = response.outputs[0].as_numpy()
    return int(np.argmax(scores[0])), response.outputs[0].name


async def main(base, grpc_url, model, path):
    image = open(path, "rb").read()
    found = {}
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    found["v1_live"] = await v1.is_server_live(base)
    found["v1_ready"] = await v1.is_model_ready(base, model)
    answer = await v1.infer(base, {"instances": [{"b64": base64.b64encode(image).decode()}]}, model_name=model)
    found["v1_predictions"] = answer["predictions"]
    await v1.close()

    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    found["v2_live"] = await v2.is_server_live(base)
    found["v2_server_ready"] = await v2.is_server_ready(base)
    found["v2_ready"] = await v2.is_model_ready(base, model)
    found["v2_top1"] = top1(await v2.infer(base, image_request(model, image), model_name=model))
    await v2.close()

    grpc = InferenceGRPCClient(grpc_url)
    found["grpc_live"] = await grpc.is_server_live()
    found["grpc_ready"] = await grpc.is_model_ready(model)
    found["grpc_top1"] = top1(await grpc.infer(image_request(model, image)))
    await grpc.close()
    print(json.dumps(found))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
