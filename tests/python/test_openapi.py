"""The OpenAPI contract: it documents exactly the routes the router serves, the server serves
it (and a Swagger UI page with no outside assets), and schemathesis, driving the live server
from it, finds no 5xx and no response that breaks the schema."""
import pathlib
import re
import subprocess
import sys

import pytest
import requests
import yaml

from conftest import Server

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "openapi.yaml"
TOKEN = "admin-token-for-schemathesis"
METHODS = ("get", "post", "put", "delete", "patch")


def router_routes():
    """(method, path) pairs from every `.route("...", ...)` call in src/api, path parameters
    written `{}` so that their names do not matter."""
    routes = set()
    for source in (ROOT / "src" / "api").rglob("*.rs"):
        text = source.read_text()
        for call in re.finditer(r'\.route\(\s*"([^"]+)"\s*,', text):
            # The handlers run to the parenthesis that closes `.route(`.
            depth, end = 1, call.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            for method in re.findall(r"\b(get|post|put|delete|patch)\(", text[call.end():end]):
                routes.add((method, re.sub(r"\{[^}]+\}", "{}", call.group(1))))
    return routes


def spec_routes(spec):
    return {
        (method, re.sub(r"\{[^}]+\}", "{}", path))
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


def test_spec_and_router_agree():
    spec = yaml.safe_load(SPEC_PATH.read_text())
    assert spec["openapi"].startswith("3.1")
    served, documented = router_routes(), spec_routes(spec)
    assert len(served) > 30, f"the route scan found too little: {sorted(served)}"
    assert served - documented == set(), f"routes the spec does not document: {sorted(served - documented)}"
    assert documented - served == set(), f"documented routes the router lacks: {sorted(documented - served)}"


@pytest.fixture(scope="module")
def managed_server():
    server = Server(str(ROOT / "models"), extra_args=["--admin-token", TOKEN])
    yield server
    server.stop()


def test_contract_and_docs_page_are_served_from_the_binary(managed_server):
    served = requests.get(managed_server.url("/openapi.yaml"), timeout=10)
    assert served.status_code == 200 and served.text == SPEC_PATH.read_text()
    page = requests.get(managed_server.url("/docs"), timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs/") for a in assets), f"outside assets: {assets}"
    for asset in assets:
        assert requests.get(managed_server.url(asset), timeout=10).status_code == 200, asset


def schemathesis(server, *selection):
    command = [
        str(pathlib.Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(ROOT / "tests" / "openapi" / "schemathesis.toml"),
        "run", str(SPEC_PATH), "--url", server.base,
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "-H", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-shrink",
        *selection,
    ]
    # Far above a run on a loaded machine (each management example may load a model).
    run = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    summary = run.stdout[-6000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{summary}\nserver log tail:\n{''.join(server.log[-20:])}"
    assert re.search(r"\d+ generated, \d+ passed", summary), summary
    return summary


def test_schemathesis_inference_and_metadata_routes(managed_server):
    # Management is driven in its own run below, so that an unloaded model is not mistaken for
    # a fault of the inference routes.
    print(schemathesis(managed_server, "--exclude-tag", "management"))


def test_schemathesis_management_routes(managed_server):
    print(schemathesis(managed_server, "--include-tag", "management"))


def test_the_json_copy_is_the_yaml_document():
    """openapi.json (TorchServe's API description, served as JSON) is openapi.yaml converted;
    after editing the YAML, `make openapi-json` writes it again."""
    import json
    assert json.loads((ROOT / "openapi.json").read_text()) == yaml.safe_load(SPEC_PATH.read_text()), \
        "openapi.json is out of date: run `make openapi-json`"
