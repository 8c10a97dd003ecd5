"""Property-based tests of the API, drawn from its own OpenAPI document: whatever a client
sends to any route, the answer is a status the document or the auth layer names, never a
server error, and never a token."""

from __future__ import annotations

import json
import string
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient

from pipeline import tokens
from pipeline.service import create_app
from pipeline.settings import Settings

# What any route may answer beside its documented statuses: no or a weak token, no such
# thing, a body too large, a request the route refuses.
ALWAYS = {401, 403, 404, 413, 422}


@pytest.fixture(scope="module")
def api(tmp_path_factory, embedded_server):
    state = tmp_path_factory.mktemp("api-state")
    graph = embedded_server.connect()
    user, password = graph.auth or ("", "")
    uri = graph.uri
    graph.close()
    settings = Settings(state_dir=state, neo4j_uri=uri,
                        neo4j_username=user, neo4j_password=password,
                        database_url=f"sqlite:///{state / 'runs.sqlite3'}", device="cpu")
    with TestClient(create_app(settings, max_body_mb=1.0)) as client:
        client.get("/health")
        yield client, state, client.get("/openapi.json").json()


def _value(schema: dict, spec: dict) -> st.SearchStrategy:
    """Values for a JSON schema, and beyond its bounds: what a careless client sends."""
    if "$ref" in schema:
        return _value(spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]], spec)
    if "anyOf" in schema:
        return st.one_of([_value(s, spec) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "integer":
        lo, hi = schema.get("minimum", -10), schema.get("maximum", 10**6)
        return st.integers(lo - 3, hi + 3)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-5, max_value=5)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "object":
        props = schema.get("properties", {})
        return st.fixed_dictionaries({k: _value(v, spec) for k, v in props.items()})
    return st.text(string.printable + "éλ\u200b", max_size=40)


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, ops in sorted(spec["paths"].items())
            for method, op in sorted(ops.items())]


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_any_request_to_any_route_gets_a_named_status_and_no_server_error(api, data):
    client, state, spec = api
    path, method, op = data.draw(st.sampled_from(_operations(spec)), label="route")
    scope = data.draw(st.sampled_from(["none", "read", "write"]), label="token")
    if method == "post" and path == "/jobs" and scope == "write":
        scope = "read"  # a written job runs the model: the route's own tests cover it
    headers = {} if scope == "none" else {
        "Authorization": f"Bearer {tokens.token(state, scope)}"}
    url, query = path, {}
    for param in op.get("parameters", []):
        value = data.draw(_value(param.get("schema", {}), spec), label=param["name"])
        if param["in"] == "path":
            url = url.replace("{" + param["name"] + "}", quote(str(value), safe="") or "x")
        elif value is not None or param.get("required"):
            query[param["name"]] = value
    body = None
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = data.draw(_value(content["application/json"]["schema"], spec), label="body")
    response = client.request(method.upper(), url, params=query, json=body, headers=headers)
    assert response.status_code < 500, (method, url, query, body, response.text)
    assert str(response.status_code) in op["responses"] or response.status_code in ALWAYS, (
        method, url, response.status_code, response.text)
    for scope_ in tokens.SCOPES:
        assert tokens.token(state, scope_) not in response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        json.loads(response.text)  # what says JSON is JSON


def test_the_document_names_every_route_the_page_uses():
    app_js = (Path(__file__).resolve().parents[1] / "pipeline" / "web" / "app.js").read_text()
    assert "/similar" in app_js and "/query" in app_js and "/insights/" in app_js
